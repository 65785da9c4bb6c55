"""Evaluation sets and predictions on the model's device, sharded over torchrun processes.

    data = EvalData.load(EvalSource.folder("val/", 224), dist)   # this rank's share of the images
    pred, labels = predict_all(model, data, dist)               # every image's prediction, global order

The metrics themselves (predict, top1, ...) are in ouro.calib.metrics. The evaluation set is cut into global batches of EVAL_BATCH images (by position in the sorted file
listing, or in the demo test split); rank r loads and runs the batches r, r + K, ...; the
predictions are gathered in batch order, so top-1 is exactly that of one process.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .distributed import SINGLE, DistContext
from .metrics import EVAL_BATCH, predict

__all__ = ["EVAL_BATCH", "EvalSource", "EvalData", "predict_all"]


@dataclass(frozen=True)
class EvalSource:
    """Where the labelled evaluation images come from: an ImageNet-style class-folder tree, or the
    demo's held-out digits."""

    kind: str  # "folder" | "demo"
    path: str | None = None
    img_size: int = 224

    def __post_init__(self) -> None:
        if self.kind not in ("folder", "demo"):
            raise ValueError(f"unknown evaluation source {self.kind!r}")
        if self.kind == "folder" and not self.path:
            raise ValueError("a folder evaluation source needs a path")

    @classmethod
    def folder(cls, path: str | Path, img_size: int) -> "EvalSource":
        return cls("folder", str(path), img_size)

    def size(self) -> int:
        """Number of items (files, or demo images) before unreadable files are skipped."""
        if self.kind == "demo":
            from .data import SPLIT_SIZES

            return SPLIT_SIZES["test"]
        from .imagefolder import count_image_files

        return count_image_files(self.path)

    def load(self, positions: list[int]) -> tuple[Tensor, Tensor]:
        """(images, labels) of the given item positions, on the CPU (unreadable files skipped)."""
        if self.kind == "demo":
            from .data import load_digits_split

            x, y = load_digits_split("test", self.img_size)
            idx = torch.tensor(positions, dtype=torch.long, device="cpu")
            return x[idx], y[idx]
        from .imagefolder import ImageFolderError, load_image_folder

        x, y = load_image_folder(self.path, img_size=self.img_size, select=positions)
        if y is None:
            raise ImageFolderError(f"--eval-dir {self.path}: needs one subfolder per class to know the labels")
        return x, y


@dataclass
class EvalData:
    """This rank's evaluation batches: {global batch index: (images, labels)} on the CPU."""

    source: EvalSource
    batches: dict[int, tuple[Tensor, Tensor]]
    total_batches: int

    @classmethod
    def load(cls, source: EvalSource, dist: DistContext = SINGLE) -> "EvalData":
        n = source.size()
        nb = -(-n // EVAL_BATCH)
        mine = dist.shard(range(nb))
        positions = [p for b in mine for p in range(b * EVAL_BATCH, min(n, (b + 1) * EVAL_BATCH))]
        x, y = source.load(positions) if positions else (torch.empty(0, device="cpu"), torch.empty(0, dtype=torch.long, device="cpu"))
        # keep each global batch together (skipped files shorten their batch only)
        out, i = {}, 0
        if source.kind == "demo" or len(x) == len(positions):
            for b in mine:
                k = min(n, (b + 1) * EVAL_BATCH) - b * EVAL_BATCH
                out[b] = (x[i:i + k], y[i:i + k])
                i += k
        else:  # some files were unreadable: batch boundaries no longer line up; keep one batch per rank
            out[mine[0]] = (x, y)
        return cls(source, out, nb)

    def images(self) -> Tensor:
        return torch.cat([v[0] for _, v in sorted(self.batches.items())]) if self.batches else torch.empty(0, device="cpu")

    def labels(self) -> Tensor:
        return torch.cat([v[1] for _, v in sorted(self.batches.items())]) if self.batches else torch.empty(0, dtype=torch.long, device="cpu")


def predict_all(model: nn.Module, data: EvalData, dist: DistContext = SINGLE, *, progress: bool = True,
                desc: str = "evaluate") -> tuple[Tensor, Tensor]:
    """(predictions, labels) of every evaluation image, in global order, on every rank."""
    mine = {}
    bar = tqdm(sorted(data.batches.items()), desc=desc, unit="batch", disable=not progress or not dist.is_main)
    for b, (x, y) in bar:
        mine[b] = (predict(model, x), y)
    merged: dict[int, tuple[Tensor, Tensor]] = {}
    for part in dist.all_gather(mine):
        merged.update(part)
    order = sorted(merged)
    if not order:
        return torch.empty(0, dtype=torch.long, device="cpu"), torch.empty(0, dtype=torch.long, device="cpu")
    return torch.cat([merged[b][0] for b in order]), torch.cat([merged[b][1] for b in order])
