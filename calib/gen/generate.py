"""OuroMamba-Gen (seed Algorithm 1): synthetic calibration images from Gaussian noise.

For each mini-batch of noise images X and random target labels T, G Adam steps on the pixels of
    L^gen = w_C * L^C + w_O * L^O
    L^C = mean over layers l and patches t of the patch-level InfoNCE on the enhanced implicit
          attention rows (mean over channels and over both scan directions)
    L^O = cross-entropy(model(X), T)
after each step the pixels are clamped to the model's normalised input range.

Every term is per image and the loss is their SUM, so each image's gradient is its own: an image
depends only on the seed and its global index (its noise and target come from a generator seeded
with both), never on which other images share its mini-batch. Mini-batches are fixed global ranges
of indices, so resuming a run, or sharding it over torchrun processes (`dist`), computes every
mini-batch exactly as one uninterrupted process does. The losses are in losses.py.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import DEMO_CONFIG
from ..distributed import SINGLE, DistContext
from ..families.base import all_families, family_of
from ..imagefolder import IMAGENET_MEAN, IMAGENET_STD
from .config import GenConfig
from .grid import min_patches
from .losses import gen_losses
from ..files import atomic_write
from .storage import NPZ_NAME, GenFolder, load_synthetic_dir, model_fingerprint, write_pngs

__all__ = [
    "GenResult",
    "LossFn",
    "generate",
    "generate_calibration",
    "generate_to_folder",
    "image_seed",
    "initial_images",
    "input_normalization",
    "batch_ranges",
    "save_synthetic_dir",
]

LossFn = Callable[[nn.Module, Tensor, Tensor, GenConfig], tuple[Tensor, Tensor, Tensor]]


@dataclass
class GenResult:
    images: Tensor  # (n, C, H, W), normalised model input
    targets: Tensor  # (n,) the random target labels of L^O
    history: list[dict[str, float]] = field(default_factory=list)  # per step of the first mini-batch
    seconds: float = 0.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


# ------------------------------------------------------------------------------------------ range


def _demo_normalization() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The digits transform maps [0, 1] to [(0 - m) / s, (1 - m) / s] with one scalar m, s (from the
    train split); both ends occur in the train split (background 0, stroke 1), so m and s follow
    from its range."""
    from ..data import load_digits_split

    x, _ = load_digits_split("train")
    lo, hi = float(x.amin()), float(x.amax())
    s = 1.0 / (hi - lo)
    return (-lo * s,), (s,)


