"""torch -> ONNX: the FP graph, and the hook that turns each selective scan into one custom node.

Every model family (ouro.calib.families) calls its scans through its hook points' ops,
`ops.scan(direction, inputs)`. During export that hook is wrapped in `SelectiveScanFn`, an
autograd.Function whose forward runs the model's own scan (FP, or the quantized model's fake-quant
scan) and whose ONNX `symbolic` emits

    ouro::SelectiveScan(u, delta, A, Bm, Cm, Dskip[, z]) -> y
        attributes: reverse, delta_softplus, plugin_version="1", plugin_namespace="ouro"

one node per scan, named `<hook point path>.scan_<direction>` (Vim `layers.{i}.mixer.scan_{fwd|bwd}`,
VMamba `layers.{s}.blocks.{j}.op.scan_{row_fwd|col_fwd|row_bwd|col_bwd}`), `reverse` from the scan's
ScanSite (DESIGN.md §3; the TensorRT plugin of the same name replaces it). A scan without a gate
(VMamba's v05_noz) has no z: the node has 6 inputs (trt_plugins/selective_scan/README.md). Graph
inputs/outputs: `images` (B, C, H, W) and `logits` (B, classes), batch axis dynamic. The graph
contains no flips (reversed scans run with reverse=1 on their own token layout).
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

from ouro.calib.families import family_of, override_ops
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
    "is_none",
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
    """Runs `inner` (the model's scan) in PyTorch; exports as one `ouro::SelectiveScan` node
    (6 inputs when z is None: no gate)."""

    @staticmethod
    def forward(ctx, inner: Callable, name: str, direction: str, reverse: bool, u: Tensor, delta: Tensor, A: Tensor,
                Bm: Tensor, Cm: Tensor, Dskip: Tensor, z: Tensor | None) -> Tensor:  # noqa: N803
        if torch.jit.is_tracing():
            # Under torch.onnx.export only the node's type and shape matter (the model has no
            # data-dependent control flow); running the scan inside the trace records thousands of
            # ops and made a Vim-T export take minutes. The graph is checked against the model after.
            return torch.zeros_like(u)
        y = inner(direction, ScanInputs(u, delta, A, Bm, Cm, Dskip, z))
        return y.to(u.dtype)

    @staticmethod
    def symbolic(g, inner, name, direction, reverse, u, delta, A, Bm, Cm, Dskip, z):  # noqa: N803
        attrs = {f"{k}_s": v for k, v in PLUGIN_ATTRS.items()}
        operands = [u, delta, A, Bm, Cm, Dskip] + ([] if is_none(z) else [z])
        y = g.op(
            f"{DOMAIN}::{SCAN_OP}", *operands,
            reverse_i=int(reverse), delta_softplus_i=1, **attrs, **{f"{NODE_NAME_ATTR}_s": name},
        )
        y.setType(scan_output_type(u))
        return y


def scan_output_type(u):
    """The traced type of a scan node's output: u's, with a dynamic batch axis (the trace runs on a
    batch of one; without this the exporter folds shape computations downstream into constants)."""
    t = u.type()
    sizes = t.varyingSizes() if hasattr(t, "varyingSizes") else None
    if not sizes:
        return t
    return t.with_sizes([None] + list(sizes[1:]))


def is_none(v) -> bool:
    """A symbolic argument that stands for a Python None (an absent optional operand)."""
    return v is None or (hasattr(v, "node") and v.node().mustBeNone())


def fp_scan(direction: str, inputs: ScanInputs, *, reverse: bool) -> Tensor:
    """The model's default scan (no hooks installed)."""
    return selective_scan(*inputs, delta_softplus=True, reverse=reverse)


def scan_export_hooks(model: nn.Module) -> contextlib.AbstractContextManager:
    """Route every hook point's scan through `SelectiveScanFn` (numerics unchanged); restore on exit."""

    def make(point) -> dict:
        reverse = {s.direction: s.reverse for s in point.scans}
        installed = point.module.ops.scan

        def inner(direction: str, inputs: ScanInputs) -> Tensor:
            if installed is not None:
                return installed(direction, inputs)
            return fp_scan(direction, inputs, reverse=reverse[direction])

        def hook(direction: str, inputs: ScanInputs) -> Tensor:
            return SelectiveScanFn.apply(inner, f"{point.path}.scan_{direction}", direction, reverse[direction], *inputs)

        return {"scan": hook}

    return override_ops(model, make)


def _fp16_linears(model: nn.Module) -> contextlib.AbstractContextManager:
    """Cast each linear layer's input to its (fp16) weight dtype, wrapping any installed hook."""

    def make(point) -> dict:
        inner = point.module.ops.linear

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


def export_onnx(module: nn.Module, example: Tensor, *, opset: int = FP_OPSET, model: nn.Module | None = None,
                hook_scans: bool = True) -> ExportResult:
    """Trace `module` (whose scans are hooked through the hook points of `model`, default `module`, a
    model of a registered family) into an ONNX model in memory, with a dynamic batch axis. Returns the
    checked ModelProto and the export time. hook_scans=False: the caller has already routed the scans
    through `SelectiveScanFn`."""
    model = module if model is None else model
    try:
        family_of(model)
    except TypeError as e:
        raise ExportError(str(e)) from None
    t0 = time.perf_counter()
    buf = io.BytesIO()
    hooks = scan_export_hooks(model) if hook_scans else contextlib.nullcontext()
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
    """The FP graph: fp32 by default; fp16: a half copy of the model whose linear layers get their
    inputs cast to fp16, wrapped by the family (`export_module`: Vim keeps its residual stream and
    RMSNorms in fp32, as the model does). The model is not modified."""
    model = model.eval()
    fam = family_of(model)
    if not fp16:
        return export_onnx(fam.export_module(model), example_input(model, batch), opset=opset, model=model)
    import copy

    half = copy.deepcopy(model).half()
    with _fp16_linears(half):
        return export_onnx(fam.export_module(half, fp16=True), example_input(model, batch, torch.float16), opset=opset,
                           model=half)
