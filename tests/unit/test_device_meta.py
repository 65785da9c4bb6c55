"""Device-agnostic without a GPU: the whole path with torch's default device set to `meta`.

The model and the data sit on the CPU (`--device cpu`) while every tensor factory called without an
explicit device makes a `meta` tensor; any such tensor that meets the model or the data fails loudly
("Tensor on device meta is not on the expected device cpu"), which is how a forgotten device shows
up on a GPU. The path: load -> OuroMamba-Gen (2 images, 1 step) -> calibrate W4A4 and W8A8 with
every method -> export -> --check, plus evaluation on an image folder.
"""
from __future__ import annotations

import json

import pytest
import torch

from ouro.calib.quant.base import METHODS
from ouro.exporter.cli import main
from tools.vim_checkpoints import TINY, write_checkpoint, write_image_folder

PRESETS = ("w4a4", "w8a8")


@pytest.fixture
def meta_default():
    torch.set_default_device("meta")
    try:
        assert torch.empty(1).device.type == "meta"  # the trap is armed
        yield
    finally:
        torch.set_default_device(None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("meta")
    ckpt = write_checkpoint(d / "tiny.pth", TINY)
    write_image_folder(d / "eval", classes=2, per_class=3)
    (d / "gen.toml").write_text("iterations = 1\nbatch_size = 2\n")
    return d, ckpt


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_whole_path_with_meta_default_device(files, meta_default, capsys, tmp_path):
    d, ckpt = files
    # load -> Gen -> calibrate -> export -> --check (the data-free default path), both presets
    for preset in PRESETS:
        out, rep = tmp_path / f"{preset}.onnx", tmp_path / f"{preset}.json"
        rc, stdout, err = _run([ckpt, f"--{preset}", "--calib", "synthetic:2", "--gen-config", d / "gen.toml", "--device", "cpu",
                                "--eval-dir", d / "eval", "-o", out, "--check", "--report", rep], capsys)
        assert rc == 0, err
        assert stdout.startswith("plan: ") and "OuroMamba-Gen, 2 synthetic images" in stdout
        r = json.loads(rep.read_text())
        assert r["check"][str(out)]["passed"] and r["calibration"]["source"] == "synthetic"
        assert r["eval_images"] == 6 and 0 <= r["quant_top1"] <= 100
    # Gen alone into a folder, then every method at both presets on those images, evaluated on the folder
    rc, _, err = _run(["gen", ckpt, "-n", "2", "-o", tmp_path / "synth", "--config", d / "gen.toml", "--device", "cpu"], capsys)
    assert rc == 0, err
    methods = ",".join(m.value for m in METHODS)
    rc, stdout, err = _run(["compare", ckpt, "--calib-dir", tmp_path / "synth", "--eval-dir", d / "eval", "--device", "cpu",
                            "--methods", methods, "--presets", ",".join(PRESETS), "-o", tmp_path / "cmp"], capsys)
    assert rc == 0, err + stdout
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    assert {(r["method"], r["preset"]) for r in rows} == {(m.value, p) for m in METHODS for p in PRESETS}
    assert all(r["error"] is None and r["top1"] is not None for r in rows)
    # the QuantState of a baseline: saved and reloaded under the trap too
    qs = tmp_path / "ptq4vm.safetensors"
    rc, _, err = _run([ckpt, "--w4a4", "--method", "ptq4vm", "--calib-dir", tmp_path / "synth", "--device", "cpu", "-o", qs], capsys)
    assert rc == 0, err
    rc, _, err = _run([ckpt, "--load-calib", qs, "--device", "cpu", "--eval-dir", d / "eval", "-o", tmp_path / "again.safetensors"], capsys)
    assert rc == 0, err


def test_the_trap_catches_a_forgotten_device(meta_default):
    """The premise: a tensor made without a device cannot meet CPU data silently."""
    x = torch.ones(3, device="cpu")
    with pytest.raises((RuntimeError, NotImplementedError)):
        _ = (x + torch.ones(3)).sum().item()
