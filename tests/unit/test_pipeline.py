"""exporter.pipeline on a tiny model with image folders: calibrate, save/load, report contents."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image

from ouro.calib.models import VimConfig, build_model
from ouro.exporter.cli import RunContext
from ouro.calib.metrics import sqnr_db
from ouro.exporter.pipeline import evaluate_fp, memory_compression, quantize, write_report
from ouro.recipes import get_preset

TINY = VimConfig(embed_dim=16, depth=2, img_size=16, patch_size=4, stride=4, num_classes=2, name="tiny-test")
FAST = {"steps": 2, "batch_size": 4, "grid_points": 20}
W4_COMPRESSION_MIN = 2.0  # 4-bit codes + fp32 scales vs fp16 on the quantized tensors (tiny dims: scales weigh a lot)
SQNR_ATOL_DB = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / "eval" / c).mkdir(parents=True)
        for i in range(4):
            arr = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / "eval" / c / f"{i}.png")
    (root / "calib").mkdir()
    for i in range(6):
        arr = (torch.rand(24, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / "calib" / f"{i}.png")
    return root


def _ctx(folders, tmp_path, **kw):
    args = argparse.Namespace(demo=False, eval_dir=str(folders / "eval"), calib_dir=str(folders / "calib"), calib=None,
                              load_calib=None, save_calib=None, seed=0)
    for k, v in kw.items():
        setattr(args, k, v)
    torch.manual_seed(0)
    ctx = RunContext(args=args)
    ctx.model = build_model(TINY).eval()
    ctx.recipe = get_preset("w4a4").with_(calib=FAST)
    return ctx


def test_quantize_report_and_reload(folders, tmp_path, capsys):
    qs = tmp_path / "q.safetensors"
    ctx = _ctx(folders, tmp_path, save_calib=str(qs))
    evaluate_fp(ctx)
    quantize(ctx)
    rep = ctx.report
    assert rep["calibration"] == {**rep["calibration"], "source": "dir", "images": 6}
    assert {"fp_top1", "quant_top1", "top1_delta", "top1_agreement"} <= set(rep)
    assert len(rep["sqnr_db"]) == TINY.depth
    assert rep["outlier_rate"] and all(0 <= v <= 1 for v in rep["outlier_rate"].values())
    assert rep["compression"]["quantized_layers"] > W4_COMPRESSION_MIN
    assert "calibrate" in ctx.timings and "quantized top-1" in capsys.readouterr().out
    out = write_report(ctx, tmp_path / "r.json")
    data = json.loads(out.read_text())
    assert data["timings"]["calibrate"] >= 0 and data["method"] == "ouromamba"
    assert (tmp_path / "r.sqnr.png").is_file()
    # --load-calib reproduces the same quantized predictions without data
    ctx2 = _ctx(folders, tmp_path, load_calib=str(qs))
    quantize(ctx2)
    assert ctx2.report["quant_top1"] == rep["quant_top1"] and ctx2.report["sqnr_db"] == rep["sqnr_db"]


def test_sqnr_and_compression_units():
    x = torch.ones(100)
    assert sqnr_db(x, x) == float("inf")
    assert abs(sqnr_db(x, x * 1.1) - 20.0) < SQNR_ATOL_DB  # ||x|| / ||0.1 x|| = 10 -> 20 dB (1.1 is inexact in fp32)
    m = build_model(TINY)
    assert memory_compression(m, m) == {**memory_compression(m, m), "model": 1.0, "quantized_layers": None}
