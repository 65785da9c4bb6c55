"""Benchmark of the CUDA selective scan (ouroSelectiveScan) at the Vim shapes, next to its traffic model.

Times `ck.selective_scan` in CUDA graphs (median of --iters replays of --reps calls) for fp16 and fp32 I/O, plain
and with OuroMamba-quantized delta/B/C, and prints the bytes the launch plan (ouroSelectiveScanPlan) counts and the
bandwidth those bytes imply. Needs a CUDA GPU and the built library.

    python tools/bench_scan_cuda.py --json scan.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ouro.exporter import cuda_kernels as ck  # noqa: E402

SHAPES = {"vim_t": 384, "vim_s": 768, "vim_b": 1536}  # d_inner
L_VIM, S = 197, 16


def graph_time_ms(fn, reps: int, iters: int) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not ck.available():
        print("error: the CUDA scan benchmark needs a GPU and the built kernel library", file=sys.stderr)
        return 2
    cc = int("".join(map(str, torch.cuda.get_device_capability())))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    print(f"device: {torch.cuda.get_device_name()} (sm_{cc}); CUDA graphs of {args.reps} calls, median of {args.iters}")
    print(f"{'model':6} {'B':>3} {'dtype':>5} {'quant':>5} {'ms':>9} {'MB':>8} {'GB/s':>8}")
    for model, D in SHAPES.items():
        for B in args.batch:
            for dtype in (torch.float16, torch.float32):
                for quant in (False, True):
                    g = torch.Generator(device="cuda").manual_seed(0)
                    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
                    u, delta, z = r(B, L_VIM, D).to(dtype), (r(B, L_VIM, D) * 0.5 - 1).to(dtype), r(B, L_VIM, D).to(dtype)
                    Bm, Cm = r(B, L_VIM, S).to(dtype), r(B, L_VIM, S).to(dtype)
                    A, Dskip = -torch.rand(D, S, device="cuda", generator=g) - 0.5, r(D)
                    kw = {}
                    if quant:
                        sc = lambda x: (3 * x.float().std(dim=(0, 2)) / 7).contiguous()  # noqa: E731
                        kw = dict(delta_q=ck.ActQuant(4, 8, 10, sc(delta), k_sigma=4.0),
                                  b_q=ck.ActQuant(4, 8, 10, sc(Bm)), c_q=ck.ActQuant(4, 8, 10, sc(Cm)))
                    fn = lambda: ck.selective_scan(u, delta, A, Bm, Cm, Dskip, z, **kw)  # noqa: E731
                    ms = graph_time_ms(fn, args.reps, args.iters)
                    plan = ck.scan_plan(B, L_VIM, D, S, io_fp32=dtype == torch.float32, delta_bits=4 if quant else 0,
                                        b_bits=4 if quant else 0, c_bits=4 if quant else 0, cc=cc, num_sms=sms)
                    mb = sum(k.dram_read_bytes + k.dram_write_bytes for k in plan) / 1e6
                    rows.append(dict(model=model, B=B, dtype=str(dtype), quant=quant, ms=ms, mb=mb,
                                     gb_s=mb / ms, kernels=[k.name for k in plan]))
                    print(f"{model:6} {B:>3} {str(dtype)[6:]:>5} {str(quant):>5} {ms:9.4f} {mb:8.2f} {mb / ms:8.1f}")
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
