"""Latency / throughput of TensorRT engines, FP16 baseline vs quantized, at batch 1 / 32 / 128.

    python tools/bench_engine.py --engine fp16=vim_s_fp16.plan --engine w4a4=vim_s.plan \
        --onnx vim_s.onnx --plugin-lib build/trt/libouro_trt_plugins.so [--batch 1,32,128] [--iterations 200]

Each measurement is one `trtexec --loadEngine=... --exportTimes=times.json` run (the exact command is
printed, see tools/trtexec.md): CUDA graphs, no host<->device copies, spin-wait, warm-up first, so the
numbers are the engine's own GPU time. The numbers are read from the --exportTimes JSON (one record
per timed inference; library decision: trtexec's machine-readable output instead of regular
expressions over its log): mean / median / p99 of `latencyMs` (nearest rank), throughput = inferences /
the span from the first inference's start to the last one's end (as trtexec computes it), in
images/s = batch x queries/s, and the speed-up of each engine over the first one.
The input name and shape come from --onnx (any of the engines' ONNX files) or from --input NAME:CxHxW.
Needs trtexec (TensorRT) on PATH or $TRTEXEC and a GPU; without them it stops with what to install.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ouro.exporter.engine_config import (
    TENSORRT_INSTALL_HINT,
    InputSpec,
    input_spec_from_onnx,
    shell_join,
    trtexec_bench_command,
)

DEFAULT_BATCHES = (1, 32, 128)
TRTEXEC_TIMEOUT_S = 900


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class TrtexecResult:
    throughput_qps: float  # queries (engine launches) per second
    mean_ms: float
    median_ms: float
    p99_ms: float


START_KEYS = ("startEnqMs", "startH2dMs", "startInMs", "startComputeMs")
END_KEYS = ("endD2hMs", "endOutMs", "endComputeMs")
"""Per-inference timestamps of trtexec's --exportTimes records (TensorRT 8-11 and the older In/Out names)."""


def _percentile(sorted_ms: list[float], p: float) -> float:
    """Nearest-rank percentile of ascending values (p in (0, 100])."""
    return sorted_ms[max(0, math.ceil(p / 100 * len(sorted_ms)) - 1)]


def parse_trtexec_times(records: list[dict]) -> TrtexecResult:
    """Throughput and latency statistics from trtexec's --exportTimes JSON (a list of per-inference records)."""
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) and "latencyMs" in r for r in records):
        raise BenchError("the --exportTimes file holds no inference records with 'latencyMs' (is it trtexec's output?)")
    start = [next((r[k] for k in START_KEYS if k in r), None) for r in records]
    end = [next((r[k] for k in END_KEYS if k in r), None) for r in records]
    if None in start or None in end:
        raise BenchError(f"--exportTimes records lack start/end timestamps (looked for {START_KEYS} / {END_KEYS})")
    span_ms = max(end) - min(start)
    if span_ms <= 0:
        raise BenchError(f"--exportTimes records span {span_ms} ms; cannot compute a throughput")
    lat = sorted(float(r["latencyMs"]) for r in records)
    n = len(lat)
    median = lat[n // 2] if n % 2 else (lat[n // 2 - 1] + lat[n // 2]) / 2
    return TrtexecResult(n / (span_ms / 1e3), sum(lat) / n, median, _percentile(lat, 99))


def parse_engine_arg(text: str) -> tuple[str, Path]:
    """'label=path.plan' (or just 'path.plan', labelled by its stem)."""
    label, sep, path = text.partition("=")
    if not sep:
        label, path = Path(text).stem, text
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"engine {p} does not exist")
    return label, p


def parse_input_arg(text: str) -> InputSpec:
    """'images:3x224x224' -> InputSpec."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape:
        raise BenchError(f"--input expects NAME:CxHxW (without the batch), got {text!r}")
    return InputSpec(name, shape)


def find_trtexec() -> str:
    exe = os.environ.get("TRTEXEC") or shutil.which("trtexec")
    if not exe:
        raise BenchError(f"trtexec not found (set $TRTEXEC or put TensorRT's bin/ on PATH); to get it, {TENSORRT_INSTALL_HINT}")
    return exe


def format_table(rows: list[tuple[str, int, TrtexecResult]]) -> str:
    """Markdown table; speed-up is each row's throughput over the first engine's at the same batch."""
    base = {}
    for label, batch, r in rows:
        base.setdefault(batch, r.throughput_qps)
    lines = ["| engine | batch | mean ms | median ms | p99 ms | images/s | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, batch, r in rows:
        lines.append(f"| {label} | {batch} | {r.mean_ms:.3f} | {r.median_ms:.3f} | {r.p99_ms:.3f} | "
                     f"{r.throughput_qps * batch:,.0f} | {r.throughput_qps / base[batch]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", required=True, help="LABEL=path.plan (repeat; the first is the baseline)")
    p.add_argument("--onnx", help="an ONNX file of these engines, to read the input name and shape")
    p.add_argument("--input", help="input as NAME:CxHxW when no --onnx is given (e.g. images:3x224x224)")
    p.add_argument("--plugin-lib", help="libouro_trt_plugins.so (needed unless the plans embed it)")
    p.add_argument("--batch", default=",".join(map(str, DEFAULT_BATCHES)), help="batch sizes (default 1,32,128)")
    p.add_argument("--iterations", type=int, default=200)
    a = p.parse_args(argv)
    try:
        engines = [parse_engine_arg(e) for e in a.engine]
        if a.onnx:
            spec = input_spec_from_onnx(a.onnx)
        elif a.input:
            spec = parse_input_arg(a.input)
        else:
            raise BenchError("give --onnx MODEL.onnx or --input NAME:CxHxW so the input shape is known")
        batches = [int(b) for b in a.batch.split(",")]
        trtexec = find_trtexec()
        rows = []
        with tempfile.TemporaryDirectory(prefix="bench_engine.") as tmp:
            for label, plan in engines:
                for batch in batches:
                    times = Path(tmp) / f"{label}_b{batch}.json"
                    cmd = trtexec_bench_command(plan, spec, batch, plugin_library=a.plugin_lib,
                                                iterations=a.iterations, trtexec=trtexec, export_times=times)
                    print(f"$ {shell_join(cmd)}", file=sys.stderr)
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TRTEXEC_TIMEOUT_S)
                    if r.returncode != 0 or not times.is_file():
                        raise BenchError(f"trtexec failed for {label} at batch {batch} (exit {r.returncode}):\n"
                                         f"{(r.stdout + r.stderr)[-3000:]}")
                    rows.append((label, batch, parse_trtexec_times(json.loads(times.read_text()))))
    except BenchError as e:
        print(f"bench_engine: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
