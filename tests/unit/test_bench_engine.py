"""tools/bench_engine.py without TensorRT: argument parsing, trtexec-summary parsing, the table,
and the clear error when trtexec is missing."""
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

# The two summary lines in trtexec's format (a parser fixture, not a measurement).
TRTEXEC_SUMMARY = """\
[11/23/2026-10:00:00] [I] === Performance summary ===
[11/23/2026-10:00:00] [I] Throughput: 250.5 qps
[11/23/2026-10:00:00] [I] Latency: min = 3.9 ms, max = 4.5 ms, mean = 3.99 ms, median = 3.98 ms, percentile(90%) = 4.1 ms, percentile(95%) = 4.2 ms, percentile(99%) = 4.4 ms
[11/23/2026-10:00:00] [I] GPU Compute Time: min = 3.9 ms, max = 4.5 ms, mean = 3.99 ms, median = 3.98 ms, percentile(90%) = 4.1 ms, percentile(95%) = 4.2 ms, percentile(99%) = 4.4 ms
"""


def test_parse_trtexec_output():
    r = bench.parse_trtexec_output(TRTEXEC_SUMMARY)
    assert (r.throughput_qps, r.mean_ms, r.median_ms, r.p99_ms) == (250.5, 3.99, 3.98, 4.4)
    with pytest.raises(bench.BenchError, match="Throughput"):
        bench.parse_trtexec_output("[I] nothing here")


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
