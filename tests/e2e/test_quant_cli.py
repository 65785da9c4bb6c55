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


def test_synthetic_or_bad_calib_spec_is_a_clean_error(capsys):
    assert main(["--demo", "--w8a8", "--calib", "imagenet:5", "-o", "/tmp/never.safetensors", "--force"]) == 2
    assert "real:N or synthetic:N" in capsys.readouterr().err
