"""Benchmark the selective scan: reference vs the fast chunked CPU path, forward and forward+backward.

    python tools/bench_scan.py [--repeat 3] [--threads N]

Prints one table row per (shape, pass) with the best wall time of each path (the minimum of
--repeat runs: robust on a shared machine), their ratio and the
max abs difference of the outputs. Shapes: Vim-S (B 8, L 197, D 768, S 16), the demo model
(training batch 128, L 17, D 192, S 16) and one scan direction of VMamba-T's first and last stage
(d_state 1). On a machine shared with other jobs, --threads 1 gives steadier numbers (two OpenMP
threads stall each other when a core is taken away)."""
from __future__ import annotations

import argparse
import time

import torch

from ouro.calib.scan import selective_scan_chunked, selective_scan_ref

SHAPES = {  # name: (B, L, D, S)
    "vim_s": (8, 197, 768, 16),
    "demo": (128, 17, 192, 16),
    "vmamba_t_stage1": (1, 56 * 56, 96, 1),  # VMamba-T at 224: one direction of a stage-1 block (d_state 1)
    "vmamba_t_stage4_b32": (32, 7 * 7, 768, 1),
}


def make_inputs(B: int, L: int, D: int, S: int, grad: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = dict(
        u=torch.randn(B, L, D, generator=g),
        delta=torch.randn(B, L, D, generator=g) - 1.0,
        A=-torch.exp(torch.randn(D, S, generator=g) * 0.5 + 0.5),
        Bm=torch.randn(B, L, S, generator=g),
        Cm=torch.randn(B, L, S, generator=g),
        Dskip=torch.randn(D, generator=g),
        z=torch.randn(B, L, D, generator=g),
    )
    return {k: v.requires_grad_(grad) for k, v in t.items()}


def timed(fn, repeat: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def run_pass(scan, inputs: dict[str, torch.Tensor], backward: bool) -> torch.Tensor:
    if not backward:
        with torch.no_grad():
            return scan(**inputs, reverse=False)
    y = scan(**inputs, reverse=False)
    y.sum().backward()
    return y.detach()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeat}")
    print(f"{'shape':<8} {'B,L,D,S':<18} {'pass':<9} {'ref ms':>9} {'fast ms':>9} {'speed-up':>9} {'max|diff|':>10}")
    for name, shp in SHAPES.items():
        for backward in (False, True):
            inputs = make_inputs(*shp, grad=backward)
            t_ref, y_ref = timed(lambda: run_pass(selective_scan_ref, inputs, backward), args.repeat)
            t_fast, y_fast = timed(lambda: run_pass(selective_scan_chunked, inputs, backward), args.repeat)
            diff = (y_ref - y_fast).abs().max().item()
            label = "fwd+bwd" if backward else "fwd"
            print(f"{name:<8} {','.join(map(str, shp)):<18} {label:<9} {t_ref * 1e3:9.1f} {t_fast * 1e3:9.1f} "
                  f"{t_ref / t_fast:8.1f}x {diff:10.2e}")


if __name__ == "__main__":
    main()
