"""Cost of one OuroMamba-Gen step, the fast path vs its `_ref` twin, side by side in one run.

    python tools/gen_cost.py [--models demo,vim_tiny,vim_small] [--batch 8] [--repeats 2] [--threads N]
                             [--device cpu|cuda] [--block 64]

For each model, both implementations (`gen_losses`, `gen_losses_ref`) take the same mini-batch
(same noise images and targets) through Gen steps (forward and backward of L^C + L^O, each with its
own automatic checkpointing, as a real run would); the first step of each is a warm-up, then
`--repeats` steps are timed alternately (ref, fast, ref, fast, ...) and the fastest of each is kept.
Reported: CPU seconds (process time, all threads) and wall seconds per image and step, the speed-up
(CPU-s ref / CPU-s fast), and the largest relative difference of L^C and of L^O over the images
(the issue's bar: 1e-4). The machine's load average is printed with the table: CPU-seconds on a
loaded machine are inflated for both, roughly alike. Random weights for Vim-T/S (the loop does the
same work whatever the weights); the embedded demo model for `demo`.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from ouro.calib.gen import GenConfig, gen_losses, gen_losses_ref
from ouro.calib.gen.losses import checkpointing, use_checkpoint
from ouro.calib.models.vim import ARCHS, build_model


def _model(name: str, device: str):
    if name == "demo":
        from ouro.calib.data import load_demo_model

        return load_demo_model(device=device)
    torch.manual_seed(0)
    return build_model(ARCHS[name]).to(device).eval()


def _step(fn, model, x0, t, cfg, dev) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    x = x0.clone().requires_grad_(True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    c0, w0 = time.process_time(), time.perf_counter()
    lc, lo, _ = fn(model, x, t, cfg)
    (lc + lo).sum().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.process_time() - c0, time.perf_counter() - w0, lc.detach().cpu(), lo.detach().cpu()


def measure(name: str, batch: int, repeats: int, device: str, block: int) -> dict:
    model = _model(name, device)
    for p in model.parameters():
        p.requires_grad_(False)
    dev = next(model.parameters()).device
    m = model.cfg
    cfg = GenConfig(attn_block=block)
    if m.in_chans != 3 or name == "demo":
        from ouro.calib.gen import input_normalization

        mean, std = input_normalization(model)
        cfg = cfg.replace(mean=mean, std=std)
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(batch, m.in_chans, m.img_size, m.img_size, generator=g, device="cpu").to(dev)
    t = torch.randint(m.num_classes, (batch,), generator=g, device="cpu").to(dev)
    impls = {"ref": gen_losses_ref, "fast": gen_losses}
    best = {k: (float("inf"), float("inf")) for k in impls}
    losses = {}
    for k, fn in impls.items():  # warm-up step of each (allocations, first-touch), also the loss values
        _, _, lc, lo = _step(fn, model, x0, t, cfg, dev)
        losses[k] = (lc, lo)
    for _ in range(repeats):
        for k, fn in impls.items():
            c, w, _, _ = _step(fn, model, x0, t, cfg, dev)
            best[k] = min(best[k], (c, w))
    rel = {}
    for i, term in enumerate(("LC", "LO")):
        ref, fast = losses["ref"][i], losses["fast"][i]
        rel[term] = float(((fast - ref).abs() / ref.abs().clamp_min(1e-30)).max())
    ck = checkpointing(model, batch, cfg)
    return {
        "model": name, "batch": batch,
        "ref_cpu": best["ref"][0] / batch, "fast_cpu": best["fast"][0] / batch,
        "ref_wall": best["ref"][1] / batch, "fast_wall": best["fast"][1] / batch,
        "speedup": best["ref"][0] / best["fast"][0], "rel": rel,
        "ck": f"ref {'on' if use_checkpoint(model, batch, cfg, ref=True) else 'off'}, fast block {'on' if ck.block else 'off'} / "
              f"readout {'on' if ck.rows else 'off'}",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,vim_tiny,vim_small", help="comma-separated: demo and/or " + ", ".join(ARCHS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block", type=int, default=GenConfig().attn_block, help="GenConfig.attn_block of the fast path")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [measure(name.strip(), a.batch, a.repeats, a.device, a.block) for name in a.models.split(",") if name.strip()]
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?", "?", "?")
    print(f"OuroMamba-Gen step cost, batch {a.batch}, device {a.device}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, "
          f"torch {torch.__version__}; fastest of {a.repeats} timed steps after a warm-up step")
    print()
    print("| model | CPU-s / image-step, ref | CPU-s / image-step, fast | speed-up (CPU-s) | wall s / image-step, ref / fast "
          "| max rel. diff L^C | max rel. diff L^O | checkpointing |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ref_cpu']:.3f} | {r['fast_cpu']:.3f} | {r['speedup']:.2f}x | {r['ref_wall']:.3f} / {r['fast_wall']:.3f} "
              f"| {r['rel']['LC']:.1e} | {r['rel']['LO']:.1e} | {r['ck']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
