"""Benchmark of the outlier-split linear (ouro CUDA kernels) against cuBLAS FP16 and a plain INT8 GEMM.

Every timing replays a CUDA graph of --reps back-to-back launches (no host gaps, no per-call setup: the kernels
are launched through `outlier_linear_launcher`, whose call is one ctypes call), measured with CUDA events, the
median of --iters replays. Rows: the fused path with its automatic tile (and every tile with --tactics), the
separate five-kernel variant, torch.matmul in fp16 (cuBLAS) and torch._int_mm (INT8 x INT8 -> INT32, no
quantization work). Each ouro configuration is checked once against the reference before it is timed.

    python tools/bench_gemm.py                      # Vim-T/S/B in_proj, out_proj, x_proj at batch 1 and 32
    python tools/bench_gemm.py --model vim_b --batch 32 --tactics --json bench.json
    python tools/bench_gemm.py --model vmamba           # VMamba-T/S/B per stage (--model all: both families)
    python tools/bench_gemm.py --model all --list      # print the shape table only (no GPU needed)
    python tools/bench_gemm.py --peak-tops 1979     # override the INT8 peak used for the % column

Needs a CUDA GPU and the built library (see ouro.exporter.cuda_kernels). The numbers are measurements of the GPU
it runs on; nothing in this repository was measured on a GPU when it was written.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "gpu"))

from kernel_cases import linear_ref, make_linear_case  # noqa: E402

from ouro.calib.models.vmamba import VMAMBA_ARCHS, VMambaConfig  # noqa: E402
from ouro.exporter import cuda_kernels as ck  # noqa: E402

L_VIM = 197


def vmamba_shapes(cfg: VMambaConfig) -> list[tuple[str, int, int, int]]:
    """(layer, L, K, N) of a VMamba's large linears per stage s (tokens L = grid**2 at the config's img_size):
    in_proj (dim -> d_inner, no gate in the released v05_noz), out_proj (d_inner -> dim), MLP fc1 (dim ->
    hidden) and fc2 (back). x_proj / dt_proj (N or K = dt_rank + 2 d_state, a few channels) are left out."""
    out: list[tuple[str, int, int, int]] = []
    for s, g in enumerate(cfg.grids):
        dim, di, hid = cfg.dims[s], cfg.d_inner(s), cfg.mlp_hidden(s)
        for layer, K, N in (("in_proj", dim, di), ("out_proj", di, dim), ("fc1", dim, hid), ("fc2", hid, dim)):
            if K and N:
                out.append((f"s{s + 1}.{layer}", g * g, K, N))
    return out


SHAPES = {  # (layer, L, K, N): Vim-T/S/B in_proj, out_proj, x_proj (L 197); VMamba-T/S/B per stage
    "vim_t": [("in_proj", L_VIM, 192, 768), ("out_proj", L_VIM, 384, 192), ("x_proj", L_VIM, 384, 44)],
    "vim_s": [("in_proj", L_VIM, 384, 1536), ("out_proj", L_VIM, 768, 384), ("x_proj", L_VIM, 768, 56)],
    "vim_b": [("in_proj", L_VIM, 768, 3072), ("out_proj", L_VIM, 1536, 768), ("x_proj", L_VIM, 1536, 80)],
    **{f"vmamba_{size[0]}": vmamba_shapes(VMAMBA_ARCHS[f"vmamba_{size}"]) for size in ("tiny", "small", "base")},
}
GROUPS = {"vim": ["vim_t", "vim_s", "vim_b"], "vmamba": ["vmamba_t", "vmamba_s", "vmamba_b"], "all": sorted(SHAPES)}
"""--model groups; the default `vim` is what tools/device_check.sh times."""
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


def graph_time_ms(fn, reps: int, iters: int) -> float:
    """Median time of one fn() call: a CUDA graph of `reps` calls, replayed `iters` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up (also lazy initialisation) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return statistics.median(times)


@dataclass
class Row:
    model: str
    layer: str
    B: int
    L: int
    K: int
    N: int
    config: str  # "fused/<tile>", "separate", "cublas_fp16", "int8_mm"
    path: str
    ms: float
    tops: float
    vs_fp16: float
    outlier_rate: float
    steps_ms: list[float]


