"""`ouro-export gen CKPT|--demo -n 128 -o synth/ [--config gen.toml] [--seed S] [--force] [--device D]`.

Writes each finished mini-batch as it goes; rerunning the same command on an interrupted folder
resumes it (storage.py). Under torchrun the mini-batches are shared out over the processes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from ..distributed import SINGLE, DistContext
from .config import GenConfig
from .generate import generate_to_folder

__all__ = ["GenUsageError", "gen_config", "gen_main"]


class GenUsageError(ValueError):
    """A bad `gen` argument; printed as one line by the CLI."""

    user_facing = True


def gen_config(path: str | None) -> GenConfig:
    """The GenConfig of `--config` (defaults when None); a bad file is a one-line GenUsageError."""
    try:
        return GenConfig.from_toml(path) if path else GenConfig()
    except (OSError, ValueError) as e:
        raise GenUsageError(str(e)) from e


def gen_main(model: nn.Module, args: argparse.Namespace, *, dist: DistContext = SINGLE) -> int:
    """Generate args.num_images synthetic images with OuroMamba-Gen into args.output (PNGs + images.npz)."""
    if args.num_images < 1:
        raise GenUsageError(f"-n/--num-images must be >= 1, got {args.num_images}")
    out = Path(args.output)
    cfg = gen_config(getattr(args, "config", None))
    res, resumed = generate_to_folder(model, args.num_images, out, seed=args.seed, config=cfg,
                                      force=bool(args.force), dist=dist)
    if dist.is_main:
        n = res.images.shape[0]
        if not res.seconds:
            print(f"OuroMamba-Gen: {out}/ is already complete ({n} images); nothing to do")
        else:
            how = f", resumed after {resumed} finished mini-batch(es)" if resumed else ""
            print(f"OuroMamba-Gen: {n} images in {res.seconds:.1f} s ({res.seconds / n:.2f} s/image, G={cfg.iterations}){how} -> {out}/")
    return 0
