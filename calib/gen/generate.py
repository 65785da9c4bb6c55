"""OuroMamba-Gen (seed Algorithm 1): synthetic calibration images from Gaussian noise.

For each mini-batch of noise images X and random target labels T, G Adam steps on the pixels of
    L^gen = w_C * L^C + w_O * L^O
    L^C = mean over layers l and patches t of the patch-level InfoNCE on the enhanced implicit
          attention rows (mean over channels and over both scan directions)
    L^O = cross-entropy(model(X), T)
after each step the pixels are clamped to the model's normalised input range.

Every term is per image, so mini-batches are exact. Blocks run under activation checkpointing (and
so do the channel chunks of the implicit attention): only the block inputs stay in memory.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .attention import contrastive_loss, effective_topk, implicit_attention, neighbourhood_weights, patch_token_index
from ..families.base import all_families, family_of
from ..imagefolder import IMAGENET_MEAN, IMAGENET_STD
from .config import CHECKPOINT_AUTO_BYTES, GenConfig
from .grid import min_patches
from .instrument import ScanRecord, hook_mixer

__all__ = [
    "GenResult",
    "gen_losses",
    "generate",
    "generate_calibration",
    "input_normalization",
    "layer_contrastive_loss",
    "save_synthetic_dir",
    "load_synthetic_dir",
]

NPZ_NAME = "images.npz"


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


# ------------------------------------------------------------------------------------------ losses
def layer_contrastive_loss(records: list[ScanRecord], grid: int, cls_position: int, cfg: GenConfig) -> Tensor:
    """L^C of one layer (B,): InfoNCE on the enhanced attention rows of the patches, averaged over
    channels and the two scan directions. The neighbour weights come from each direction's own Delta."""
    feats = None
    rows = patch_token_index(grid, cls_position).to(records[0].dt.device)
    for r in records:
        W = neighbourhood_weights(r.dt, grid, cls_position, cfg.neighbourhood)
        a = implicit_attention(
            r.dt, r.A, r.Bm, r.Cm, reverse=r.direction == "bwd", mix=W, rows=rows,
            chunk_elems=cfg.attn_chunk_elems, use_checkpoint=cfg.checkpoint,
        )
        feats = a if feats is None else feats + a
    P = grid * grid
    return contrastive_loss(feats / len(records), effective_topk(cfg.topk, P), cfg.tau)


def use_checkpoint(model: nn.Module, batch: int, cfg: GenConfig) -> bool:
    """cfg.checkpoint, or when None: whether the activations of a mini-batch without checkpointing
    (about 12 fp32 tensors of B*L*d_inner*d_state per layer and direction, measured on the demo
    model) would exceed CHECKPOINT_AUTO_BYTES."""
    if cfg.checkpoint is not None:
        return cfg.checkpoint
    m = model.cfg
    return 12 * 2 * m.depth * batch * m.seq_len * m.d_inner * m.d_state * 4 > CHECKPOINT_AUTO_BYTES


def _block_step(blk: nn.Module, layer: int, hidden: Tensor, residual: Tensor | None, grid: int, cls: int, cfg: GenConfig, want_c: bool):
    records: list[ScanRecord] = []
    with hook_mixer(blk.mixer, layer, records):
        hidden, residual = blk(hidden, residual)
    lc = layer_contrastive_loss(records, grid, cls, cfg) if want_c else hidden.new_zeros(hidden.shape[0])
    return hidden, residual, lc


