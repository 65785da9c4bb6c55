"""tools/bench_engine.py without TensorRT: argument parsing, reading trtexec's --exportTimes JSON,
the table, and the clear error when trtexec is missing."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_engine", REPO / "tools" / "bench_engine.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_engine"] = bench  # dataclasses resolve their module by name
spec.loader.exec_module(bench)

def _record(start: float, latency: float) -> dict:
    """One --exportTimes record in TensorRT 10/11's format (no data transfers: h2d/d2h take no time)."""
    return {"startEnqMs": start, "endEnqMs": start + 0.01, "startH2dMs": start, "endH2dMs": start,
            "startComputeMs": start, "endComputeMs": start + latency, "startD2hMs": start + latency,
            "endD2hMs": start + latency, "h2dMs": 0.0, "computeMs": latency, "d2hMs": 0.0, "latencyMs": latency}


def test_parse_trtexec_times():
    # 100 back-to-back inferences of 4 ms then one of 8 ms: 101 inferences in 408 ms
    recs, t = [], 0.0
    for lat in [4.0] * 100 + [8.0]:
        recs.append(_record(t, lat))
        t += lat
    r = bench.parse_trtexec_times(recs)
    assert r.throughput_qps == pytest.approx(101 / 0.408)
    assert r.mean_ms == pytest.approx((400 + 8) / 101) and r.median_ms == 4.0 and r.p99_ms == 4.0  # nearest rank: 100th of 101
    assert bench.parse_trtexec_times([_record(0.0, 2.0), _record(2.0, 6.0)]).median_ms == 4.0
    old = [{"startInMs": 0.0, "endOutMs": 5.0, "latencyMs": 5.0}]  # the older In/Out names
    assert bench.parse_trtexec_times(old).throughput_qps == pytest.approx(200.0)
    for bad, msg in (([], "no inference records"), ([{"computeMs": 1.0}], "no inference records"),
                     ([{"latencyMs": 1.0}], "lack start/end")):
        with pytest.raises(bench.BenchError, match=msg):
            bench.parse_trtexec_times(bad)


def test_format_table_speedup_relative_to_first_engine():
    fp = bench.TrtexecResult(100.0, 10.0, 10.0, 11.0)
    q = bench.TrtexecResult(250.0, 4.0, 4.0, 4.5)
    table = bench.format_table([("fp16", 32, fp), ("w4a4", 32, q)])
    lines = table.splitlines()
    assert lines[2].startswith("| fp16 | 32 |") and lines[2].endswith("| 3,200 | 1.00x |")
    assert lines[3].startswith("| w4a4 | 32 |") and lines[3].endswith("| 8,000 | 2.50x |")


def test_parse_args(tmp_path):
    plan = tmp_path / "vim_s.plan"
    plan.write_bytes(b"x")
    assert bench.parse_engine_arg(f"w4a4={plan}") == ("w4a4", plan)
    assert bench.parse_engine_arg(str(plan)) == ("vim_s", plan)
    with pytest.raises(bench.BenchError, match="does not exist"):
        bench.parse_engine_arg("a=missing.plan")
    assert bench.parse_input_arg("images:3x224x224") == bench.InputSpec("images", (3, 224, 224))
    with pytest.raises(bench.BenchError, match="NAME:CxHxW"):
        bench.parse_input_arg("3x224x224")


@pytest.mark.skipif(shutil.which("trtexec") is not None, reason="trtexec is installed")
def test_main_without_trtexec_names_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRTEXEC", raising=False)
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"x")
    rc = bench.main(["--engine", f"q={plan}", "--input", "images:3x32x32"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "trtexec not found" in err and "TensorRT" in err
