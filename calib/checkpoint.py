"""Load Vim checkpoints safely and infer their architecture from the state_dict shapes.

Accepted files (read with torch.load(weights_only=True) only; a pickle that would run code is
refused): `{'model': sd}` (including the full official training dicts with model, model_ema,
optimizer, lr_scheduler, epoch, scaler and args = argparse.Namespace), `{'state_dict': sd}`, or a
bare state_dict; `model_ema` is used when it is the only model in the file. Keys are the official
hustvl/Vim `models_mamba.py` ones.

Architecture inference (no guessing beyond what the shapes cannot say):
    embed_dim, in_chans, patch_size  patch_embed.proj.weight (E, C, p, p)
    depth                            number of layers.{i}. blocks
    d_inner, d_state                 layers.0.mixer.A_log (d_inner, S); expand = d_inner / E
    d_conv                           layers.0.mixer.conv1d.weight (d_inner, 1, k)
    num_classes                      head.weight (K, E)
    grid                             pos_embed (1, grid**2 + 1, E)   (one middle CLS token)
    stride, img_size                 grid = (img - p) // stride + 1 has several solutions; in order:
                                     the training args (`input_size`, `..._patch16_stride8_224_...`
                                     model name) when the file carries them; an `img_size` hint;
                                     a standard image size (224, 384, ...) reached with stride p or
                                     p/2 (the official patch16_stride8 variants: 27x27 at 224);
                                     else non-overlapping patches, img = grid * p.
"""
from __future__ import annotations

import argparse
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .models.vim import ARCHS, VimConfig, VisionMamba

__all__ = ["CheckpointError", "SAFE_GLOBALS", "load_checkpoint", "load_state_dict", "read_checkpoint", "infer_config", "resolve_arch"]

SAFE_GLOBALS = [argparse.Namespace]
"""Types allowed in a checkpoint besides tensors and builtins: the official training dicts pickle
their `args` as an argparse.Namespace (plain attribute bag, runs no code on load)."""
STANDARD_IMG_SIZES = (224, 384, 256, 448, 512, 192, 160, 128)
REQUIRED = ("patch_embed.proj.weight", "pos_embed", "cls_token", "norm_f.weight", "head.weight",
            "layers.0.norm.weight", "layers.0.mixer.in_proj.weight", "layers.0.mixer.A_log", "layers.0.mixer.conv1d.weight",
            "layers.0.mixer.x_proj.weight", "layers.0.mixer.dt_proj.weight", "layers.0.mixer.out_proj.weight")
