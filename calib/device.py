"""`--device auto|cpu|cuda|cuda:N`: where the PyTorch stages run (DESIGN.md §4).

    dev = resolve_device("auto")              # cuda:0 when torch sees a GPU, else cpu
    dev = resolve_device("cuda", local_rank)  # under torchrun: this process's GPU
    describe_device(dev)                      # "cuda:0 (NVIDIA H100 80GB HBM3)" / "cpu (2 threads)"

Everything PyTorch does for a run (loading with map_location, OuroMamba-Gen, calibration, evaluation,
the report's metrics, --check's PyTorch twin) runs on the resolved device; ONNX tracing runs on the
CPU (see ouro.exporter.outputs).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["DEVICE_CHOICES", "DeviceError", "resolve_device", "describe_device", "module_device", "synchronize", "on_device"]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A --device the machine cannot honour; the message says what is available."""

    user_facing = True


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The torch.device for a --device value. `auto` (and None): this process's GPU when torch sees
    one, else the CPU. `cuda` without an index: GPU `local_rank` (torchrun gives each process its own)."""
    if isinstance(spec, torch.device):
        return spec
    s = (spec or "auto").strip().lower()
    m = _SPEC.match(s)
    if not m or (m.group(1) != "cuda" and m.group(2) is not None):
        raise DeviceError(f"--device {spec!r} is not understood; use {DEVICE_CHOICES}")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {spec}: torch sees no CUDA GPU on this machine (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto")
    n = torch.cuda.device_count()
    i = int(index) if index is not None else local_rank % n
    if i >= n:
        raise DeviceError(f"--device {spec}: this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", i)


def describe_device(dev: torch.device) -> str:
    """A short human description for the run plan."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"{dev.type} ({torch.get_num_threads()} threads)"


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module without tensors."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def synchronize(dev: torch.device) -> None:
    """Wait for the device's queued work (so that a wall-clock measurement covers it)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextmanager
def on_device(dev: torch.device) -> Iterator[None]:
    """Make `dev` the default device of tensor factories inside the block (modules built here are built
    there), restoring the previous default after."""
    with torch.device(dev):
        yield
