"""Benchmark of the outlier-split GEMM (ouro CUDA kernels) against cuBLAS FP16 and a plain INT8 GEMM.

Prints one table per shape set: the ouro pipeline (W4A4 by default) vs `torch.matmul` in fp16 and
`torch._int_mm` (INT8 x INT8 -> INT32, no quantization work), with TOPS, % of the GPU's dense INT8
tensor-core peak, the speed-up over FP16, the time share of the five pipeline steps (seed Fig. 1, from
`outlier_linear_profiled`) and the outlier rate (fraction of (token, channel) entries in the outlier list).
One row per epilogue: `fused` (dequantization in the CUTLASS GEMM epilogue, outlier GEMM + combine in one
kernel) and `separate` (the five-kernel pipeline with int32 accumulators in memory).

    python tools/bench_gemm.py                      # Vim-T/S/B linear shapes, batch 1 and 32
    python tools/bench_gemm.py --model vim_b --batch 32 --outlier-frac 0.013
    python tools/bench_gemm.py --peak-tops 1979     # override the INT8 peak used for the % column
    python tools/bench_gemm.py --epilogue fused     # only the fused epilogue

Needs a CUDA GPU and the built library (see ouro.exporter.cuda_kernels). Timings: CUDA events,
median of --iters runs after --warmup runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

import torch

from ouro.calib.quantizers import outlier_quant_ref, pack_int4, qmax
from ouro.exporter import cuda_kernels as ck

L_VIM = 197
SHAPES = {  # (K, N) of the Vim linear layers: in_proj (d_model -> 2 d_inner), out_proj (d_inner -> d_model)
    "vim_t": [(192, 768), (384, 192)],
    "vim_s": [(384, 1536), (768, 384)],
    "vim_b": [(768, 3072), (1536, 768)],
}
INT8_PEAK_TOPS = {  # dense INT8 tensor-core peak (vendor data sheets), matched by substring of the name
    "H200": 1979.0,
    "H100 SXM": 1979.0,
    "H100 NVL": 1671.0,
    "H100 PCIe": 1513.0,
    "H100": 1513.0,
    "A100": 624.0,
    "L40S": 733.0,
    "L40": 362.0,
    "RTX 4090": 660.6,
    "A10": 250.0,
}


def int8_peak(name: str) -> float | None:
    for key, tops in INT8_PEAK_TOPS.items():
        if key in name:
            return tops
    return None


def time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


@dataclass
class Row:
    B: int
    K: int
    N: int
    path: str
    epilogue: str
    outlier_rate: float
    ouro_ms: float
    fp16_ms: float
    int8_ms: float | None
    steps_ms: list[float]


def bench_shape(B: int, K: int, N: int, args) -> list[Row]:
    g = torch.Generator().manual_seed(K * 31 + N)
    x = torch.randn(B, L_VIM, K, generator=g)
    n_out = round(args.outlier_frac * K)
    if n_out:
        x[..., torch.randperm(K, generator=g)[:n_out]] *= 12.0
    x = x.half().cuda()
    qi = qmax(args.act_bits)
    scale = (3.0 * x.float().std(dim=(0, 2)) / qi).contiguous()
    qw = qmax(args.w_bits)
    w_codes = torch.randint(-qw, qw + 1, (N, K), generator=g, dtype=torch.int8)
    w = (pack_int4(w_codes) if args.w_bits == 4 else w_codes).cuda()
    w_scale = (torch.rand(N, generator=g) * 0.01 + 1e-3).cuda()
    act = ck.ActQuant(args.act_bits, args.bits_outlier, args.n_refresh, scale)
    rate = float(outlier_quant_ref(x, scale, args.act_bits, args.bits_outlier, args.n_refresh).outlier_mask.float().mean())

    runs = []
    for epi in (["fused", "separate"] if args.epilogue == "both" else [args.epilogue]):
        ck.outlier_linear(x, w, w_scale, act, w_bits=args.w_bits, epilogue=epi)  # checks capacity once
        launch, res = ck.outlier_linear_launcher(x, w, w_scale, act, w_bits=args.w_bits, epilogue=epi)
        ouro_ms = time_ms(launch, args.warmup, args.iters)
        steps = [0.0] * 5
        for _ in range(args.profile_iters):
            prof = ck.outlier_linear_profiled(x, w, w_scale, act, w_bits=args.w_bits, epilogue=epi)
            steps = [s + t / args.profile_iters for s, t in zip(steps, prof.step_ms)]
        runs.append((res.path, res.epilogue, ouro_ms, steps))

    x2 = x.reshape(-1, K)
    wf = torch.randn(N, K, device="cuda", dtype=torch.float16)
    fp16_ms = time_ms(lambda: torch.matmul(x2, wf.t()), args.warmup, args.iters)
    int8_ms = None
    a8 = torch.randint(-127, 128, (B * L_VIM, K), device="cuda", dtype=torch.int8)
    b8 = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    try:
        int8_ms = time_ms(lambda: torch._int_mm(a8, b8.t()), args.warmup, args.iters)
    except RuntimeError as e:  # shape constraints of cuBLASLt int8 (M > 16, K, N multiples of 8)
        print(f"  torch._int_mm unavailable for M={B * L_VIM}, K={K}, N={N}: {e}", file=sys.stderr)
    return [Row(B, K, N, path, epi, rate, ms, fp16_ms, int8_ms, steps) for path, epi, ms, steps in runs]


def print_table(rows: list[Row], peak: float | None) -> None:
    steps_hdr = " / ".join(ck.STEP_NAMES)
    print(f"\nINT8 peak used: {peak if peak else 'unknown (pass --peak-tops)'} TOPS; step shares: {steps_hdr}")
    hdr = (f"{'B':>3} {'K':>5} {'N':>5} {'M':>6} {'path':>18} {'epilogue':>8} {'outl%':>6} {'ouro ms':>8} {'fp16 ms':>8} "
           f"{'int8 ms':>8} {'ouro TOPS':>9} {'%peak':>6} {'vs fp16':>7}  step shares %")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        M = r.B * L_VIM
        ops = 2.0 * M * r.K * r.N
        tops = ops / (r.ouro_ms * 1e-3) / 1e12
        pct = f"{100 * tops / peak:6.1f}" if peak else f"{'-':>6}"
        total = sum(r.steps_ms) or 1.0
        shares = " ".join(f"{100 * s / total:4.1f}" for s in r.steps_ms)
        i8 = f"{r.int8_ms:8.4f}" if r.int8_ms is not None else f"{'-':>8}"
        print(f"{r.B:>3} {r.K:>5} {r.N:>5} {M:>6} {r.path:>18} {r.epilogue:>8} {100 * r.outlier_rate:6.2f} {r.ouro_ms:8.4f} "
              f"{r.fp16_ms:8.4f} {i8} {tops:9.1f} {pct} {r.fp16_ms / r.ouro_ms:6.2f}x  {shares}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES) + ["all"], default="all")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--w-bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--act-bits", type=int, default=4)
    ap.add_argument("--bits-outlier", type=int, default=8)
    ap.add_argument("--n-refresh", type=int, default=10)
    ap.add_argument("--outlier-frac", type=float, default=0.02, help="fraction of spiky channels in the input")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--profile-iters", type=int, default=5)
    ap.add_argument("--peak-tops", type=float, default=None)
    ap.add_argument("--epilogue", choices=("both", "fused", "separate", "auto"), default="both")
    args = ap.parse_args(argv)
    if not ck.available():
        try:
            ck.load_library()
        except ck.KernelUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("error: no CUDA GPU available; the benchmark needs one", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    peak = args.peak_tops or int8_peak(name)
    print(f"device: {name} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
          f"W{args.w_bits}A{args.act_bits}, outliers {args.bits_outlier}-bit, n_refresh {args.n_refresh}")
    models = sorted(SHAPES) if args.model == "all" else [args.model]
    from tqdm import tqdm

    jobs = [(m, B, K, N) for m in models for B in args.batch for K, N in SHAPES[m]]
    rows = [bench_shape(B, K, N, args) for _, B, K, N in tqdm(jobs, desc="shapes", leave=False)]
    for m in models:
        print(f"\n== {m} ==", end="")
        print_table([r for (mm, *_), rs in zip(jobs, rows) if mm == m for r in rs], peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
