"""The main job on a CUDA GPU (`--device cuda`): Gen, calibration, export and --check, for the demo
model and an official-format Vim-T with random weights; and the PyTorch stages' numbers on the GPU
against the CPU's within named tolerances. Runs where torch sees a GPU (no ouro kernel library needed)."""
from __future__ import annotations

import json

import pytest
import torch

from ouro.calib.gen import GenConfig, gen_losses, state_attention
from ouro.calib.models.vim import ARCHS, VisionMamba
from ouro.exporter.cli import main
from tools.vim_checkpoints import write_checkpoint

NEEDS_KERNEL_LIBRARY = False

GPU_LOSS_RTOL = 1e-3
"""L^C / L^O on the GPU vs the CPU: same fp32 formulas, different reduction orders and (with mamba-ssm)
a different scan kernel; the losses are means of O(1) terms."""
GPU_LOGIT_ATOL = 1e-3
"""FP logits of Vim-T, GPU vs CPU (24 blocks of fp32 GEMMs and scans)."""
GPU_E_RTOL = 1e-4
GPU_E_ATOL = 1e-5


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def gen_toml(tmp_path_factory):
    p = tmp_path_factory.mktemp("g") / "gen.toml"
    p.write_text("iterations = 2\nbatch_size = 4\n")
    return p


def test_demo_gen_calibrate_export_check_on_cuda(gen_toml, capsys, tmp_path):
    out, rep = tmp_path / "demo.onnx", tmp_path / "r.json"
    rc, stdout, err = _run(["--demo", "--w4a4", "--calib", "synthetic:8", "--gen-config", gen_toml, "--device", "cuda",
                            "-o", out, "--check", "--report", rep], capsys)
    assert rc == 0, err
    assert stdout.startswith("plan: ") and "device cuda:0" in stdout and "OuroMamba-Gen, 8 synthetic images" in stdout
    r = json.loads(rep.read_text())
    assert r["check"][str(out)]["passed"] and r["check"][str(out)]["node_check"]["passed"]
    assert r["quant_top1"] > 90  # FP 98.99; the CPU run of this command measured 99.20


def test_vim_tiny_gen_calibrate_export_check_on_cuda(gen_toml, capsys, tmp_path):
    ckpt = write_checkpoint(tmp_path / "vim_t.pth", "vim_tiny")
    out = tmp_path / "vim_t.onnx"
    rc, stdout, err = _run([ckpt, "--w4a4", "--calib", "synthetic:4", "--gen-config", gen_toml, "--device", "cuda",
                            "-o", out, "--check"], capsys)
    assert rc == 0, err
    # random weights, 24 blocks: judged node by node (the end-to-end logits cascade, exporter/check.py PLUGIN_TOL)
    assert "(plugin): node check PASSED" in stdout and out.is_file()


def test_gen_losses_and_forward_agree_with_the_cpu():
    torch.manual_seed(0)
    model = VisionMamba(ARCHS["vim_tiny"]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 224, 224)
    t = torch.tensor([3, 7])
    cfg = GenConfig(checkpoint=False)
    cpu = [v.detach() for v in gen_losses(model, x, t, cfg)]
    gpu = [v.detach().cpu() for v in gen_losses(model.cuda(), x.cuda(), t.cuda(), cfg)]
    torch.testing.assert_close(gpu[0], cpu[0], rtol=GPU_LOSS_RTOL, atol=0)
    torch.testing.assert_close(gpu[1], cpu[1], rtol=GPU_LOSS_RTOL, atol=0)
    torch.testing.assert_close(gpu[2], cpu[2], atol=GPU_LOGIT_ATOL, rtol=GPU_LOGIT_ATOL)


def test_state_attention_agrees_with_the_cpu():
    g = torch.Generator().manual_seed(0)
    dt = torch.nn.functional.softplus(torch.randn(2, 197, 384, generator=g) - 3)
    A = -torch.exp(torch.randn(384, 16, generator=g))
    for reverse in (False, True):
        torch.testing.assert_close(state_attention(dt.cuda(), A.cuda(), reverse=reverse).cpu(),
                                   state_attention(dt, A, reverse=reverse), rtol=GPU_E_RTOL, atol=GPU_E_ATOL)
