"""Outlier-detection ablation (seed Table 5) on the demo model: none / static (fixed list) / dynamic.

    python tools/ablate_outliers.py [--presets w4a4,w4a8] [--calib real:128] [--static-fraction 0.08]

none:    every channel is an inlier (static per-token scale only)
static:  a fixed offline list (the channels most often detected on the calibration set,
         `--static-fraction` of them) is always quantized as outliers
dynamic: OuroMamba's per-token detection, refreshed every n_refresh tokens (the product)
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from ouro.calib.imagefolder import calibration_images, make_forward_loop, parse_calib_spec
from ouro.calib.quant import calibrate
from ouro.recipes import OuroMambaParams, get_preset

MODES = ("none", "static", "dynamic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--presets", default="w4a4")
    ap.add_argument("--calib", default="real:128")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--static-fraction", type=float, default=0.08)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from ouro.calib.data import load_digits_split
    from quant_accuracy import load_model

    from ouro.calib.metrics import logits, sqnr_db, top1

    model = load_model(a.checkpoint)
    xt, yt = load_digits_split("test")
    images = calibration_images(model, parse_calib_spec(a.calib), demo=True, seed=a.seed)
    loop = make_forward_loop(images)
    fp_logits = logits(model, xt)
    fp = top1(fp_logits, yt)
    rows = []
    print(f"FP top-1 {fp:.2f} %   calibration: {a.calib}   cells: top-1 % (SQNR of the logits vs FP, dB)")
    print(f"{'W/A':<6} " + " ".join(f"{m:>16}" for m in MODES))
    for p in a.presets.split(","):
        accs = []
        for mode in MODES:
            base = get_preset(p)
            r = base.with_(method_params=OuroMambaParams(
                inlier_granularity=base.method_params.inlier_granularity,
                outlier_detection=mode, static_outlier_fraction=a.static_fraction))
            t0 = time.perf_counter()
            q = calibrate(model, r, loop, seed=a.seed, progress=False)
            out = logits(q, xt)
            acc, sq = top1(out, yt), sqnr_db(fp_logits, out)
            accs.append(f"{acc:6.2f} ({sq:5.2f})")
            rows.append(dict(preset=p, detection=mode, top1=round(acc, 2), logit_sqnr_db=round(sq, 2), fp_top1=round(fp, 2),
                             calib_s=round(time.perf_counter() - t0, 1)))
        print(f"{p:<6} " + " ".join(f"{v:>16}" for v in accs), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