def gen_losses(model: nn.Module, x: Tensor, targets: Tensor, cfg: GenConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (L^C, L^O) (each (B,)) and the logits. Mirrors VisionMamba.forward_features with each
    block (and its L^C) checkpointed; tests check the logits equal model(x)."""
    mcfg = model.cfg
    want_c = cfg.w_contrastive > 0
    ck = use_checkpoint(model, x.shape[0], cfg)
    cfg = cfg.replace(checkpoint=ck)
    hidden, residual = model.embed(x), None
    lcs = []
    for i, blk in enumerate(model.layers):
        args = (blk, i, hidden, residual, mcfg.grid, mcfg.cls_position, cfg, want_c)
        if ck and torch.is_grad_enabled():
            hidden, residual, lc = checkpoint(_block_step, *args, use_reentrant=False)
        else:
            hidden, residual, lc = _block_step(*args)
        lcs.append(lc)
    residual = residual + hidden.float()
    logits = model.head(model.norm_f(residual)[:, mcfg.cls_position])
    lo = F.cross_entropy(logits, targets, reduction="none")
    return torch.stack(lcs).mean(0), lo, logits


# ------------------------------------------------------------------------------------------ loop
def generate(model: nn.Module, n: int, seed: int = 0, config: GenConfig | None = None, *, progress: bool = True,
             callback: Callable[[int, dict[str, float], Tensor], None] | None = None) -> GenResult:
    """Run OuroMamba-Gen for n images; deterministic under `seed` (same machine, same threads).

    callback(step, loss_terms, images) after every Adam step (global step over mini-batches; images
    is the current mini-batch, detached, already clamped)."""
    cfg = config or GenConfig()
    if n < 1:
        raise ValueError(f"number of images must be >= 1, got {n}")
    fam = family_of(model)  # TypeError for a model of no registered family
    mcfg = model.cfg
    if cfg.w_contrastive > 0 and min_patches(model) < 4:
        raise ValueError(f"L^C needs at least 4 patches (positives and negatives), the model has {min_patches(model)} in a scan")
    mean, std = input_normalization(model, cfg)
    param = next(model.parameters())
    dev = param.device
    gen = torch.Generator().manual_seed(int(seed))
    x_all = torch.randn(n, mcfg.in_chans, mcfg.img_size, mcfg.img_size, generator=gen) * cfg.init_std
    targets = torch.randint(mcfg.num_classes, (n,), generator=gen)
    x_all, targets = x_all.to(dev), targets.to(dev)
    lo_b, hi_b = _range(mean, std, x_all)
    x_all = torch.maximum(torch.minimum(x_all, hi_b), lo_b)

    was_training = model.training
    req = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    history: list[dict[str, float]] = []
    out = []
    t0 = time.perf_counter()
    nb = -(-n // cfg.batch_size)
    bar = tqdm(total=nb * cfg.iterations, desc="OuroMamba-Gen", unit="step", disable=not progress or cfg.iterations == 0)
    try:
        for b in range(nb):
            x = x_all[b * cfg.batch_size:(b + 1) * cfg.batch_size].clone().requires_grad_(True)
            tb = targets[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            opt = torch.optim.Adam([x], lr=cfg.lr)
            for it in range(cfg.iterations):
                opt.zero_grad(set_to_none=True)
                lc, lo, _ = fam.gen_losses(model, x, tb, cfg)
                loss = (cfg.w_contrastive * lc + cfg.w_output * lo).mean()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, hi_b), lo_b))
                terms = {"LC": float(lc.detach().mean()), "LO": float(lo.detach().mean()), "L": float(loss.detach())}
                if b == 0:
                    history.append(terms)
                if callback is not None:
                    callback(b * cfg.iterations + it, terms, x.detach())
                bar.set_postfix(batch=f"{b + 1}/{nb}", **{k: f"{v:.3f}" for k, v in terms.items()})
                bar.update(1)
            out.append(x.detach())
    finally:
        bar.close()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    return GenResult(torch.cat(out), targets, history, time.perf_counter() - t0, mean, std)


def generate_calibration(model: nn.Module, n: int, seed: int = 0, config: GenConfig | None = None) -> Tensor:
    """Public API: n synthetic calibration images (n, C, H, W) in the model's normalised input space."""
    return generate(model, n, seed, config).images


# --------------------------------------------------------------------------------------- storage
def save_synthetic_dir(result: GenResult, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write img_00000.png ... (8-bit RGB/grey, denormalised) and images.npz (the exact float
    images in normalised space, the target labels, mean and std)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output folder {out} is not empty; pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    x = result.images.detach().float().cpu()
    m = torch.tensor(result.mean).view(1, -1, 1, 1)
    s = torch.tensor(result.std).view(1, -1, 1, 1)
    pix = ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(pix):
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(out / f"img_{i:05d}.png")
    np.savez(out / NPZ_NAME, images=x.numpy(), targets=result.targets.cpu().numpy(),
             mean=np.array(result.mean, dtype=np.float32), std=np.array(result.std, dtype=np.float32))
    return out


def load_synthetic_dir(path: str | Path, *, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> Tensor:
    """Images (n, C, H, W) in normalised model-input space from a folder written by `ouro-export gen`:
    images.npz when present (exact floats), else the PNGs normalised with the given mean/std."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"synthetic image folder {p} does not exist")
    npz = p / NPZ_NAME
    if npz.is_file():
        with np.load(npz) as z:
            return torch.from_numpy(z["images"]).float()
    pngs = sorted(p.glob("*.png"))
    if not pngs:
        raise FileNotFoundError(f"{p} holds neither {NPZ_NAME} nor PNG images")
    if mean is None or std is None:
        raise ValueError(f"{p} has PNGs but no {NPZ_NAME}: give mean and std of the model's input transform")
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(f)) for f in pngs]).astype(np.float32) / 255.0
    x = torch.from_numpy(arr)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != len(mean):
        raise ValueError(f"PNGs in {p} have {x.shape[1]} channels, normalisation has {len(mean)}")
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
