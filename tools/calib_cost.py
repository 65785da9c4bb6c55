"""Cost of calibration alone (OuroMamba W4A4 by default), before and after the fast outlier fake-quant.

    python tools/calib_cost.py [--models vim_tiny,vim_small] [--images 128] [--blocks 1] [--preset w4a4]
                               [--threads N] [--device cpu]

`calibrate()` runs on the first `--blocks` blocks of a random-weight model (every block of a Vim does
the same work, so the full model costs depth / blocks times as much; the table says which numbers are
scaled), on the same `--images` noise images, twice: "before" with each OutlierActQuantizer calling the
previous implementation (`outlier_quant_ref` -> x_hat: every code, mask and per-window stack built,
the whole recurrence under autograd), "after" with `outlier_fake_quant` (the mask recurrence without
gradient, x_hat in one vectorised pass; the same x_hat bit for bit). Reported: CPU seconds (process
time) and wall seconds, per block and scaled to the whole model, and the speed-up. The machine's
load average is printed: CPU-seconds on a loaded machine are inflated for both runs.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

from ouro.calib.imagefolder import make_forward_loop
from ouro.calib.models.vim import ARCHS, build_model
from ouro.calib.quant import calibrate
from ouro.calib.quant.ouromamba import OutlierActQuantizer
from ouro.calib.quantizers import outlier_fake_quant, outlier_quant_ref
from ouro.recipes import get_preset


def _ref_fake_quant(x, s, bi, bo, n, policy, *, k_sigma, theta, std_correction, return_mask):
    r = outlier_quant_ref(x, s, bi, bo, n, policy, k_sigma=k_sigma, theta=theta, std_correction=std_correction)
    return (r.x_hat, r.outlier_mask) if return_mask else r.x_hat


IMPLS = {"before": staticmethod(_ref_fake_quant), "after": staticmethod(outlier_fake_quant)}


def measure(name: str, images: int, blocks: int, preset: str, device: str) -> dict:
    cfg = ARCHS[name]
    torch.manual_seed(0)
    model = build_model(replace(cfg, depth=blocks)).to(device).eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(images, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g, device="cpu")
    recipe = get_preset(preset)
    out = {}
    saved = OutlierActQuantizer.__dict__["fake_quant"]
    try:
        for k, impl in IMPLS.items():
            OutlierActQuantizer.fake_quant = impl
            c0, w0 = time.process_time(), time.perf_counter()
            calibrate(model, recipe, make_forward_loop(x), seed=0, progress=False)
            out[k] = (time.process_time() - c0, time.perf_counter() - w0)
    finally:
        OutlierActQuantizer.fake_quant = saved
    scale = cfg.depth / blocks
    return {"model": name, "images": images, "blocks": blocks, "depth": cfg.depth,
            "before": out["before"], "after": out["after"], "scale": scale}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vim_tiny,vim_small")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=1, help="blocks actually calibrated (the rest is scaled)")
    ap.add_argument("--preset", default="w4a4")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [measure(m.strip(), a.images, a.blocks, a.preset, a.device) for m in a.models.split(",") if m.strip()]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"calibrate(), OuroMamba {a.preset.upper()}, {a.images} images, device {a.device}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, torch {torch.__version__}; "
          f"{a.blocks} block(s) measured, whole-model columns scaled by depth / blocks")
    print()
    print("| model | CPU-s per block, before | CPU-s per block, after | speed-up | whole model CPU-s, before / after (scaled) "
          "| wall s per block, before / after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b, f = r["before"], r["after"]
        print(f"| {r['model']} | {b[0] / r['blocks']:.1f} | {f[0] / r['blocks']:.1f} | {b[0] / f[0]:.2f}x "
              f"| {b[0] * r['scale']:.0f} / {f[0] * r['scale']:.0f} | {b[1] / r['blocks']:.1f} / {f[1] / r['blocks']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
