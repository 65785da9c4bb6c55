"""Latency / throughput of TensorRT engines, FP16 baseline vs quantized, at batch 1 / 32 / 128.

    python tools/bench_engine.py --engine fp16=vim_s_fp16.plan --engine w4a4=vim_s.plan \
        --onnx vim_s.onnx --plugin-lib build/trt/libouro_trt_plugins.so [--batch 1,32,128] [--iterations 200]

Each measurement is one `trtexec --loadEngine=...` run (the exact command is printed, see
tools/trtexec.md): CUDA graphs, no host<->device copies, spin-wait, warm-up first, so the numbers are
the engine's own GPU time. The table reports mean / median / p99 latency (ms), throughput
(images/s = batch x queries/s) and the speed-up of each engine over the first one.
The input name and shape come from --onnx (any of the engines' ONNX files) or from --input NAME:CxHxW.
Needs trtexec (TensorRT) on PATH or $TRTEXEC and a GPU; without them it stops with what to install.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
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


# trtexec's performance summary, e.g.
#   [I] Throughput: 1234.5 qps
#   [I] Latency: min = 0.80 ms, max = 1.10 ms, mean = 0.81 ms, median = 0.81 ms, percentile(90%) = ..., percentile(99%) = 0.9 ms
# ("GPU Compute Time" has the same form; with --noDataTransfers the two agree, we take "Latency").
_THROUGHPUT = re.compile(r"Throughput:\s*([0-9.eE+-]+)\s*qps")
_LATENCY = re.compile(r"\]\s*Latency:(.*)")
_FIELD = re.compile(r"(mean|median|percentile\(99%\))\s*=\s*([0-9.eE+-]+)\s*ms")


def parse_trtexec_output(text: str) -> TrtexecResult:
    """Extract throughput and latency statistics from trtexec's performance summary."""
    tp = _THROUGHPUT.search(text)
    lat = _LATENCY.search(text)
    if not tp or not lat:
        raise BenchError("could not find trtexec's 'Throughput:' / 'Latency:' summary lines in its output")
    fields = dict(_FIELD.findall(lat.group(1)))
    missing = [k for k in ("mean", "median", "percentile(99%)") if k not in fields]
    if missing:
        raise BenchError(f"trtexec latency line lacks {missing}: {lat.group(0).strip()}")
    return TrtexecResult(float(tp.group(1)), float(fields["mean"]), float(fields["median"]), float(fields["percentile(99%)"]))


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
        for label, plan in engines:
            for batch in batches:
                cmd = trtexec_bench_command(plan, spec, batch, plugin_library=a.plugin_lib,
                                            iterations=a.iterations, trtexec=trtexec)
                print(f"$ {shell_join(cmd)}", file=sys.stderr)
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=TRTEXEC_TIMEOUT_S)
                if r.returncode != 0:
                    raise BenchError(f"trtexec failed for {label} at batch {batch} (exit {r.returncode}):\n"
                                     f"{(r.stdout + r.stderr)[-3000:]}")
                rows.append((label, batch, parse_trtexec_output(r.stdout)))
    except BenchError as e:
        print(f"bench_engine: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
