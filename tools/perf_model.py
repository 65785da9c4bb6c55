"""Traffic and MMA model of the outlier-split linear's launch sequence vs cuBLAS FP16, on datasheet rooflines.

For each Vim linear shape (in_proj, out_proj, x_proj of Vim-T/S/B, batch 1 and 32) the kernels come from the
library's own launch code: `ouroOutlierLinearPlan` (via ouro.exporter.cuda_kernels.linear_plan) runs the same
path / epilogue / tile decision and grid / shared-memory computation as a real launch, and reports per kernel the
global-memory bytes and the tensor-core work. This script only prices them:

    kernel time = max(DRAM bytes / bandwidth, inlier MMA / peak + outlier MMA / peak) + KERNEL_OVERHEAD_US
    (MMA peaks: the datasheet's dense rate of the instruction kind, times the fraction that mma.sync reaches on
    the architecture, and times the wave efficiency ctas / (waves * SMs) of the kernel's own grid)

and cuBLAS FP16 the same way (one kernel, 128x128 tiles, 2 bytes per element of X, W and Y). Outlier statistics are
inputs (--window-frac, --hot-frac): the share of channels in one window's outlier list and of channels that are
ever outliers. Nothing here is measured; the numbers are predictions on paper (README: "never claim speed").

    python tools/perf_model.py                       # all shapes, H100/H200/A100/L40S
    python tools/perf_model.py --device H100 --model vim_b --batch 32
    python tools/perf_model.py --lib build/trt/libouro_kernels.so --json model.json

Needs the kernel library (any build of it: the CUDA build, or the CPU-emulator build of the same sources that the
unit tests make); no GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python tools/perf_model.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from ouro.exporter import cuda_kernels as ck  # noqa: E402

KERNEL_OVERHEAD_US = 2.0
"""Launch + ramp-up + tail of one kernel (an assumption, applied to every kernel, ours and cuBLAS's alike)."""
CUBLAS_TILE = 128
"""Tile edge assumed for cuBLAS's wave efficiency."""
L_VIM = 197


@dataclass(frozen=True)
class Device:
    name: str
    cc: int
    sms: int
    dram_tb_s: float  # HBM / GDDR bandwidth, TB/s
    fp16_tflops: float  # dense fp16 tensor cores, fp32 accumulate (cuBLAS's and the fp16-outlier MMA's peak)
    s8_tops: float  # dense int8 tensor cores
    s4_tops: float | None  # dense int4 tensor cores (None: no int4 MMA)
    mma_sync_fraction: float  # of the dense peak that the kernels' mma.sync reaches (1 unless wgmma is needed)
    note: str


DEVICES = {
    # Datasheet numbers (dense, no sparsity). Hopper's peaks are wgmma's; the kernels here issue mma.sync, which
    # public microbenchmarks put at roughly half of them: MMA_SYNC_FRACTION_SM90 is that ASSUMPTION (no
    # measurement was made for this project). cuBLAS FP16 is priced at the full wgmma peak.
    "H100": Device("H100 SXM", 90, 132, 3.35, 989.4, 1978.9, None, 0.5, "mma.sync at 50% of the wgmma peak (assumed)"),
    "H200": Device("H200 SXM", 90, 132, 4.8, 989.4, 1978.9, None, 0.5, "mma.sync at 50% of the wgmma peak (assumed)"),
    "A100": Device("A100 SXM 80GB", 80, 108, 2.039, 312.0, 624.0, 1248.0, 1.0, ""),
    "L40S": Device("L40S", 89, 142, 0.864, 362.05, 733.0, 1466.0, 1.0, "int4 = 2x int8 (Ada)"),
}
MMA_SYNC_FRACTION_SM90 = 0.5

SHAPES = {  # (layer, K, N) of Vim-T/S/B: in_proj d_model -> 2 d_inner, out_proj d_inner -> d_model, x_proj
    "vim_t": [("in_proj", 192, 768), ("out_proj", 384, 192), ("x_proj", 384, 44)],
    "vim_s": [("in_proj", 384, 1536), ("out_proj", 768, 384), ("x_proj", 768, 56)],
    "vim_b": [("in_proj", 768, 3072), ("out_proj", 1536, 768), ("x_proj", 1536, 80)],
}


def peak_ops(dev: Device, kind: str | None) -> float:
    """Ops/s of an MMA kind on the device as the kernels issue it."""
    if kind is None:
        return math.inf
    tops = {"f16": dev.fp16_tflops, "s8": dev.s8_tops, "s4": dev.s4_tops}[kind]
    if tops is None:
        raise ValueError(f"{dev.name} has no {kind} MMA, but the plan uses it")
    return tops * 1e12 * dev.mma_sync_fraction


def wave_efficiency(ctas: int, sms: int) -> float:
    return ctas / (math.ceil(ctas / sms) * sms) if ctas else 1.0


@dataclass
class KernelTime:
    name: str
    grid: tuple[int, int, int]
    dram_mb: float
    mma_gop: float
    outlier_gop: float
    t_mem_us: float
    t_mma_us: float
    t_outlier_us: float
    t_us: float


def price_kernel(k: ck.KernelCost, dev: Device) -> KernelTime:
    bw = dev.dram_tb_s * 1e12
    t_mem = (k.dram_read_bytes + k.dram_write_bytes) / bw
    ctas = k.grid[0] * k.grid[1] * k.grid[2]
    eff = wave_efficiency(ctas, dev.sms) if k.mma_ops else 1.0
    t_in = k.mma_ops / (peak_ops(dev, k.mma_kind) * eff) if k.mma_ops else 0.0
    t_out = k.mma_ops_outlier / (peak_ops(dev, k.mma_kind_outlier) * eff) if k.mma_ops_outlier else 0.0
    t = max(t_mem, t_in + t_out) * 1e6 + KERNEL_OVERHEAD_US
    return KernelTime(k.name, k.grid, (k.dram_read_bytes + k.dram_write_bytes) / 1e6, k.mma_ops / 1e9,
                      k.mma_ops_outlier / 1e9, t_mem * 1e6, t_in * 1e6, t_out * 1e6, t)


def cublas_fp16_us(M: int, K: int, N: int, dev: Device) -> float:
    ctas = math.ceil(M / CUBLAS_TILE) * math.ceil(N / CUBLAS_TILE)
    t_mma = 2.0 * M * N * K / (dev.fp16_tflops * 1e12 * wave_efficiency(ctas, dev.sms))
    t_mem = 2.0 * (M * K + N * K + M * N) / (dev.dram_tb_s * 1e12)
    return max(t_mma, t_mem) * 1e6 + KERNEL_OVERHEAD_US


@dataclass
class Row:
    device: str
    model: str
    layer: str
    batch: int
    M: int
    K: int
    N: int
    path: str
    epilogue: str
    tactic: str | None
    kernels: list[KernelTime]
    ours_us: float
    cublas_us: float
    speedup: float
    outlier_share: float  # of ours_us: the outlier MMA slab + the bytes that only outliers need


def model_row(dev: Device, model: str, layer: str, B: int, K: int, N: int, args, lib) -> Row:
    M = B * L_VIM
    plan = ck.linear_plan(M, L_VIM, K, N, w_bits=args.w_bits, act_bits=args.act_bits, bits_outlier=args.bits_outlier,
                          n_refresh=args.n_refresh, cc=dev.cc, num_sms=dev.sms, window_channels=args.window_frac * K,
                          hot_channels=args.hot_frac * K, lib=lib)
    kernels = [price_kernel(k, dev) for k in plan.kernels]
    ours = sum(k.t_us for k in kernels)
    ob = 2 if args.bits_outlier >= 16 else 1
    outlier_bytes = M * args.window_frac * K * (2 * ob + 8)  # codes written + read, their slot entries
    outlier_us = sum(k.t_outlier_us for k in kernels) + outlier_bytes / (dev.dram_tb_s * 1e12) * 1e6
    cub = cublas_fp16_us(M, K, N, dev)
    return Row(dev.name, model, layer, B, M, K, N, plan.path, plan.epilogue, plan.tactic, kernels, ours, cub,
               cub / ours, outlier_us / ours)


def print_rows(rows: list[Row], dev: Device) -> None:
    print(f"\n== {dev.name} (sm_{dev.cc}, {dev.sms} SMs, {dev.dram_tb_s} TB/s, fp16 {dev.fp16_tflops} / int8 "
          f"{dev.s8_tops} / int4 {dev.s4_tops or '-'} dense T(FL)OPS{'; ' + dev.note if dev.note else ''})")
    hdr = (f"{'model':6} {'layer':8} {'B':>3} {'M':>6} {'K':>5} {'N':>5} {'tile':>8}  {'kernel':34} {'MB':>7} "
           f"{'GOP':>7} {'mem us':>7} {'mma us':>7} {'us':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        for i, k in enumerate(r.kernels):
            head = (f"{r.model:6} {r.layer:8} {r.batch:>3} {r.M:>6} {r.K:>5} {r.N:>5} {r.tactic or '-':>8}" if i == 0
                    else " " * 47)
            print(f"{head}  {k.name:34} {k.dram_mb:7.2f} {k.mma_gop + k.outlier_gop:7.2f} {k.t_mem_us:7.2f} "
                  f"{k.t_mma_us + k.t_outlier_us:7.2f} {k.t_us:7.2f}")
        print(f"{'':47}  {'= ours (' + r.epilogue + ', ' + r.path + ')':34} {'':7} {'':7} {'':7} {'':7} "
              f"{r.ours_us:7.2f}   cuBLAS FP16 {r.cublas_us:7.2f} us   speed-up {r.speedup:5.2f}x   "
              f"outlier share {100 * r.outlier_share:4.1f}%")


def sequence_summary(rows: list[Row], model: str, batch: int) -> dict | None:
    seq = [r for r in rows if r.model == model and r.batch == batch]
    if not seq:
        return None
    ours = sum(r.ours_us for r in seq)
    cub = sum(r.cublas_us for r in seq)
    share = sum(r.outlier_share * r.ours_us for r in seq) / ours
    return dict(model=model, batch=batch, layers=[r.layer for r in seq], ours_us=ours, cublas_us=cub,
                speedup=cub / ours, outlier_share=share)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", type=Path, default=None, help="kernel library (default: the binding's, build/trt)")
    ap.add_argument("--device", choices=sorted(DEVICES) + ["all"], default="all")
    ap.add_argument("--model", choices=sorted(SHAPES) + ["all"], default="all")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--act-bits", type=int, default=4)
    ap.add_argument("--bits-outlier", type=int, default=8)
    ap.add_argument("--n-refresh", type=int, default=10)
    ap.add_argument("--window-frac", type=float, default=0.02,
                    help="channels in one window's outlier list, as a fraction of K (default 2%%)")
    ap.add_argument("--hot-frac", type=float, default=0.04,
                    help="channels that are ever outliers, as a fraction of K (windows draw from these)")
    ap.add_argument("--sm90-mma-sync-fraction", type=float, default=MMA_SYNC_FRACTION_SM90,
                    help="assumed fraction of Hopper's wgmma peak reached by mma.sync (1.0 = what a wgmma path "
                         "would reach; no such path exists here)")
    ap.add_argument("--json", type=Path, default=None, help="also write every row as JSON")
    args = ap.parse_args(argv)
    try:
        lib = ck.open_library(args.lib) if args.lib else ck.load_library()
    except ck.KernelUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    devices = sorted(DEVICES) if args.device == "all" else [args.device]
    models = sorted(SHAPES) if args.model == "all" else [args.model]
    print(f"W{args.w_bits}A{args.act_bits}, outliers {args.bits_outlier}-bit, n_refresh {args.n_refresh}, outlier "
          f"list {100 * args.window_frac:.1f}% of K per window from {100 * args.hot_frac:.1f}% hot channels; "
          f"per-kernel overhead {KERNEL_OVERHEAD_US} us; predictions from datasheet rooflines, not measurements")
    out: list[dict] = []
    summaries = []
    for name in devices:
        d = DEVICES[name]
        if d.cc == 90:
            d = Device(**{**asdict(d), "mma_sync_fraction": args.sm90_mma_sync_fraction})
        rows = [model_row(d, m, layer, B, K, N, args, lib) for m in models for B in args.batch
                for layer, K, N in SHAPES[m]]
        print_rows(rows, d)
        for m in models:
            for B in args.batch:
                s = sequence_summary(rows, m, B)
                if s:
                    s["device"] = d.name
                    summaries.append(s)
                    print(f"   {m} batch {B}, {'+'.join(s['layers'])}: ours {s['ours_us']:.1f} us, cuBLAS FP16 "
                          f"{s['cublas_us']:.1f} us, speed-up {s['speedup']:.2f}x, outlier share "
                          f"{100 * s['outlier_share']:.1f}%")
        out += [dict(asdict(r), kernels=[asdict(k) for k in r.kernels]) for r in rows]
    if args.json:
        args.json.write_text(json.dumps(dict(rows=out, sequences=summaries), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
