"""The one atomic writer (ouro.calib.files) and the one native-library finder (ouro.exporter.native)."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from ouro.calib import files
from ouro.calib.files import OutputError, atomic_write
from ouro.exporter import native


def test_atomic_write_bytes_and_callback(tmp_path):
    target = tmp_path / "sub" / "m.plan"
    assert atomic_write(target, b"abc") == target and target.read_bytes() == b"abc"
    atomic_write(target, lambda tmp: tmp.write_text("xyz"))
    assert target.read_text() == "xyz"
    assert stat.S_IMODE(target.stat().st_mode) & 0o044  # readable like any other file (not mkstemp's 0600)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.plan"]


def test_atomic_write_leaves_nothing_on_error(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    atomic_write(target, b"old")

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new")
    monkeypatch.undo()

    def writer(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("failed half way")

    with pytest.raises(RuntimeError):
        atomic_write(target, writer)
    assert target.read_bytes() == b"old"  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp file left


def test_atomic_write_force(tmp_path):
    target = tmp_path / "x.onnx"
    target.write_text("keep")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        atomic_write(target, b"new", force=False)
    assert target.read_text() == "keep"


@pytest.mark.parametrize("name", sorted(native.LIBRARIES))
def test_find_library_order(name, tmp_path, monkeypatch):
    lib = native.LIBRARIES[name]
    monkeypatch.delenv(lib.env, raising=False)
    monkeypatch.setattr(native, "repo_root", lambda: tmp_path)
    assert native.find_library(name) is None
    built = tmp_path / native.IN_TREE_BUILD_DIR / lib.file
    built.parent.mkdir(parents=True)
    built.write_bytes(b"\x7fELF")
    assert native.find_library(name) == built == native.expected_path(name)
    other = tmp_path / "elsewhere.so"
    other.write_bytes(b"\x7fELF")
    monkeypatch.setenv(lib.env, str(other))
    assert native.find_library(name) == other  # the variable wins over the build
    explicit = tmp_path / "mine.so"
    explicit.write_bytes(b"\x7fELF")
    assert native.find_library(name, explicit) == explicit  # an explicit path wins over both
    monkeypatch.setenv(lib.env, str(tmp_path / "nope.so"))
    with pytest.raises(native.NativeLibraryError, match=lib.env):
        native.find_library(name)
    with pytest.raises(native.NativeLibraryError, match="does not exist"):
        native.find_library(name, tmp_path / "absent.so")
    with pytest.raises(KeyError, match="unknown native library"):
        native.find_library("libfoo")
    assert os.environ.get(lib.env) == str(tmp_path / "nope.so")  # monkeypatch restores it afterwards


def test_atomic_write_no_clobber_without_hard_links(tmp_path, monkeypatch):
    """force=False on a file system without hard links: the name is reserved by an exclusive create."""
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(files.os, "link", no_link)
    target = tmp_path / "m.onnx"
    atomic_write(target, b"first", force=False)
    assert target.read_bytes() == b"first"
    with pytest.raises(OutputError, match="already exists"):
        atomic_write(target, b"second", force=False)
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_output_plan_checks_everything_together(tmp_path):
    from ouro.calib.files import WritePlan

    ok = WritePlan(force=False)
    ok.add("-o", tmp_path / "m.onnx")
    ok.add("--report", tmp_path / "r.json", siblings=(tmp_path / "r.sqnr.png",))
    ok.add("--save-calib", None)  # not asked for
    assert ok.check().paths == (tmp_path / "m.onnx", tmp_path / "r.json", tmp_path / "r.sqnr.png")
    same = WritePlan()
    same.add("-o", tmp_path / "x.safetensors")
    same.add("--save-calib", tmp_path / "sub" / ".." / "x.safetensors")
    with pytest.raises(OutputError, match="-o and --save-calib would both write"):
        same.check()
    (tmp_path / "r.sqnr.png").write_text("old")
    with pytest.raises(OutputError, match=r"r.sqnr.png already exists"):
        ok.check()
    ok.force = True
    ok.check()
    long = WritePlan(force=True)
    long.add("-o", tmp_path / ("y" * 300 + ".onnx"))
    with pytest.raises(OutputError, match="too long"):
        long.check()
    missing = WritePlan()
    missing.add("--report", tmp_path / "nope" / "r.json")
    with pytest.raises(OutputError, match="does not exist"):
        missing.check()
