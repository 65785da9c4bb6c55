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


def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if _HERE in Path(str(it.fspath)).resolve().parents]
    if not mine:
        return
    reason = _skip_reason()
    for it in mine:
        it.add_marker(pytest.mark.gpu)
        if reason:
            it.add_marker(pytest.mark.skip(reason=reason))
