"""`ouro-export --demo --w8a8 --report r.json -o q.safetensors`: calibration, report, QuantState reload."""
from __future__ import annotations

import json

import pytest

from ouro.exporter.cli import main

W8A8_MAX_DROP = 0.5  # issue 4 acceptance bar (points of top-1)


@pytest.mark.slow
def test_demo_w8a8_report_and_reload(tmp_path, capsys):
    qs, rep = tmp_path / "q.safetensors", tmp_path / "r.json"
    assert main(["--demo", "--w8a8", "--calib", "real:128", "--report", str(rep), "-o", str(qs)]) == 0
    r = json.loads(rep.read_text())
    assert r["calibration"]["images"] == 128 and r["recipe"]["name"] == "w8a8"
    assert r["fp_top1"] - r["quant_top1"] <= W8A8_MAX_DROP
    assert len(r["sqnr_db"]) == len(r["calibration"]["block_losses"])
    assert r["compression"]["model"] > 1 and "calibrate" in r["timings"]
    rep2 = tmp_path / "r2.json"
    assert main(["--demo", "--load-calib", str(qs), "--report", str(rep2), "-o", str(tmp_path / "q2.safetensors")]) == 0
    assert json.loads(rep2.read_text())["quant_top1"] == r["quant_top1"]


@pytest.mark.parametrize("spec,msg", [("imagenet:5", "real:N or synthetic:N"), ("synthetic:0", "must be >= 1")])
def test_bad_calib_spec_is_a_clean_error(capsys, tmp_path, spec, msg):
    assert main(["--demo", "--w8a8", "--calib", spec, "-o", str(tmp_path / "never.safetensors")]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and not list(tmp_path.iterdir())


def test_synthetic_calib_spec_calibrates_on_gen_images(capsys, tmp_path):
    """`--calib synthetic:N` draws N OuroMamba-Gen images (no data) and calibrates on them."""
    import torch

    from ouro.calib.models import VimConfig, build_model

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": build_model(VimConfig(embed_dim=16, depth=1, img_size=16, patch_size=4, stride=4,
                                               num_classes=3, name="tiny")).state_dict()}, ckpt)
    rep = tmp_path / "r.json"
    assert main([str(ckpt), "--w8a8", "--calib", "synthetic:2", "--report", str(rep), "-o", str(tmp_path / "q.safetensors")]) == 0
    cal = json.loads(rep.read_text())["calibration"]
    assert cal["source"] == "synthetic" and cal["images"] == 2 and (tmp_path / "q.safetensors").is_file()
