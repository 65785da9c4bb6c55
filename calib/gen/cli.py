"""What `ouro-export gen CKPT|--demo -n 128 -o synth/ [--config gen.toml] [--seed S] [--force] [--device D]` runs,
as a typed GenRequest (the flags are parsed by ouro.exporter.cli).

Writes each finished mini-batch as it goes; rerunning the same command on an interrupted folder
resumes it (storage.py). Under torchrun the mini-batches are shared out over the processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..distributed import SINGLE, DistContext
from .config import GenConfig
from .generate import generate_to_folder
from .storage import check_output_folder

__all__ = ["GenUsageError", "GenRequest", "gen_config", "gen_main"]


class GenUsageError(ValueError):
    """A bad `gen` argument; printed as one line by the CLI."""

    user_facing = True


def gen_config(path: str | None) -> GenConfig:
    """The GenConfig of `--config` (defaults when None); a bad file is a one-line GenUsageError."""
    try:
        return GenConfig.from_toml(path) if path else GenConfig()
    except (OSError, ValueError) as e:
        raise GenUsageError(str(e)) from e


@dataclass(frozen=True)
class GenRequest:
    """One `gen` run: num_images synthetic images into the folder `output` (PNGs + images.npz),
    seeded by `seed`; force: start over in a non-empty folder; config: the GenConfig."""

    num_images: int
    output: Path
    seed: int = 0
    force: bool = False
    config: GenConfig = field(default_factory=GenConfig)

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise GenUsageError(f"-n/--num-images must be >= 1, got {self.num_images}")
        object.__setattr__(self, "output", Path(self.output))

    def check_output(self) -> GenRequest:
        """The output folder can be written (ouro.calib.gen.storage.check_output_folder), before any work;
        returns self."""
        check_output_folder(self.output, force=self.force)
        return self


def gen_main(model: nn.Module, req: GenRequest, *, dist: DistContext = SINGLE) -> int:
    """Generate req.num_images synthetic images with OuroMamba-Gen into req.output (PNGs + images.npz)."""
    out, cfg = req.output, req.config
    res, resumed = generate_to_folder(model, req.num_images, out, seed=req.seed, config=cfg, force=req.force, dist=dist)
    if dist.is_main:
        n = res.images.shape[0]
        if not res.seconds:
            print(f"OuroMamba-Gen: {out}/ is already complete ({n} images); nothing to do")
        else:
            how = f", resumed after {resumed} finished mini-batch(es)" if resumed else ""
            print(f"OuroMamba-Gen: {n} images in {res.seconds:.1f} s ({res.seconds / n:.2f} s/image, G={cfg.iterations}){how} -> {out}/")
    return 0
