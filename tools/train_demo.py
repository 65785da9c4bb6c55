"""Train the embedded demo Vim on the scikit-learn digits, deterministically, on the CPU.

    python tools/train_demo.py [--epochs 20] [--out calib/demo]

Same code path as Vim-T/S/B (ouro.calib.models.vim), smaller: 32x32 images, patch 8, stride 8
(16 patches + the middle CLS token), embed 96, depth 6. AdamW with a one-cycle schedule, +-2 px
random shifts, label smoothing 0.1. Writes <out>/vim_demo.pth in the official checkpoint format
({'model': state_dict}) and <out>/vim_demo.json, the card: config, split, seed, recipe, FP test
top-1 (measured by reloading the written checkpoint), training time.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ouro.calib.checkpoint import load_checkpoint
from ouro.calib.data import DEMO_CARD, DEMO_CHECKPOINT, SPLIT_SEED, SPLIT_SIZES, evaluate_top1, load_digits_split
from ouro.calib.models.vim import VimConfig, VisionMamba

DEMO_CONFIG = VimConfig(embed_dim=96, depth=6, img_size=32, patch_size=8, stride=8, num_classes=10, name="vim_demo_digits")
NO_WEIGHT_DECAY = ("A_log", "A_b_log", "D", "D_b", "pos_embed", "cls_token")  # as the official optimizer


@dataclass(frozen=True)
class TrainRecipe:
    epochs: int = 20
    batch_size: int = 64
    max_lr: float = 3e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    max_shift: int = 2
    seed: int = 0
    threads: int = 1  # fixed (reductions are deterministic for a fixed thread count); 1 is also the
    # fastest on a shared 2-core machine: 2 OpenMP threads competing with other jobs stall each other


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer offset in [-max_shift, max_shift]^2, filling with the background."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    bg = x.amin(dim=(1, 2, 3), keepdim=True)
    padded = F.pad(x - bg, (max_shift,) * 4) + bg
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=g)
    return torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(off.tolist())])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        (no_decay if p.dim() < 2 or leaf in NO_WEIGHT_DECAY else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(recipe: TrainRecipe, cfg: VimConfig = DEMO_CONFIG) -> tuple[VisionMamba, float]:
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    x_train, y_train = load_digits_split("train")
    x_test, y_test = load_digits_split("test")
    model = VisionMamba(cfg)
    opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.max_lr)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.max_lr, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch)
    g = torch.Generator().manual_seed(recipe.seed)
    t0 = time.perf_counter()
    bar = tqdm(range(recipe.epochs), desc="train demo", unit="epoch")
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        total = 0.0
        for i in range(0, len(perm), recipe.batch_size):
            idx = perm[i : i + recipe.batch_size]
            xb = random_shift(x_train[idx], recipe.max_shift, g)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        msg = f"epoch {epoch + 1:3d}  loss {total / len(x_train):.4f}"
        if (epoch + 1) % 5 == 0 or epoch + 1 == recipe.epochs:
            msg += f"  test top-1 {evaluate_top1(model, x_test, y_test, progress=False):.2f}%"
        tqdm.write(f"{msg}  ({time.perf_counter() - t0:.0f} s)")
    return model.eval(), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=TrainRecipe.epochs)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "calib" / "demo")
    args = ap.parse_args(argv)
    recipe = TrainRecipe(epochs=args.epochs)
    model, seconds = train(recipe)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / DEMO_CHECKPOINT
    torch.save({"model": model.state_dict()}, ckpt)
    reloaded = load_checkpoint(ckpt, arch=DEMO_CONFIG).eval()  # the card reports what ships
    x_test, y_test = load_digits_split("test")
    top1 = evaluate_top1(reloaded, x_test, y_test, desc="test top-1")
    card = {
        "name": DEMO_CONFIG.name,
        "config": DEMO_CONFIG.to_dict(),
        "data": "scikit-learn digits (1,797 real 8x8 images), bilinear to 32x32, 3 channels, train-normalised",
        "split": {"seed": SPLIT_SEED, **SPLIT_SIZES, "calib_is_subset_of": "train"},
        "seed": recipe.seed,
        "recipe": asdict(recipe),
        "fp_test_top1": top1,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "checkpoint_bytes": ckpt.stat().st_size,
    }
    (args.out / DEMO_CARD).write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {ckpt} ({card['checkpoint_bytes'] / 1e6:.2f} MB) and {DEMO_CARD}: FP test top-1 {top1:.2f}%, "
          f"trained in {seconds:.0f} s")


if __name__ == "__main__":
    main()
