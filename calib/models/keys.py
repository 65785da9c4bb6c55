"""The one comparison of a checkpoint's state_dict with a model's keys and shapes (every family's loader)."""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

__all__ = ["state_dict_mismatch"]


def state_dict_mismatch(model: nn.Module, sd: Mapping[str, Tensor], label: str = "checkpoint") -> str | None:
    """None when `sd` has exactly the model's keys with its shapes; else a summary of the shape
    mismatches, missing and unexpected keys (a few of each), for the family's own error."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [f"{k}: {label} {tuple(sd[k].shape)} vs model {want[k]}" for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches, e.g. " + "; ".join(wrong[:4]))
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[:4]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:4]}")
    return " | ".join(parts)
