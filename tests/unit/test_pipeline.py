"""exporter.pipeline on a tiny model with image folders: calibrate, save/load, report contents."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ouro.calib.models import VimConfig, build_model
from ouro.calib.evaluation import EvalSource
from ouro.calib.imagefolder import parse_calib_spec
from ouro.calib.metrics import sqnr_db
from ouro.exporter.context import RunContext
from ouro.exporter.pipeline import evaluate_fp, load_evaluation, memory_compression, quantize, write_report
from ouro.exporter.run_config import CalibSource
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


def _model():
    torch.manual_seed(0)
    return build_model(TINY).eval()


def test_quantize_report_and_reload(folders, tmp_path, capsys):
    qs = tmp_path / "q.safetensors"
    recipe = get_preset("w4a4").with_(calib=FAST)
    calib = CalibSource(parse_calib_spec(None, str(folders / "calib")), calib_dir=folders / "calib")
    ctx, model = RunContext(), _model()
    data = load_evaluation(EvalSource.folder(folders / "eval", TINY.img_size))
    fp_pred = evaluate_fp(model, data, ctx)
    qmodel = quantize(model, recipe=recipe, calib=calib, save_calib=qs, data=data, fp_pred=fp_pred, ctx=ctx)
    rep = ctx.report
    assert rep["calibration"] == {**rep["calibration"], "source": "dir", "images": 6}
    assert {"fp_top1", "quant_top1", "top1_delta", "top1_agreement"} <= set(rep)
    assert len(rep["sqnr_db"]) == TINY.depth
    assert rep["outlier_rate"] and all(0 <= v <= 1 for v in rep["outlier_rate"].values())
    assert rep["compression"]["quantized_layers"] > W4_COMPRESSION_MIN
    assert qmodel.recipe == recipe and qs.is_file()
    assert "calibrate" in ctx.timings and "quantized top-1" in capsys.readouterr().out
    out = write_report(ctx, tmp_path / "r.json")
    data_json = json.loads(out.read_text())
    assert data_json["timings"]["calibrate"] >= 0 and data_json["method"] == "ouromamba"
    assert (tmp_path / "r.sqnr.png").is_file()
    # --load-calib reproduces the same quantized predictions without data (FP predictions computed here)
    ctx2 = RunContext()
    quantize(_model(), load_calib=qs, data=data, ctx=ctx2)
    assert ctx2.report["quant_top1"] == rep["quant_top1"] and ctx2.report["sqnr_db"] == rep["sqnr_db"]
    assert ctx2.report["fp_top1"] == rep["fp_top1"] and "calibrate" not in ctx2.timings


def test_sqnr_and_compression_units():
    x = torch.ones(100)
    assert sqnr_db(x, x) == float("inf")
    assert abs(sqnr_db(x, x * 1.1) - 20.0) < SQNR_ATOL_DB  # ||x|| / ||0.1 x|| = 10 -> 20 dB (1.1 is inexact in fp32)
    m = build_model(TINY)
    assert memory_compression(m, m) == {**memory_compression(m, m), "model": 1.0, "quantized_layers": None}
