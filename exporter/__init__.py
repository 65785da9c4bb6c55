"""ouro.exporter: torch -> ONNX (FP, QDQ, plugin), graph passes, onnxruntime reference ops,
Polygraphy checks, TensorRT engine build, and the `ouro-export` CLI."""
from __future__ import annotations

__all__ = ["onnxruntime_session"]


def onnxruntime_session(path, providers=None, ops=None):
    """An onnxruntime.InferenceSession for `path` with ouro's custom ops registered: the native library
    libouro_ort_ops.so when built, else the Python reference ops (`ops`: auto | native | python)."""
    from . import ort_ops

    return ort_ops.onnxruntime_session(path, providers=providers, ops=ops)
