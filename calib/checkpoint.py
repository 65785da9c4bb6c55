"""Load model checkpoints safely; the model family and its architecture come from the state_dict.

Reading (every family): torch.load(weights_only=True) only, with the few harmless types the
registered families' official files pickle allow-listed (`safe_globals`: e.g. Vim's
argparse.Namespace training args, VMamba's yacs CfgNode read as an OrderedDict); a pickle that
would run code is refused. The model state_dict is the file's `model`, `state_dict`, `model_ema`
or `state_dict_ema` entry (the first present; an EMA copy only when it is the only model), or the
file itself when it is a bare state_dict; a `module.` prefix is stripped.

Dispatch: `--arch` names the family (architecture names are unique across families); otherwise the
family whose signature keys the state_dict has (`ModelFamily.claims`) infers the architecture from
the key shapes and loads it with strict=True. Each family's module documents its inference and
raises its own errors (CheckpointError); a state_dict no family claims is an error that says, for
each family, which of its keys are missing.

`infer_config`, `resolve_arch` and `load_state_dict` are the Vim family's (ouro.calib.families.vim),
kept here for existing callers.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .families.base import CheckpointError, all_families, family_for_arch, family_for_config
from .families.vim import infer_config, load_state_dict, resolve_arch

__all__ = ["CheckpointError", "safe_globals", "check_finite", "load_checkpoint", "load_model_state_dict", "read_checkpoint",
           "select_state_dict", "infer_config", "resolve_arch", "load_state_dict"]

STATE_DICT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
"""Where the families' training files keep the weights, in the order they are looked for."""


def safe_globals() -> list:
    """The types allowed in a checkpoint besides tensors and builtins: every family's `safe_globals`."""
    out: list = []
    for fam in all_families():
        out += [g for g in fam.safe_globals if g not in out]
    return out


def _names(globs) -> str:
    return ", ".join(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in globs)


def read_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> object:
    """torch.load(path, weights_only=True) with the allow-listed types; errors as CheckpointError."""
    path = Path(path)
    try:
        if path.is_dir():
            raise CheckpointError(f"checkpoint {path} is a directory; give the checkpoint file (.pth) inside it")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
    except OSError as e:  # e.g. a name longer than the file system allows
        raise CheckpointError(f"cannot read checkpoint {str(path)[:80]}: {e.strerror}") from None
    allowed = safe_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        glob = re.search(r"GLOBAL ([\w.]+)", msg)  # "Unsupported global: GLOBAL x" / "unsupported GLOBAL x whose module"
        if glob or "unrecognized function" in msg or "not an allowed global" in msg:
            what = f" it references {glob.group(1)}," if glob else " it calls a function"
            raise CheckpointError(
                f"refusing to load {path}:{what} which a weights-only load does not allow (a pickle that "
                f"could run code). Only tensors, builtins and {_names(allowed)} are accepted."
            ) from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", msg)
        first = detail.group(1).strip() if detail else msg.strip().splitlines()[-1]
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({path.stat().st_size} bytes): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({path.stat().st_size} bytes): {first}") from None


def select_state_dict(obj: object, source: str | Path) -> dict[str, Tensor]:
    """The model state_dict inside a loaded file (module doc), `module.` prefix stripped."""
    sd = obj
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                sd = obj[key]
                break
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"{source} holds no state_dict (a {type(obj).__name__}); expected "
                              + ", ".join(f"{{'{k}': sd}}" for k in STATE_DICT_KEYS) + " or a bare state_dict")
    non_tensor = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if non_tensor:
        top = ", ".join(map(str, list(sd)[:8]))
        raise CheckpointError(f"{source} is not a model state_dict: non-tensor entries {non_tensor[:5]} (top-level keys: {top})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _resolve(arch) -> tuple:
    """(family, config) for an architecture name or a family's config object."""
    if isinstance(arch, str):
        return family_for_arch(arch)
    return family_for_config(arch), arch


def load_model_state_dict(sd: Mapping[str, Tensor], arch=None, *, source: str = "state_dict", hints: Mapping | None = None,
                          img_size: int | None = None, device: torch.device | str | None = None) -> nn.Module:
    """The model of a state_dict: the family from `arch` (a name or config) or from the keys, then
    the family's inference (or `arch`) and strict load, in eval mode."""
    if arch is not None:
        fam, cfg = _resolve(arch)
    else:
        cfg = None
        claimed = [f for f in all_families() if f.claims(sd)]
        if not claimed:
            eg = ", ".join(list(sd)[:5])
            raise CheckpointError(f"{source}: no model family recognises this state_dict ({len(sd)} keys, e.g. {eg}): "
                                  + "; ".join(f.why_not(sd) for f in all_families()))
        fam = claimed[0]
    return fam.load_state_dict(sd, cfg, source=source, hints=hints, img_size=img_size, device=device)


def check_finite(sd: Mapping[str, Tensor], source: str = "state_dict") -> None:
    """Refuse a state_dict with NaN or Inf weights, naming the first bad tensor (in file order)."""
    for k, v in sd.items():
        if v.is_floating_point() or v.is_complex():
            finite = torch.isfinite(v)
            if not bool(finite.all()):
                n = int((~finite).sum())
                raise CheckpointError(f"{source}: tensor {k!r} {tuple(v.shape)} has {n} non-finite value(s) (NaN or Inf); "
                                      "a quantized or exported model would be wrong. Fix the checkpoint, or pass "
                                      "--allow-nonfinite to use it anyway")


def load_checkpoint(path: str | Path, arch=None, *, img_size: int | None = None,
                    device: torch.device | str | None = None, allow_nonfinite: bool = False) -> nn.Module:
    """Load a checkpoint file (module doc) into its family's model, in eval mode.

    arch: None infers family and architecture from the state_dict; an architecture name of any family
    (vim_tiny, vmamba_small, an official model name, ...) or a config object overrides it (a mismatch is a
    CheckpointError naming the keys and shapes). Non-finite weights are a CheckpointError naming the
    first bad tensor unless `allow_nonfinite`."""
    path = Path(path)
    obj = read_checkpoint(path, torch.device(device or "cpu"))  # map_location: straight onto --device
    sd = select_state_dict(obj, path)
    if not allow_nonfinite:
        check_finite(sd, str(path))
    hints: dict = {}
    if arch is not None:
        fam = _resolve(arch)[0]
        hints = fam.file_hints(obj)
    else:
        for fam in all_families():
            if fam.claims(sd):
                hints = fam.file_hints(obj)
                break
    return load_model_state_dict(sd, arch, source=str(path), hints=hints, img_size=img_size, device=device)
