"""Official-format Vim checkpoints with random weights, built with the project's own model.

    write_checkpoint(path, "vim_tiny")          # {'model': state_dict}, keys and shapes of hustvl/Vim
    write_checkpoint(path, TINY)                # any VimConfig
    write_image_folder(root, classes=2, per_class=3, size=40)   # ImageNet-style class folders of PNGs

The state_dict layout is the official one (tests/unit/test_model.py checks keys and shapes against
hustvl/Vim); the weights are the model's own random initialisation under a fixed seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ouro.calib.models.vim import ARCHS, VimConfig, VisionMamba

__all__ = ["TINY", "write_checkpoint", "write_image_folder"]

TINY = VimConfig(embed_dim=32, depth=2, img_size=32, patch_size=8, stride=8, num_classes=10, name="tiny")
"""4 x 4 patches + CLS (17 tokens): the smallest Vim that OuroMamba-Gen's L^C accepts."""


def write_checkpoint(path: str | Path, arch: str | VimConfig, seed: int = 0) -> Path:
    """Save {'model': state_dict} of a randomly initialised Vim (an ARCHS name or a VimConfig)."""
    cfg = ARCHS[arch] if isinstance(arch, str) else arch
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        sd = VisionMamba(cfg).state_dict()
    path = Path(path)
    torch.save({"model": sd}, path)
    return path


def write_image_folder(root: str | Path, classes: int = 2, per_class: int = 3, size: int = 40, seed: int = 0) -> Path:
    """root/<class>/<i>.png with random RGB content (an evaluation folder with labels)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root
