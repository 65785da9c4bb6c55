"""The embedded demo: scikit-learn digits as small RGB images, the shipped demo Vim, top-1 evaluation.

Data: the 1,797 real 8x8 handwritten digits bundled with scikit-learn (no download), upsampled
bilinearly to 32x32 (64x64 for the demo MambaVision), repeated to 3 channels, scaled to [0, 1]
and normalised with the train split's mean and std. The split is fixed (a seeded permutation,
independent of the machine and of the image size):

    train  1,300 images   (the demo model is trained on these)
    calib    256 images   a fixed subset of train: the calibration set of every recipe
    test     497 images   held out: FP and quantized top-1 are measured here
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .models.vim import VimConfig

__all__ = [
    "DEMO_CONFIG",
    "split_indices",
    "DIGITS_IMG_SIZE",
    "SPLIT_SIZES",
    "SPLIT_SEED",
    "load_digits_split",
    "demo_files",
    "demo_card",
    "load_demo_model",
    "evaluate_top1",
]

DIGITS_IMG_SIZE = 32
SPLIT_SEED = 0
N_TRAIN, N_CALIB = 1300, 256
SPLIT_SIZES = {"train": N_TRAIN, "calib": N_CALIB, "test": 1797 - N_TRAIN}
DEMO_CHECKPOINT, DEMO_CARD = "vim_demo.pth", "vim_demo.json"
DEMO_CONFIG = VimConfig(embed_dim=96, depth=6, img_size=DIGITS_IMG_SIZE, patch_size=8, stride=8, num_classes=10,
                        name="vim_demo_digits")
"""The demo model's architecture: the one source (tools/train_demo.py trains it; its card records it)."""


@lru_cache(maxsize=2)
def split_indices() -> dict[str, Tensor]:
    """Positions in scikit-learn's digits of each demo split ("train", "test", "calib"); fixed by SPLIT_SEED."""
    return _digits()[2]


def _digits(img_size: int = DIGITS_IMG_SIZE) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32, device="cpu").unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    y = torch.as_tensor(d.target, dtype=torch.int64, device="cpu")
    if len(y) != sum(SPLIT_SIZES[k] for k in ("train", "test")):
        raise RuntimeError(f"scikit-learn digits has {len(y)} images, expected 1797; the demo split needs the standard set")
    cpu = torch.device("cpu")
    g = torch.Generator(device=cpu).manual_seed(SPLIT_SEED)
    perm = torch.randperm(len(y), generator=g, device=cpu)
    train = perm[:N_TRAIN]
    idx = {"train": train, "test": perm[N_TRAIN:], "calib": train[torch.randperm(N_TRAIN, generator=g, device=cpu)[:N_CALIB]]}
    mean, std = x[train].mean(), x[train].std()
    x = ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()
    return x, y, idx


def load_digits_split(split: str, img_size: int = DIGITS_IMG_SIZE) -> tuple[Tensor, Tensor]:
    """Images (N, 3, img_size, img_size) float32 and labels (N,) int64 of one fixed split: train |
    calib | test. The split does not depend on img_size (32 for the demo Vim, 64 for the demo
    MambaVision, whose stem and stages divide the image by 32)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown digits split {split!r}; choose one of {', '.join(SPLIT_SIZES)}")
    if img_size < 8:
        raise ValueError(f"digits img_size must be >= 8 (the originals are 8x8), got {img_size}")
    x, y, idx = _digits(img_size)
    i = idx[split]
    return x[i].clone(), y[i].clone()


def _demo_spec(family: str):
    from .families import get_family

    fam = get_family(family)
    if fam.demo is None:
        from .families import all_families

        have = [f.name for f in all_families() if f.demo is not None]
        raise ValueError(f"model family {family!r} has no embedded demo model; demos: {', '.join(have)}")
    return fam, fam.demo


def demo_files(family: str = "vim") -> tuple[Path, Path]:
    """Paths of a family's shipped demo checkpoint and its JSON card (package data of ouro.calib)."""
    root = Path(str(resources.files("ouro.calib") / "demo"))
    _, spec = _demo_spec(family)
    return root / spec.checkpoint, root / spec.card


def demo_card(family: str = "vim") -> dict:
    """A demo model's card: config, split, seed, FP test top-1, training time."""
    _, card = demo_files(family)
    if not card.is_file():
        raise FileNotFoundError(f"demo card {card} is missing; run `python tools/train_demo.py --family {family}` to create it")
    return json.loads(card.read_text())


def load_demo_model(family: str = "vim", device: torch.device | str | None = None):
    """A shipped demo model (eval mode, on `device`; default the CPU; default the Vim demo), loaded
    through the same checkpoint loader as official files, with the architecture its card records
    (which must be the family's demo config)."""
    from .checkpoint import load_checkpoint

    fam, spec = _demo_spec(family)
    ckpt, _ = demo_files(family)
    card = fam.config_from_dict(demo_card(family)["config"])
    if card != spec.config:
        raise RuntimeError(f"the {fam.label} demo card's architecture {card} is not the family's demo config {spec.config}; "
                           f"retrain with tools/train_demo.py --family {family}")
    return load_checkpoint(ckpt, arch=spec.config, device=device).eval()


@torch.no_grad()
def evaluate_top1(model: torch.nn.Module, images: Tensor, labels: Tensor, batch_size: int = 128, *,
                  desc: str = "top-1", progress: bool = True) -> float:
    """Top-1 accuracy in percent of `model` on (images, labels), in batches, with a tqdm bar."""
    from tqdm.auto import tqdm

    from .metrics import top1

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("evaluate_top1 needs at least one image")
    from .device import module_device

    was_training = model.training
    model.eval()
    dev = module_device(model)
    try:
        out = [model(images[i : i + batch_size].to(dev)).cpu() for i in tqdm(range(0, len(images), batch_size), desc=desc,
                                                                          unit="batch", disable=not progress, leave=False)]
    finally:
        model.train(was_training)
    return top1(torch.cat(out), labels)
