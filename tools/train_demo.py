"""Train an embedded demo model on the scikit-learn digits, deterministically, on the CPU.

    python tools/train_demo.py [--family vim|vmamba|mambavision] [--epochs N] [--out calib/demo]

One training loop for every model family; what differs (config, builder, reloader, file names,
weight-decay rule, default epochs) is the family's `DemoFamily` in FAMILIES:
  vim     same code path as Vim-T/S/B (ouro.calib.models.vim), smaller: 32x32 images, patch 8,
          stride 8 (16 patches + the middle CLS token), embed 96, depth 6 -> vim_demo.pth / .json
  vmamba  same code path as VMamba-T/S/B (ouro.calib.models.vmamba, forward type v05_noz, d_state 1,
          patch embed v2, downsample v3), smaller: 32x32 images, patch 4 (8x8 tokens), three stages
          depths (2, 2, 2), dims (32, 64, 128), ssm_ratio 2 -> vmamba_demo.pth / .json
  mambavision  same code path as MambaVision-T/T2/S/B (ouro.calib.models.mambavision), smaller:
          64x64 images (the stem and the stages divide by 32: feature maps 16, 8, 4, 2), dim 16
          (stages 16/32/64/128 wide, head dim 32), depths (1, 1, 2, 2): one Mamba mixer and one
          attention block per hybrid stage, one window per hybrid stage as the official models have
          at 224 (16 tokens in stage 2, 4 in stage 3); +-4 px shifts -> mambavision_demo.pth / .json
AdamW with a one-cycle schedule, +-2 px random shifts (at 32x32), label smoothing 0.1. Writes
<out>/<name>.pth in the family's official checkpoint format ({'model': state_dict}, which every
family's official loader reads) and <out>/<name>.json, the card: config, split, seed, recipe, FP
test top-1 (measured by reloading the written checkpoint), time. Images are the digits at the
family config's img_size.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ouro.calib.checkpoint import load_checkpoint
from ouro.calib.data import DEMO_CARD, DEMO_CHECKPOINT, DEMO_CONFIG, SPLIT_SEED, SPLIT_SIZES, evaluate_top1, load_digits_split
from ouro.calib.models.mambavision import MambaVision, MambaVisionConfig, load_mambavision
from ouro.calib.models.vim import VisionMamba
from ouro.calib.models.vmamba import VMambaConfig, VSSM, load_vmamba_state_dict

NO_WEIGHT_DECAY = ("A_log", "A_b_log", "D", "D_b", "pos_embed", "cls_token")  # as the official optimizer
VMAMBA_DEMO_CONFIG = VMambaConfig(depths=(2, 2, 2), dims=(32, 64, 128), img_size=32, patch_size=4, num_classes=10,
                                  d_state=1, ssm_ratio=2.0, conv_bias=False, gate=False, mlp_ratio=4.0,
                                  patch_embed="v2", downsample="v3", name="vmamba_demo_digits")
MAMBAVISION_DEMO_CONFIG = MambaVisionConfig(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4),
                                            window_size=(8, 8, 4, 2), img_size=64, num_classes=10,
                                            name="mambavision_demo_digits")


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


@dataclass(frozen=True)
class DemoFamily:
    """What a model family's demo needs; the training loop and the card are shared."""

    config: object  # the family's frozen config (its `name` names the demo)
    build: Callable[[], torch.nn.Module]  # a fresh model (random init) of `config`
    reload: Callable[[Path], torch.nn.Module]  # the written checkpoint, through the family's loader
    checkpoint: str  # file names under --out
    card: str
    no_decay: Callable[[str, torch.Tensor], bool]  # (parameter name, parameter) -> no weight decay
    recipe: TrainRecipe = TrainRecipe()


def vim_demo() -> DemoFamily:
    def no_decay(name: str, p: torch.Tensor) -> bool:
        return p.dim() < 2 or name.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY

    return DemoFamily(DEMO_CONFIG, lambda: VisionMamba(DEMO_CONFIG), lambda p: load_checkpoint(p, arch=DEMO_CONFIG),
                      DEMO_CHECKPOINT, DEMO_CARD, no_decay)


def vmamba_demo() -> DemoFamily:
    def no_decay(name: str, p: torch.Tensor) -> bool:  # VMamba's utils/optimizer.py set_weight_decay
        return p.dim() == 1 or name.endswith(".bias")

    def reload(path: Path) -> torch.nn.Module:
        sd = torch.load(path, map_location="cpu", weights_only=True)["model"]
        return load_vmamba_state_dict(sd, VMAMBA_DEMO_CONFIG, source=str(path))

    return DemoFamily(VMAMBA_DEMO_CONFIG, lambda: VSSM(VMAMBA_DEMO_CONFIG), reload, "vmamba_demo.pth", "vmamba_demo.json",
                      no_decay, TrainRecipe(epochs=30))


def mambavision_demo() -> DemoFamily:
    def no_decay(name: str, p: torch.Tensor) -> bool:  # 1-D (biases, norms, D, layer scales) and A_log, as Mamba's
        return p.dim() < 2 or name.endswith(".A_log")

    return DemoFamily(MAMBAVISION_DEMO_CONFIG, lambda: MambaVision(MAMBAVISION_DEMO_CONFIG),
                      lambda p: load_mambavision(p, arch=MAMBAVISION_DEMO_CONFIG), "mambavision_demo.pth",
                      "mambavision_demo.json", no_decay, TrainRecipe(epochs=30, max_shift=4))


FAMILIES: dict[str, Callable[[], DemoFamily]] = {"vim": vim_demo, "vmamba": vmamba_demo, "mambavision": mambavision_demo}


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: Callable[[str, torch.Tensor], bool]) -> list[dict]:
    decay, skip = [], []
    for name, p in model.named_parameters():
        (skip if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def train(recipe: TrainRecipe, family: DemoFamily) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    size = family.config.img_size
    x_train, y_train = load_digits_split("train", size)
    x_test, y_test = load_digits_split("test", size)
    model = family.build()
    opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay, family.no_decay), lr=recipe.max_lr)
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
    ap.add_argument("--family", choices=sorted(FAMILIES), default="vim")
    ap.add_argument("--epochs", type=int, default=None, help="default: the family's recipe")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "calib" / "demo")
    args = ap.parse_args(argv)
    family = FAMILIES[args.family]()
    recipe = family.recipe if args.epochs is None else replace(family.recipe, epochs=args.epochs)
    model, seconds = train(recipe, family)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / family.checkpoint
    torch.save({"model": model.state_dict()}, ckpt)
    reloaded = family.reload(ckpt).eval()  # the card reports what ships
    size = family.config.img_size
    x_test, y_test = load_digits_split("test", size)
    top1 = evaluate_top1(reloaded, x_test, y_test, desc="test top-1")
    card = {
        "name": family.config.name,
        "config": family.config.to_dict(),
        "data": f"scikit-learn digits (1,797 real 8x8 images), bilinear to {size}x{size}, 3 channels, train-normalised",
        "split": {"seed": SPLIT_SEED, **SPLIT_SIZES, "calib_is_subset_of": "train"},
        "seed": recipe.seed,
        "recipe": asdict(recipe),
        "fp_test_top1": top1,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "checkpoint_bytes": ckpt.stat().st_size,
    }
    (args.out / family.card).write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {ckpt} ({card['checkpoint_bytes'] / 1e6:.2f} MB) and {family.card}: FP test top-1 {top1:.2f}%, "
          f"trained in {seconds:.0f} s")


if __name__ == "__main__":
    main()