def bench_shape(model: str, layer: str, B: int, L: int, K: int, N: int, args) -> list[Row]:
    M = B * L
    c = make_linear_case(B, L, K, N, w_bits=args.w_bits, act_bits=args.act_bits, bits_outlier=args.bits_outlier,
                         n_refresh=args.n_refresh, outlier_frac=args.outlier_frac, seed=K * 31 + N).to("cuda")
    act = c.act()
    y_ref = linear_ref(c).y
    rate = 0.0
    configs = [("fused", "auto")]
    if args.tactics:
        configs += [("fused", t) for t in ck.tactic_names()]
    configs.append(("separate", "auto"))
    rows = []
    ops = 2.0 * M * K * N
    x2 = c.x.reshape(M, K)
    wf = torch.randn(N, K, device="cuda", dtype=torch.float16)
    out16 = torch.empty(M, N, device="cuda", dtype=torch.float16)
    fp16_ms = graph_time_ms(lambda: torch.matmul(x2, wf.t(), out=out16), args.reps, args.iters)
    for epi, tactic in configs:
        res = ck.outlier_linear(c.x, c.w, c.w_scale, act, w_bits=c.w_bits, bias=c.bias, epilogue=epi,
                                tactic=0 if tactic == "auto" else tactic, debug=True)
        if not torch.equal(res.y, y_ref.to(res.y.dtype)) and c.bits_outlier < 16:
            raise SystemExit(f"{model} {layer} B={B}: {epi}/{tactic} differs from the reference; not timing it")
        rate = float(res.outlier_mask.float().mean())
        launch, lres = ck.outlier_linear_launcher(c.x, c.w, c.w_scale, act, w_bits=c.w_bits, bias=c.bias,
                                                  epilogue=epi, tactic=0 if tactic == "auto" else tactic)
        ms = graph_time_ms(launch, args.reps, args.iters)
        prof = ck.outlier_linear_profiled(c.x, c.w, c.w_scale, act, w_bits=c.w_bits, bias=c.bias, epilogue=epi,
                                          tactic=0 if tactic == "auto" else tactic)
        name = f"fused/{lres.tactic}" if epi == "fused" and tactic == "auto" else (
            f"fused/{tactic}" if epi == "fused" else "separate")
        rows.append(Row(model, layer, B, L, K, N, name + (" (auto)" if tactic == "auto" and epi == "fused" else ""),
                        lres.path, ms, ops / (ms * 1e-3) / 1e12, fp16_ms / ms, rate, prof.step_ms))
    rows.append(Row(model, layer, B, L, K, N, "cublas_fp16", "-", fp16_ms, ops / (fp16_ms * 1e-3) / 1e12, 1.0, rate, []))
    a8 = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
    b8 = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    try:
        torch._int_mm(a8, b8.t())
        i8 = graph_time_ms(lambda: torch._int_mm(a8, b8.t()), args.reps, args.iters)
        rows.append(Row(model, layer, B, L, K, N, "int8_mm", "-", i8, ops / (i8 * 1e-3) / 1e12, fp16_ms / i8, rate, []))
    except RuntimeError as e:  # cuBLASLt int8 shape constraints (M > 16, K and N multiples of 8)
        print(f"  torch._int_mm unavailable for M={M}, K={K}, N={N}: {e}", file=sys.stderr)
    return rows


def print_table(rows: list[Row], peak: float | None) -> None:
    print(f"\nINT8 peak used: {peak if peak else 'unknown (pass --peak-tops)'} TOPS; steps: {' / '.join(ck.STEP_NAMES)}")
    hdr = (f"{'model':8} {'layer':11} {'B':>3} {'L':>5} {'K':>5} {'N':>5} {'config':22} {'path':>18} {'outl%':>6} {'ms':>9} "
           f"{'TOPS':>7} {'%peak':>6} {'vs fp16':>8}  step ms")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        pct = f"{100 * r.tops / peak:6.1f}" if peak else f"{'-':>6}"
        steps = " ".join(f"{s:.4f}" for s in r.steps_ms)
        print(f"{r.model:8} {r.layer:11} {r.B:>3} {r.L:>5} {r.K:>5} {r.N:>5} {r.config:22} {r.path:>18} {100 * r.outlier_rate:6.2f} "
              f"{r.ms:9.5f} {r.tops:7.1f} {pct} {r.vs_fp16:7.2f}x  {steps}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES) + sorted(GROUPS), default="vim")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--w-bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--act-bits", type=int, default=4)
    ap.add_argument("--bits-outlier", type=int, default=8)
    ap.add_argument("--n-refresh", type=int, default=10)
    ap.add_argument("--outlier-frac", type=float, default=0.02, help="fraction of spiky channels in the input")
    ap.add_argument("--reps", type=int, default=20, help="launches per CUDA graph")
    ap.add_argument("--iters", type=int, default=20, help="graph replays (median)")
    ap.add_argument("--tactics", action="store_true", help="also time every tile of the fused GEMM")
    ap.add_argument("--peak-tops", type=float, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--list", action="store_true", help="print the (model, layer, B, L, K, N) shape table and exit")
    args = ap.parse_args(argv)
    models = GROUPS.get(args.model, [args.model])
    if args.list:
        print(f"{'model':<9} {'layer':<11} {'B':>3} {'L':>5} {'K':>5} {'N':>5} {'M':>7}")
        for m in models:
            for B in args.batch:
                for layer, L, K, N in SHAPES[m]:
                    print(f"{m:<9} {layer:<11} {B:>3} {L:>5} {K:>5} {N:>5} {B * L:>7}")
        return 0
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
    cc = "".join(map(str, torch.cuda.get_device_capability()))
    print(f"device: {name} (sm_{cc}), W{args.w_bits}A{args.act_bits}, outliers {args.bits_outlier}-bit, "
          f"n_refresh {args.n_refresh}; CUDA graphs of {args.reps} launches, median of {args.iters}")
    rows = []
    for m in models:
        for B in args.batch:
            for layer, L, K, N in SHAPES[m]:
                rows += bench_shape(m, layer, B, L, K, N, args)
    for m in models:
        print(f"\n== {m} ==", end="")
        print_table([r for r in rows if r.model == m], peak)
    if args.json:
        args.json.write_text(json.dumps(dict(device=name, sm=cc, rows=[asdict(r) for r in rows]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
