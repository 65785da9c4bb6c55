"""GPU kernel tests: skipped cleanly without a CUDA GPU or without the built kernel library."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    from ouro.exporter import cuda_kernels as ck

    try:
        ck.load_library()
    except ck.KernelUnavailable as e:
        return f"ouro kernel library unavailable: {e}"
    return None


def _torch_skip_reason() -> str | None:
    return None if torch.cuda.is_available() else "needs a CUDA GPU (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if _HERE in Path(str(it.fspath)).resolve().parents]
    if not mine:
        return
    reasons = {}
    for it in mine:
        it.add_marker(pytest.mark.gpu)
        # modules that run only PyTorch on the GPU (no ouro kernel library) say NEEDS_KERNEL_LIBRARY = False
        needs_lib = getattr(getattr(it, "module", None), "NEEDS_KERNEL_LIBRARY", True)
        if needs_lib not in reasons:
            reasons[needs_lib] = _skip_reason() if needs_lib else _torch_skip_reason()
        if reasons[needs_lib]:
            it.add_marker(pytest.mark.skip(reason=reasons[needs_lib]))
