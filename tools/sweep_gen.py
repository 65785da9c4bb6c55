"""Sweep the unpublished OuroMamba-Gen hyper-parameters (tau, lr, G) on the demo model; print a table.

    python tools/sweep_gen.py [--checkpoint CKPT] [-n 16] [--taus 0.1,0.2,0.5] [--lrs 0.05,0.1,0.25]
                              [--snapshots 25,50,100] [--calib-preset w4a4 --calib-method minmax]

One-at-a-time around the defaults (tau varies at the default lr, lr at the default tau); G is read
off each run at the --snapshots iteration counts (one run per (tau, lr)). For every snapshot:
    LC, LO       the loss terms at that step (LC is not comparable across tau)
    scale gap    how far the activation scales of the synthetic set are from the real calibration
                 set's: mean over layers, tokens and channels of |log2(rms_syn / rms_real)| of the
                 mixer inputs (RMS over images, per token and channel: the per-time-step statistics
                 static scales are calibrated from; RMS rather than max so that a small set is not
                 biased); 0 = same scales, 1 = a factor 2 off on average
    top-1        (with --calib-preset) test top-1 after calibrating on the snapshot's images
Reference rows: the Gaussian-noise start (G = 0) and a second real subset of the same size.

Measured 2026-11-23 on the shipped demo model (two processes, `--taus 0.1,0.2,0.5 --lrs 0.1` and
`--taus "" --lrs 0.05,0.25`, -n 16, snapshots 25,50,100, 1 thread): the table and the defaults
chosen from it are in the GenConfig docstring (calib/gen/config.py). Runtime: about 32 s per run
of 16 images x 25 steps (0.08 s per image-step) on the shared 2-core machine.
"""
from __future__ import annotations

import argparse
import time

import torch

from ouro.calib.data import evaluate_top1, load_digits_split
from ouro.calib.gen import GenConfig, generate


def mixer_rms(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Per layer: RMS over images of the mixer input, (L, d_model)."""
    got: list[torch.Tensor] = []
    hooks = [b.mixer.register_forward_pre_hook(lambda _m, a: got.append(a[0].detach().pow(2).mean(0).sqrt())) for b in model.layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return got


def scale_gap(model, x: torch.Tensor, ref: list[torch.Tensor]) -> float:
    s = mixer_rms(model, x)
    return float(torch.stack([(a.clamp_min(1e-6) / r.clamp_min(1e-6)).log2().abs().mean() for a, r in zip(s, ref)]).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="demo-config checkpoint (default: the shipped demo model)")
    ap.add_argument("-n", type=int, default=16, help="images per run (one mini-batch)")
    ap.add_argument("--taus", default="0.1,0.2,0.5")
    ap.add_argument("--lrs", default="0.05,0.1,0.25")
    ap.add_argument("--snapshots", default="25,50,100")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-preset", help="also calibrate on each snapshot and report test top-1 (slow)")
    ap.add_argument("--calib-method", default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from gen_table import load_model  # tools/ sibling

    model = load_model(a.checkpoint)
    base = GenConfig(batch_size=a.n)
    taus = [float(v) for v in a.taus.split(",") if v]
    lrs = [float(v) for v in a.lrs.split(",") if v]
    snaps = sorted(int(v) for v in a.snapshots.split(","))
    runs = [(t, base.lr) for t in taus] + [(base.tau, lr) for lr in lrs if lr != base.lr]
    runs = list(dict.fromkeys(runs))

    xr, _ = load_digits_split("calib")
    g = torch.Generator().manual_seed(a.seed)
    perm = torch.randperm(xr.shape[0], generator=g)
    real_a, real_b = xr[perm[: a.n]], xr[perm[a.n : 2 * a.n]]
    ref = mixer_rms(model, xr)  # the whole calibration split defines the target ranges
    xt, yt = load_digits_split("test")

    def top1(x):
        if not a.calib_preset:
            return float("nan")
        from ouro.calib.imagefolder import make_forward_loop
        from ouro.calib.quant import calibrate
        from ouro.recipes import resolve_recipe

        q = calibrate(model, resolve_recipe(preset=a.calib_preset, method=a.calib_method), make_forward_loop(x), seed=a.seed, progress=False)
        return evaluate_top1(q.module, xt, yt, progress=False)

    rows = [("real (other subset)", "-", "-", "-", float("nan"), float("nan"), scale_gap(model, real_b, ref), top1(real_b), 0.0)]
    noise = generate(model, a.n, a.seed, base.replace(iterations=0), progress=False).images
    rows.append(("noise (G=0)", "-", "-", 0, float("nan"), float("nan"), scale_gap(model, noise, ref), top1(noise), 0.0))
    for tau, lr in runs:
        cfg = base.replace(tau=tau, lr=lr, iterations=snaps[-1])
        shots: dict[int, tuple[dict, torch.Tensor]] = {}

        def cb(step, terms, x, _s=shots):
            if step + 1 in snaps:
                _s[step + 1] = (terms, x.clone())

        t0 = time.perf_counter()
        generate(model, a.n, a.seed, cfg, progress=False, callback=cb)
        secs = time.perf_counter() - t0
        for G in snaps:
            terms, x = shots[G]
            rows.append((f"tau={tau} lr={lr}", tau, lr, G, terms["LC"], terms["LO"], scale_gap(model, x, ref), top1(x), secs * G / snaps[-1]))
            print(rows[-1], flush=True)
    print(f"\n{a.n} images per run, seed {a.seed}; scale gap vs the {xr.shape[0]}-image real calibration split"
          + (f"; top-1 after {a.calib_method or 'ouromamba'} {a.calib_preset} calibration on the run's images" if a.calib_preset else ""))
    print("| run | tau | lr | G | LC | LO | scale gap | top-1 | gen s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