def input_normalization(model: nn.Module, config: GenConfig | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the model's input transform: the config's if given; else
    `ouro.calib.data.input_normalization(model)` if the data module has it; else the digits
    transform for an embedded demo model (of any family); else ImageNet's for 3-channel models."""
    cfg = config or GenConfig()
    C = model.cfg.in_chans
    if cfg.mean is not None:
        mean, std = cfg.mean, cfg.std
    else:
        from .. import data

        if hasattr(data, "input_normalization"):
            mean, std = (tuple(float(v) for v in t) for t in data.input_normalization(model))
        elif any(f.demo is not None and model.cfg.name == f.demo.config.name for f in all_families()):
            mean, std = _demo_normalization()
        elif C == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            raise ValueError(f"model has {C} input channels: give GenConfig.mean and .std (one value per channel) for its input transform")
    if len(mean) == 1 and C > 1:
        mean, std = mean * C, std * C
    if len(mean) != C:
        raise ValueError(f"input normalisation has {len(mean)} channels but the model takes {C}")
    return tuple(mean), tuple(std)


def _range(mean, std, like: Tensor) -> tuple[Tensor, Tensor]:
    m = torch.tensor(mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s


# ---------------------------------------------------------------------------------- per-image init
def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a run seeded `seed` (a 63-bit mix of both, platform independent)."""
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), int(index)]).generate_state(1, np.uint64)[0]) >> 1


def initial_images(model: nn.Module, indices: list[int], seed: int, init_std: float) -> tuple[Tensor, Tensor]:
    """Gaussian noise images (n, C, H, W) * init_std and random target labels (n,) for the given global
    indices, each from its own CPU generator seeded by `image_seed` (so the same on every device)."""
    m = model.cfg
    cpu = torch.device("cpu")
    xs, ts = [], []
    for i in indices:
        g = torch.Generator(device=cpu).manual_seed(image_seed(seed, i))
        xs.append(torch.randn(m.in_chans, m.img_size, m.img_size, generator=g, device=cpu) * init_std)
        ts.append(torch.randint(m.num_classes, (1,), generator=g, device=cpu))
    return torch.stack(xs), torch.cat(ts)


def batch_ranges(n: int, batch_size: int) -> list[range]:
    """The global mini-batches: consecutive ranges of batch_size image indices (the last may be shorter)."""
    return [range(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]


# ------------------------------------------------------------------------------------------ loop
TINY_MODEL = 1 << 16
"""A model with seq_len * d_inner below this runs Gen with one intra-op thread: its many small ops lose
more to thread hand-offs than they gain (as calibration's SMALL_WORK_NUMEL; the demo model is ~3e3)."""


def gen_threads(model: nn.Module) -> int | None:
    """1 for a tiny model on the CPU (TINY_MODEL), else None (keep torch's thread count)."""
    from ..device import module_device

    m = model.cfg
    work = getattr(m, "seq_len", None), getattr(m, "d_inner", None)
    if not all(isinstance(v, int) for v in work) or module_device(model).type != "cpu":  # per-stage sizes: keep
        return None
    return 1 if work[0] * work[1] < TINY_MODEL else None


def _check_model(model: nn.Module, cfg: GenConfig) -> None:
    family_of(model)  # TypeError for a model of no registered family
    if cfg.w_contrastive > 0 and min_patches(model) < 4:
        raise ValueError(f"L^C needs at least 4 patches (positives and negatives), the model has {min_patches(model)} in a scan")


def _run_batch(model: nn.Module, b: int, idx: range, seed: int, cfg: GenConfig, bounds, losses: LossFn, step0: int,
               on_step: Callable[[int, dict[str, float], Tensor], None]) -> tuple[Tensor, Tensor]:
    """G Adam steps on the pixels of one mini-batch; returns (images, targets) on the CPU."""
    from ..device import module_device

    dev = module_device(model)
    x0, t0 = initial_images(model, list(idx), seed, cfg.init_std)
    lo_b, hi_b = bounds
    x = torch.maximum(torch.minimum(x0.to(dev), hi_b), lo_b).requires_grad_(True)
    tb = t0.to(dev)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    for it in range(cfg.iterations):
        opt.zero_grad(set_to_none=True)
        lc, lo, _ = losses(model, x, tb, cfg)
        per_image = cfg.w_contrastive * lc + cfg.w_output * lo
        per_image.sum().backward()
        opt.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, hi_b), lo_b))
        terms = {"LC": float(lc.detach().mean()), "LO": float(lo.detach().mean()), "L": float(per_image.detach().mean())}
        on_step(step0 + it, terms, x.detach())
    return x.detach().cpu(), t0