BIMAMBA_V2 = ("A_b_log", "conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.weight", "D_b")
_NAME_RE = re.compile(r"patch(\d+)(?:_stride(\d+))?_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unsafe, corrupt, not a Vim, or not the requested arch."""


def read_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> object:
    """torch.load(path, weights_only=True) with the allow-listed types; errors as CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        glob = re.search(r"GLOBAL ([\w.]+)", msg)  # "Unsupported global: GLOBAL x" / "unsupported GLOBAL x whose module"
        if glob or "unrecognized function" in msg or "not an allowed global" in msg:
            what = f" it references {glob.group(1)}," if glob else " it calls a function"
            raise CheckpointError(
                f"refusing to load {path}:{what} which a weights-only load does not allow (a pickle that "
                f"could run code). Only tensors, builtins and {', '.join(t.__name__ for t in SAFE_GLOBALS)} are accepted."
            ) from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", msg)
        first = detail.group(1).strip() if detail else msg.strip().splitlines()[-1]
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({path.stat().st_size} bytes): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({path.stat().st_size} bytes): {first}") from None


def _select_state_dict(obj: object, path: Path) -> tuple[dict[str, Tensor], object]:
    """The model state_dict inside a loaded file, and the training args if present."""
    args = obj.get("args") if isinstance(obj, Mapping) else None
    sd = obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_ema"):
            if isinstance(obj.get(key), Mapping):
                sd = obj[key]
                break
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"{path} holds no state_dict (a {type(obj).__name__}); expected {{'model': sd}}, {{'state_dict': sd}} or a bare state_dict")
    non_tensor = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if non_tensor:
        top = ", ".join(map(str, list(sd)[:8]))
        raise CheckpointError(f"{path} is not a Vim state_dict: non-tensor entries {non_tensor[:5]} (top-level keys: {top})")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return sd, args


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


def _hints_from_args(train_args: object) -> tuple[int | None, int | None]:
    """(img_size, stride) from the training args Namespace an official checkpoint stores, when it says."""
    if train_args is None:
        return None, None
    img = getattr(train_args, "input_size", None)
    stride = None
    m = _NAME_RE.search(str(getattr(train_args, "model", "")))
    if m:
        stride = int(m.group(2) or m.group(1))
        img = img or int(m.group(3))
    return (int(img) if isinstance(img, int) else None), stride


def _img_and_stride(grid: int, patch: int, img_hint: int | None, stride_hint: int | None) -> tuple[int, int]:
    if stride_hint:
        return (grid - 1) * stride_hint + patch, stride_hint
    if img_hint:
        if grid == 1:
            return img_hint, patch
        if (img_hint - patch) % (grid - 1) == 0 and img_hint >= patch:
            return img_hint, (img_hint - patch) // (grid - 1)
        raise CheckpointError(f"img_size {img_hint} with patch {patch} cannot give a {grid}x{grid} patch grid (pos_embed)")
    for stride in (patch, patch // 2):
        img = (grid - 1) * stride + patch
        if stride >= 1 and img in STANDARD_IMG_SIZES:
            return img, stride
    return grid * patch, patch


def infer_config(state_dict: Mapping[str, Tensor], *, img_size: int | None = None, stride: int | None = None) -> VimConfig:
    """The VimConfig a (bimamba-v2, middle-CLS) Vim state_dict was built with; see the module doc.
    `img_size` / `stride` resolve the image size vs stride ambiguity when the shapes cannot."""
    sd = state_dict
    missing = [k for k in REQUIRED if k not in sd]
    if missing:
        present = ", ".join(list(sd)[:6])
        raise CheckpointError(f"not a Vim checkpoint: missing keys {missing} (it has {len(sd)} keys, e.g. {present})")
    v2_missing = [f"layers.0.mixer.{k}" for k in BIMAMBA_V2 if f"layers.0.mixer.{k}" not in sd]
    if v2_missing:
        raise CheckpointError(f"not a bimamba-v2 Vim (separate backward parameters): missing keys {v2_missing}")
    E, C, ph, pw = _shape(sd, "patch_embed.proj.weight")
    if ph != pw:
        raise CheckpointError(f"patch_embed.proj.weight {(E, C, ph, pw)}: only square patches are supported")
    if _shape(sd, "cls_token") != (1, 1, E):
        raise CheckpointError(f"cls_token has shape {_shape(sd, 'cls_token')}, expected (1, 1, {E}) (one middle CLS token)")
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    depth = max(layer_ids) + 1
    if layer_ids != set(range(depth)):
        raise CheckpointError(f"layers are not numbered 0..{depth - 1}: missing blocks {sorted(set(range(depth)) - layer_ids)}")
    d_inner, S = _shape(sd, "layers.0.mixer.A_log")
    if d_inner % E:
        raise CheckpointError(f"layers.0.mixer.A_log {(d_inner, S)}: d_inner {d_inner} is not a multiple of embed dim {E}")
    d_conv = _shape(sd, "layers.0.mixer.conv1d.weight")[-1]
    n_tok = _shape(sd, "pos_embed")[1] - 1
    grid = math.isqrt(max(n_tok, 0))
    if n_tok < 1 or grid * grid != n_tok:
        raise CheckpointError(f"pos_embed {_shape(sd, 'pos_embed')}: {n_tok} patch tokens (+1 CLS) is not a square grid")
    img, st = _img_and_stride(grid, ph, img_size, stride)
    try:
        cfg = VimConfig(embed_dim=E, depth=depth, img_size=img, patch_size=ph, stride=st, in_chans=C,
                        num_classes=_shape(sd, "head.weight")[0], d_state=S, d_conv=d_conv, expand=d_inner // E)
    except ValueError as e:
        raise CheckpointError(f"inferred an invalid architecture: {e}") from None
    want_xproj = (cfg.dt_rank + 2 * S, d_inner)
    if _shape(sd, "layers.0.mixer.x_proj.weight") != want_xproj:
        raise CheckpointError(f"layers.0.mixer.x_proj.weight {_shape(sd, 'layers.0.mixer.x_proj.weight')}: expected {want_xproj} "
                              f"(dt_rank = ceil({E}/16) = {cfg.dt_rank}, d_state {S})")
    return _named(cfg)


def _named(cfg: VimConfig) -> VimConfig:
    """Give an inferred config the official name when it is one of ARCHS."""
    for arch in ARCHS.values():
        if VimConfig(**{**arch.to_dict(), "name": cfg.name}) == cfg:
            return arch
    return cfg


def resolve_arch(arch: str | VimConfig) -> VimConfig:
    """An ARCHS key (vim_tiny, vim_small, vim_base), an official model name (including the
    `..._patch16_stride8_224_...` variants), or a VimConfig."""
    if isinstance(arch, VimConfig):
        return arch
    if arch in ARCHS:
        return ARCHS[arch]
    m = re.match(r"vim_(tiny|small|base)_", arch)
    n = _NAME_RE.search(arch)
    if m and n:
        base = ARCHS[f"vim_{m.group(1)}"]
        patch = int(n.group(1))
        return VimConfig(**{**base.to_dict(), "patch_size": patch, "stride": int(n.group(2) or patch),
                            "img_size": int(n.group(3)), "name": arch})
    raise CheckpointError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)} or an official vim_*_patchP[_strideS]_IMG_* name")


def _check_shapes(model: VisionMamba, sd: Mapping[str, Tensor], cfg: VimConfig, source: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {want[k]}" for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches, e.g. " + "; ".join(wrong[:4]))
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:4]}")
        raise CheckpointError(f"{source} does not match architecture {cfg.name} "
                              f"(embed {cfg.embed_dim}, depth {cfg.depth}, patch {cfg.patch_size}, stride {cfg.stride}, "
                              f"img {cfg.img_size}, classes {cfg.num_classes}): " + " | ".join(parts))


def load_state_dict(sd: Mapping[str, Tensor], arch: str | VimConfig | None = None, *, source: str = "state_dict",
                    img_size: int | None = None, stride: int | None = None, device: torch.device | str | None = None) -> VisionMamba:
    """Build the Vim for `sd` (inferred, or `arch`) on `device` (default: the CPU) and load it with strict=True."""
    try:
        cfg = infer_config(sd, img_size=img_size, stride=stride) if arch is None else resolve_arch(arch)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    with torch.device(device or "cpu"):  # the model is built where it will run
        model = VisionMamba(cfg)
    _check_shapes(model, sd, cfg, source)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_checkpoint(path: str | Path, arch: str | VimConfig | None = None, *, img_size: int | None = None,
                    device: torch.device | str | None = None) -> VisionMamba:
    """Load a Vim checkpoint file (module doc) into a VisionMamba in eval mode, on `device` (default:
    the CPU; the tensors are mapped there as they are read).

    arch: None infers the architecture from the shapes; an ARCHS key, an official model name or a
    VimConfig overrides it (a mismatch is a CheckpointError naming the keys and shapes)."""
    path = Path(path)
    sd, args = _select_state_dict(read_checkpoint(path, torch.device(device or "cpu")), path)
    img_hint, stride_hint = _hints_from_args(args)
    return load_state_dict(sd, arch, source=str(path), img_size=img_size or img_hint, stride=stride_hint, device=device)
