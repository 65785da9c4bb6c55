"""Instrumented forward: per layer and direction, the scan's h(t), Delta(t) and inputs, differentiably.

Works through the mixer's `ops.scan` hook (models/vim.py), so the model's arithmetic and its normal
fast path are untouched: the hook is installed for the duration of a `with` block and removed after.
With states=True the scan runs as `selective_scan_ref` (the numerical specification) and keeps every
state h (B, L, D, S), B*L*D*S floats per layer and direction; without, it runs as the model's own
dispatching scan (the chunked scan on the CPU, mamba-ssm on a GPU; equal to fp32 tolerance, cheaper to
differentiate) and records only the scan inputs and Delta.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..models.vim import override_ops
from ..scan import ScanInputs, selective_scan, selective_scan_ref

__all__ = ["ScanRecord", "record_scans", "hook_mixer"]


@dataclass
class ScanRecord:
    """What one scan consumed and produced, token-major. dt = softplus(delta); h is None unless states=True."""

    layer: int
    direction: str  # "fwd" | "bwd"
    u: Tensor  # (B, L, D)
    dt: Tensor  # (B, L, D)
    A: Tensor  # (D, S)
    Bm: Tensor  # (B, L, S)
    Cm: Tensor  # (B, L, S)
    h: Tensor | None  # (B, L, D, S)


def _scan(direction: str, inputs: ScanInputs, states: bool):
    """The reference scan when states are wanted; else the dispatching scan: mamba-ssm's kernel on a
    CUDA GPU when it is installed, the chunked scan elsewhere (same numerics to fp32 tolerance, stable
    for any dt*A, with a much cheaper backward). Gen's losses read only the scan's inputs and Delta."""
    fn = selective_scan_ref if states else selective_scan
    extra = {"return_states": True} if states else {}
    return fn(*inputs, delta_softplus=True, reverse=direction == "bwd", **extra)


class _Recorder:
    def __init__(self, layer: int, sink: list[ScanRecord], states: bool) -> None:
        self.layer, self.sink, self.states = layer, sink, states

    def __call__(self, direction: str, inputs: ScanInputs) -> Tensor:
        out = _scan(direction, inputs, self.states)
        if self.states:
            y, st = out
            dt, h = st.dt, st.h
        else:
            y, dt, h = out, F.softplus(inputs.delta.float()), None
        self.sink.append(ScanRecord(self.layer, direction, inputs.u, dt, inputs.A, inputs.Bm, inputs.Cm, h))
        return y


@contextmanager
def hook_mixer(mixer: nn.Module, layer: int, sink: list[ScanRecord], *, states: bool = False) -> Iterator[list[ScanRecord]]:
    """Record the scans of one MambaMixer into `sink` while the block is active."""
    old = mixer.ops.scan
    mixer.ops.scan = _Recorder(layer, sink, states)
    try:
        yield sink
    finally:
        mixer.ops.scan = old


@contextmanager
def record_scans(model: nn.Module, *, states: bool = True) -> Iterator[list[ScanRecord]]:
    """Run `model(x)` inside this block to collect one ScanRecord per layer and direction, in call order.

        with record_scans(model) as recs:
            logits = model(x)
        recs[0].h, recs[0].dt   # layer 0, forward direction
    """
    layers = getattr(model, "layers", None)
    if layers is None or not all(hasattr(b, "mixer") for b in layers):
        raise TypeError(f"record_scans needs a Vim model with .layers[i].mixer (a MambaMixer); got {type(model).__name__}")
    sink: list[ScanRecord] = []
    with override_ops(model, lambda i, _mixer: {"scan": _Recorder(i, sink, states)}):
        yield sink
