"""Cost of one OuroMamba-Gen step, the fast path vs its `_ref` twin, side by side in one run.

    python tools/gen_cost.py [--models demo,vim_tiny,vim_small] [--batch 8] [--repeats 2] [--threads N]
                             [--device cpu|cuda] [--block 64]
    python tools/gen_cost.py --models vmamba_tiny,mambavision_t --img-size 64 --batch 2   # other families
    python tools/gen_cost.py --models vmamba_tiny --fast-only --batch 1                    # 224 px, fast path only

For each model, both implementations (`gen_losses`, `gen_losses_ref`) take the same mini-batch
(same noise images and targets) through Gen steps (forward and backward of L^C + L^O, each with its
own automatic checkpointing, as a real run would); the first step of each is a warm-up, then
`--repeats` steps are timed alternately (ref, fast, ref, fast, ...) and the fastest of each is kept.
Reported: CPU seconds (process time, all threads) and wall seconds per image and step, the speed-up
(CPU-s ref / CPU-s fast), and the largest relative difference of L^C and of L^O over the images
(the issue's bar: 1e-4). The machine's load average is printed with the table: CPU-seconds on a
loaded machine are inflated for both, roughly alike. Random weights for Vim-T/S (the loop does the
same work whatever the weights); the embedded demo model for `demo`. Other families' architectures
(VMamba, MambaVision: any name `--arch` takes) run the generic Gen (`ouro.calib.gen.grid`): fast
`family_gen_losses` vs its twin `family_gen_losses_ref` (dense neighbourhood mix), optionally at a
smaller `--img-size` (the twin is O(L^3) in the tokens of a stage: hours a step at 224 px), or
`--fast-only`.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from ouro.calib.gen import GenConfig, gen_losses, gen_losses_ref
from ouro.calib.gen.losses import checkpointing, use_checkpoint
from ouro.calib.gen.grid import family_gen_losses, family_gen_losses_ref
from ouro.calib.models.vim import ARCHS, build_model

VIM_IMPLS = {"ref": gen_losses_ref, "fast": gen_losses}
GRID_IMPLS = {"ref": family_gen_losses_ref, "fast": family_gen_losses}


def _model(name: str, device: str, img_size: int | None):
    """(model, impls): Vim (demo and ARCHS) through its own Gen, any other family's architecture through grid.py."""
    if name == "demo":
        from ouro.calib.data import load_demo_model

        return load_demo_model(device=device), VIM_IMPLS
    torch.manual_seed(0)
    if name in ARCHS:
        return build_model(ARCHS[name]).to(device).eval(), VIM_IMPLS
    from dataclasses import replace

    from ouro.calib.families import family_for_arch

    fam, cfg = family_for_arch(name)
    if img_size:
        cfg = replace(cfg, img_size=img_size)
    return fam.build(cfg).to(device).eval(), GRID_IMPLS


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


def measure(name: str, batch: int, repeats: int, device: str, block: int, img_size: int | None = None,
            fast_only: bool = False) -> dict:
    model, impls = _model(name, device, img_size)
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
    if fast_only:
        impls = {"fast": impls["fast"]}
    best = {k: (float("inf"), float("inf")) for k in impls}
    losses = {}
    for k, fn in impls.items():  # warm-up step of each (allocations, first-touch), also the loss values
        _, _, lc, lo = _step(fn, model, x0, t, cfg, dev)
        losses[k] = (lc, lo)
    for _ in range(repeats):
        for k, fn in impls.items():
            c, w, _, _ = _step(fn, model, x0, t, cfg, dev)
            best[k] = min(best[k], (c, w))
    nan = float("nan")
    rel = {"LC": nan, "LO": nan}
    if "ref" in losses:
        for i, term in enumerate(("LC", "LO")):
            ref, fast = losses["ref"][i], losses["fast"][i]
            rel[term] = float(((fast - ref).abs() / ref.abs().clamp_min(1e-30)).max())
    if impls["fast"] is gen_losses:
        ck = checkpointing(model, batch, cfg)
        ck_text = (f"ref {'on' if use_checkpoint(model, batch, cfg, ref=True) else 'off'}, fast block {'on' if ck.block else 'off'} / "
                   f"readout {'on' if ck.rows else 'off'}")
    else:
        ck_text = "grid: readout recomputed where E is large (auto)"
    ref_best = best.get("ref", (nan, nan))
    label = name if img_size is None or impls["fast"] is gen_losses else f"{name} @ {m.img_size} px"
    return {
        "model": label, "batch": batch,
        "ref_cpu": ref_best[0] / batch, "fast_cpu": best["fast"][0] / batch,
        "ref_wall": ref_best[1] / batch, "fast_wall": best["fast"][1] / batch,
        "speedup": ref_best[0] / best["fast"][0], "rel": rel, "ck": ck_text,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,vim_tiny,vim_small", help="comma-separated: demo and/or " + ", ".join(ARCHS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block", type=int, default=GenConfig().attn_block, help="GenConfig.attn_block of the fast path")
    ap.add_argument("--img-size", type=int, default=None, help="input size of the non-Vim families' models (default: the arch's)")
    ap.add_argument("--fast-only", action="store_true", help="time the fast path only (no ref column, no speed-up)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [measure(name.strip(), a.batch, a.repeats, a.device, a.block, a.img_size, a.fast_only) for name in a.models.split(",") if name.strip()]
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