def generate(model: nn.Module, n: int, seed: int = 0, config: GenConfig | None = None, *, progress: bool = True,
             callback: Callable[[int, dict[str, float], Tensor], None] | None = None, losses: LossFn | None = None,
             done: dict[int, tuple[Tensor, Tensor]] | None = None,
             on_batch: Callable[[int, list[int], Tensor, Tensor], None] | None = None,
             dist: DistContext = SINGLE) -> GenResult:
    """Run OuroMamba-Gen for n images on the model's device (module docstring); the images come back
    on the CPU, on every rank.

    callback(step, loss_terms, images) after every Adam step (global step b * G + g over mini-batches;
    images: the current mini-batch, detached, clamped). losses: the model family's `gen_losses` when None
    (for Vim, `ouro.calib.gen.losses.gen_losses`), or a twin.
    done: mini-batches {b: (images, targets)} already finished (a resumed run); they are not rerun.
    on_batch(b, indices, images, targets) as each mini-batch finishes (on rank 0: it writes).
    dist: under torchrun each rank runs every world_size-th unfinished mini-batch; rank 0 gathers.
    LossFn's `mean` per-step terms are averaged over the mini-batch; L^gen is summed over images."""
    cfg = config or GenConfig()
    if n < 1:
        raise ValueError(f"number of images must be >= 1, got {n}")
    _check_model(model, cfg)
    losses = losses or family_of(model).gen_losses
    from ..device import module_device

    mean, std = input_normalization(model, cfg)
    dev = module_device(model)
    bounds = _range(mean, std, torch.zeros((), device=dev))
    batches = batch_ranges(n, cfg.batch_size)
    results: dict[int, tuple[Tensor, Tensor]] = dict(done or {})
    todo = [b for b in range(len(batches)) if b not in results]
    rounds = -(-len(todo) // dist.world_size)
    history: list[dict[str, float]] = []
    was_training = model.training
    req = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    from ..quant.calibrate import intra_op_threads

    t0 = time.perf_counter()
    bar = tqdm(total=rounds * cfg.iterations, desc="OuroMamba-Gen", unit="step",
               disable=not progress or cfg.iterations == 0 or not dist.is_main)
    threads = intra_op_threads(gen_threads(model))
    threads.__enter__()
    try:
        for r in range(rounds):
            k = r * dist.world_size + dist.rank
            item = None
            if k < len(todo):
                b = todo[k]

                def on_step(step, terms, x, b=b):
                    if b == 0:
                        history.append(terms)
                    if callback is not None:
                        callback(step, terms, x)
                    bar.set_postfix(batch=f"{b + 1}/{len(batches)}", **{kk: f"{v:.3f}" for kk, v in terms.items()})
                    bar.update(1)

                x, t = _run_batch(model, b, batches[b], seed, cfg, bounds, losses, b * cfg.iterations, on_step)
                item = (b, x, t, history if b == 0 else None)
            for got in dist.all_gather(item):
                if got is None:
                    continue
                gb, gx, gt, gh = got
                results[gb] = (gx, gt)
                if gh is not None and not history:
                    history.extend(gh)
                if on_batch is not None and dist.is_main:
                    on_batch(gb, list(batches[gb]), gx, gt)
    finally:
        threads.__exit__(None, None, None)
        bar.close()
        for p, rq in zip(model.parameters(), req):
            p.requires_grad_(rq)
        model.train(was_training)
    images = torch.cat([results[b][0] for b in range(len(batches))])
    targets = torch.cat([results[b][1] for b in range(len(batches))])
    return GenResult(images, targets, history, time.perf_counter() - t0, mean, std)


def generate_calibration(model: nn.Module, n: int, seed: int = 0, config: GenConfig | None = None, *,
                         dist: DistContext = SINGLE, progress: bool = True) -> Tensor:
    """Public API: n synthetic calibration images (n, C, H, W) in the model's normalised input space,
    on the CPU (every rank gets all of them)."""
    return generate(model, n, seed, config, dist=dist, progress=progress).images


def generate_to_folder(model: nn.Module, n: int, out_dir: str | Path, seed: int = 0, config: GenConfig | None = None, *,
                       force: bool = False, progress: bool = True, dist: DistContext = SINGLE,
                       losses: LossFn | None = None) -> tuple[GenResult, int]:
    """Generate into a resumable folder (storage.py): each finished mini-batch is written as it
    comes; rerunning on an interrupted folder of the same run resumes it. Returns the result and
    how many mini-batches were already there."""
    cfg = config or GenConfig()
    _check_model(model, cfg)
    mean, std = input_normalization(model, cfg)
    identity = {"model": model_fingerprint(model), "n": int(n), "seed": int(seed), "batch_size": cfg.batch_size,
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}}
    folder, done = (GenFolder.open(out_dir, identity, mean, std, force=force) if dist.is_main else (None, None))
    done = dist.broadcast(done)
    if folder is not None and folder.complete():
        images = torch.cat([done[b][0] for b in sorted(done)])
        targets = torch.cat([done[b][1] for b in sorted(done)])
        return GenResult(images, targets, [], 0.0, mean, std), len(done)
    res = generate(model, n, seed, cfg, progress=progress, dist=dist, losses=losses, done=done,
                   on_batch=(lambda b, idx, x, t: folder.write_batch(b, idx, x, t)) if folder is not None else None)
    if folder is not None:
        folder.finish(res.images, res.targets)
    dist.barrier()
    return res, len(done)


# --------------------------------------------------------------------------------------- storage
def save_synthetic_dir(result: GenResult, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write img_00000.png ... (8-bit RGB/grey, denormalised) and images.npz (the exact float images
    in normalised space, the target labels, mean and std) for a finished result, each file atomically."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output folder {out} is not empty; pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    n = result.images.shape[0]
    write_pngs(out, list(range(n)), result.images, result.mean, result.std)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, images=result.images.detach().float().cpu().numpy(), targets=result.targets.cpu().numpy(),
                     mean=np.array(result.mean, dtype=np.float32), std=np.array(result.std, dtype=np.float32))

    atomic_write(out / NPZ_NAME, write, force=True)  # the folder was checked empty (or --force) above
    return out
