"""The headline command on an official-format Vim-T checkpoint (random weights, 28 MB), on the CPU.

    ouro-export vim_t.pth --w4a4 -o vim_t.plan --dry-run            -> the plan: OuroMamba-Gen, 128 images, device
    ouro-export vim_t.pth --w4a4 --calib synthetic:8 -o vim_t.onnx  -> completes, plan line first, writes the ONNX

Kept small for CI: 8 synthetic images with one Gen step (--gen-config); both are marked slow.
"""
from __future__ import annotations

import onnx
import pytest

from ouro.exporter.cli import main
from tools.vim_checkpoints import write_checkpoint


@pytest.fixture(scope="module")
def vim_t(tmp_path_factory):
    d = tmp_path_factory.mktemp("vim_t")
    return d, write_checkpoint(d / "vim_t.pth", "vim_tiny")


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_dry_run_names_data_free_default_and_device(vim_t, capsys, tmp_path):
    _, ckpt = vim_t
    rc, stdout, err = _run([ckpt, "--w4a4", "-o", tmp_path / "vim_t.plan", "--dry-run"], capsys)
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plan: ")
    plan = lines[0]
    for part in ("vim_tiny", "recipe w4a4 (ouromamba)", "calibration: OuroMamba-Gen, 128 synthetic images, seed 0", "device cpu",
                 "vim_t.plan", "estimate ~", "Gen ", "--calib-dir DIR", "--calib synthetic:N"):
        assert part in plan, (part, plan)
    assert list(tmp_path.iterdir()) == []  # writes nothing


@pytest.mark.slow
def test_synthetic_8_completes_on_cpu_and_writes_onnx(vim_t, capsys, tmp_path):
    d, ckpt = vim_t
    gen = d / "gen.toml"
    gen.write_text("iterations = 1\nbatch_size = 8\n")
    out = tmp_path / "vim_t.onnx"
    rc, stdout, err = _run([ckpt, "--w4a4", "--calib", "synthetic:8", "--gen-config", gen, "--device", "cpu", "-o", out], capsys)
    assert rc == 0, err
    assert stdout.startswith("plan: ") and "OuroMamba-Gen, 8 synthetic images" in stdout.splitlines()[0]
    m = onnx.load(str(out), load_external_data=False)
    assert [n.op_type for n in m.graph.node].count("SelectiveScan") == 2 * 24
