"""The native onnxruntime custom-op library, libouro_ort_ops.so (sources: trt_plugins/ort/).

It implements ouro's custom nodes (`ouro::OutlierLinear`, `ouro::SelectiveScan`) in C++ for onnxruntime's
CPU and CUDA execution providers, with the numerics of the Python reference ops in `ouro.exporter.ort_ops`
(bit-exact integer codes; the scan in fp32). `onnxruntime_session` uses it when it is built and the Python
reference ops otherwise, and says which it took (once per process, on stderr).

Where the library is looked for: `ouro.exporter.native.find_library("ouro_ort_ops")` ($OURO_ORT_OPS_LIB, else
the in-tree build folder that `cmake -S trt_plugins -B build/trt` fills). $OURO_ORT_OPS = auto (default) |
native | python overrides the choice (`native` fails when the library is missing).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from . import native

__all__ = ["LIBRARY", "LIB_ENV", "OPS_ENV", "LIB_NAME", "BUILD_HINT", "NativeOpsUnavailable", "library_path", "select_ops", "session"]

LIBRARY = "ouro_ort_ops"
LIB_ENV = native.LIBRARIES[LIBRARY].env
LIB_NAME = native.LIBRARIES[LIBRARY].file
OPS_ENV = "OURO_ORT_OPS"
BUILD_HINT = (
    "build it with: cmake -S trt_plugins -B build/trt -DONNXRUNTIME_ROOT=<onnxruntime release archive> && "
    f"cmake --build build/trt --target ouro_ort_ops (from the repository root), or point {LIB_ENV} at a built {LIB_NAME}"
)
CHOICES = ("auto", "native", "python")
_announced: set[str] = set()


class NativeOpsUnavailable(RuntimeError):
    """Native ops were requested but the library is missing; the message says how to build it."""

    user_facing = True


def library_path() -> Path | None:
    """The library to load (`native.find_library`): $OURO_ORT_OPS_LIB (an error if it names no file), else the
    in-tree build when it exists, else None."""
    try:
        return native.find_library(LIBRARY)
    except native.NativeLibraryError as e:
        raise NativeOpsUnavailable(f"{e}; {BUILD_HINT}") from None


def select_ops(ops: str | None = None) -> Path | None:
    """Which implementation of the custom ops a session takes: the native library's path, or None for the
    Python reference ops. `ops` (else $OURO_ORT_OPS, else "auto") is one of auto, native, python."""
    choice = (ops or os.environ.get(OPS_ENV) or "auto").lower()
    if choice not in CHOICES:
        raise ValueError(f"ouro custom ops {choice!r}: expected one of {', '.join(CHOICES)} (argument ops= or ${OPS_ENV})")
    if choice == "python":
        _announce("python", "Python reference ops (requested)")
        return None
    lib = library_path()
    if lib is None:
        if choice == "native":
            raise NativeOpsUnavailable(f"native ouro custom ops requested but {LIB_NAME} is not built; {BUILD_HINT}")
        _announce("python", f"Python reference ops ({LIB_NAME} not built; {BUILD_HINT})")
        return None
    _announce(f"native:{lib}", f"native library {lib}")
    return lib


def session(model_bytes: bytes, lib: Path, providers=None, sess_options=None):
    """An onnxruntime.InferenceSession of the serialised model with the native library registered."""
    import onnxruntime as ort

    so = sess_options
    if so is None:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model_bytes, so, providers=providers or ["CPUExecutionProvider"])


def _announce(key: str, text: str) -> None:
    if key not in _announced:
        _announced.add(key)
        print(f"ouro: onnxruntime custom ops: {text}", file=sys.stderr)
