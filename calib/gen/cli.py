"""`ouro-export gen CKPT|--demo -n 128 -o synth/ [--config gen.toml] [--seed S] [--force]`."""
from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from .config import GenConfig
from .generate import generate, save_synthetic_dir


class UserError(ValueError):
    """A bad `ouro-export gen` request; printed as one line (exit code 2)."""

    user_facing = True


def gen_main(model: nn.Module, args: argparse.Namespace) -> int:
    """Generate args.num_images synthetic images with OuroMamba-Gen and write PNGs + images.npz."""
    if args.num_images < 1:
        raise UserError(f"-n/--num-images must be >= 1, got {args.num_images}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UserError(f"output folder {out} is not empty; pass --force to overwrite")
    try:
        cfg = GenConfig.from_toml(args.config) if getattr(args, "config", None) else GenConfig()
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from e
    res = generate(model, args.num_images, seed=args.seed, config=cfg)
    save_synthetic_dir(res, out, force=True)
    n = res.images.shape[0]
    print(f"OuroMamba-Gen: {n} images in {res.seconds:.1f} s ({res.seconds / n:.2f} s/image, G={cfg.iterations}) -> {out}/")
    return 0
