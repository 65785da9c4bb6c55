"""torch -> ONNX: the FP graph, and the hook that turns each selective scan into one custom node.

The Vim model calls its scan through `MambaMixer.ops.scan(direction, inputs)`. During export
that hook is wrapped in `SelectiveScanFn`, an autograd.Function whose forward runs the model's own
scan (FP, or the quantized model's fake-quant scan) and whose ONNX `symbolic` emits

    ouro::SelectiveScan(u, delta, A, Bm, Cm, Dskip, z) -> y
        attributes: reverse, delta_softplus, plugin_version="1", plugin_namespace="ouro"

one node per direction and layer, named `layers.{i}.mixer.scan_{fwd|bwd}` (DESIGN.md §3; the
TensorRT plugin of the same name replaces it). Graph inputs/outputs: `images` (B, C, H, W) and
`logits` (B, classes), batch axis dynamic. The ONNX graph contains no flips (the backward scan
runs with reverse=1 on the original token order).
"""
from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import onnx
import torch
from torch import Tensor, nn

from ouro.calib.models.vim import override_ops
from ouro.calib.quant.qdq import NODE_NAME_ATTR
from ouro.calib.scan import ScanInputs, selective_scan

__all__ = [
    "DOMAIN",
    "SCAN_OP",
    "PLUGIN_ATTRS",
    "FP_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportError",
    "SelectiveScanFn",
    "fp_scan",
    "scan_export_hooks",
    "finish_node_names",
    "export_onnx",
    "export_fp",
]

DOMAIN = "ouro"
SCAN_OP = "SelectiveScan"
PLUGIN_ATTRS = {"plugin_version": "1", "plugin_namespace": "ouro"}
FP_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class ExportError(Exception):
    """The model cannot be exported as asked (message says why and what to change)."""


class SelectiveScanFn(torch.autograd.Function):
    """Runs `inner` (the model's scan) in PyTorch; exports as one `ouro::SelectiveScan` node."""

    @staticmethod
    def forward(ctx, inner: Callable, name: str, reverse: bool, u: Tensor, delta: Tensor, A: Tensor,
                Bm: Tensor, Cm: Tensor, Dskip: Tensor, z: Tensor) -> Tensor:  # noqa: N803
        if torch.jit.is_tracing():
            # Under torch.onnx.export only the node's type and shape matter (the model has no
            # data-dependent control flow); running the scan inside the trace records thousands of
            # ops and made a Vim-T export take minutes. The graph is checked against the model after.
            return torch.zeros_like(u)
        direction = "bwd" if reverse else "fwd"
        y = inner(direction, ScanInputs(u, delta, A, Bm, Cm, Dskip, z))
        return y.to(u.dtype)

    @staticmethod
    def symbolic(g, inner, name, reverse, u, delta, A, Bm, Cm, Dskip, z):  # noqa: N803
        attrs = {f"{k}_s": v for k, v in PLUGIN_ATTRS.items()}
        y = g.op(
            f"{DOMAIN}::{SCAN_OP}", u, delta, A, Bm, Cm, Dskip, z,
            reverse_i=int(reverse), delta_softplus_i=1, **attrs, **{f"{NODE_NAME_ATTR}_s": name},
        )
        y.setType(u.type())
        return y


def fp_scan(direction: str, inputs: ScanInputs) -> Tensor:
    """The model's default scan (MambaMixer._scan without hooks)."""
    return selective_scan(*inputs, delta_softplus=True, reverse=direction == "bwd")


def scan_export_hooks(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Route every mixer's scan through `SelectiveScanFn` (numerics unchanged); restore on exit."""

    def make(i: int, mixer: nn.Module) -> dict:
        inner, prefix = mixer.ops.scan or fp_scan, f"layers.{i}.mixer"

        def hook(direction: str, inputs: ScanInputs) -> Tensor:
            return SelectiveScanFn.apply(inner, f"{prefix}.scan_{direction}", direction == "bwd", *inputs)

        return {"scan": hook}

    return override_ops(model, make)


class _Fp16Head(nn.Module):
    """fp16 export wrapper: the model keeps its residual stream and norms in fp32 (by design), so the
    fp32 activations are cast to the fp16 weights' dtype in front of every linear layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        feats = self.model.forward_features(x)
        return self.model.head(feats.to(self.model.head.weight.dtype))


def _fp16_linears(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Cast each linear layer's input to its (fp16) weight dtype, wrapping any installed hook."""

    def make(_i: int, mixer: nn.Module) -> dict:
        inner = mixer.ops.linear

        def linear(name, module, x):
            x = x.to(module.weight.dtype)
            if inner is not None:
                return inner(name, module, x)
            return nn.functional.linear(x, module.weight, module.bias)

        return {"linear": linear}

    return override_ops(model, make)


def finish_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move the temporary name attribute onto NodeProto.name; declare the custom domain once."""
    for node in model.graph.node:
        name = [a.s.decode() for a in node.attribute if a.name == NODE_NAME_ATTR]
        if not name:
            continue
        node.name = name[0]
        keep = [a for a in node.attribute if a.name != NODE_NAME_ATTR]
        del node.attribute[:]
        node.attribute.extend(keep)
    if any(n.domain == DOMAIN for n in model.graph.node) and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return model


@dataclass
class ExportResult:
    model: onnx.ModelProto
    seconds: float


def export_onnx(module: nn.Module, example: Tensor, *, opset: int = FP_OPSET, vim: nn.Module | None = None,
                hook_scans: bool = True) -> ExportResult:
    """Trace `module` (whose scans are hooked through `vim`, default `module`) into an ONNX model in
    memory, with a dynamic batch axis. Returns the checked ModelProto and the export time.
    hook_scans=False: the caller has already routed the scans through `SelectiveScanFn`."""
    vim = module if vim is None else vim
    if not hasattr(vim, "layers"):
        raise ExportError(f"expected a Vim model with .layers, got {type(vim).__name__}")
    t0 = time.perf_counter()
    buf = io.BytesIO()
    hooks = scan_export_hooks(vim) if hook_scans else contextlib.nullcontext()
    with hooks, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values in the graph
        torch.onnx.export(
            module, (example,), buf, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            custom_opsets={DOMAIN: 1}, do_constant_folding=True,
        )
    model = finish_node_names(onnx.load_from_string(buf.getvalue()))
    onnx.checker.check_model(model)
    return ExportResult(model=model, seconds=time.perf_counter() - t0)


def example_input(model: nn.Module, batch: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(dtype)


def export_fp(model: nn.Module, *, fp16: bool = False, opset: int = FP_OPSET, batch: int = 1) -> ExportResult:
    """The FP graph: fp32 by default; fp16 keeps the residual stream and RMSNorms in fp32 (as the
    model does) and casts to fp16 in front of each linear layer. The model is not modified."""
    model = model.eval()
    if not fp16:
        return export_onnx(model, example_input(model, batch), opset=opset)
    import copy

    half = copy.deepcopy(model).half()
    with _fp16_linears(half):
        return export_onnx(_Fp16Head(half), example_input(model, batch, torch.float16), opset=opset, vim=half)
