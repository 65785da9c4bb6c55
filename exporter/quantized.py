"""Calibrated `QuantizedModel` -> ONNX, for each quantized target (ouro.recipes.Target).

    export_quantized(qmodel, target, *, passes=None, opset=21, batch=1) -> ExportResult

1. `check_target(qmodel.formats, target)`: a target that cannot express the formats is refused
   before anything is traced (the CLI checks the same from -o before calibrating).
2. `trace_quantized`: torch.onnx.export of the model in export mode (ouro.calib.quant.export_mode):
   every quantizer emits its own standard Q/DQ (ouro.calib.quant.qdq), every scan one 7-input
   `ouro::SelectiveScan` node (6 inputs without a gate; its operands' Q/DQ in front of it).
3. per target:
     QDQ_ONNXRUNTIME  scans lowered to ONNX Scan loops (pass lower_selective_scan): runs in plain
                      onnxruntime; this is the .qdq.onnx file
     QDQ_TENSORRT     the traced Q/DQ graph with SelectiveScan plugin nodes (FP scan), cleaned up
     PLUGIN           fold_constants, then each quantized linear / scan becomes its plugin node,
                      built from its quantizers (ouro.exporter.plugin), then `passes`
                      (default DEFAULT_PASSES)
   Weights of <= 4 bits that stay Q/DQ are typed INT4 / UINT4 once, at the end (opset >= 21).

The QDQ graphs hold static numerics only: OuroMamba's dynamic outliers are not Q/DQ (each activation
keeps its inlier grid). Their PyTorch twin is the model in export mode run eagerly (`qdq_twin`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import TensorProto, numpy_helper
from torch import Tensor

from ouro.calib.quant import QuantizedModel, export_mode, iter_quantizers
from ouro.calib.quant.qdq import NODE_NAME_ATTR
from ouro.calib.scan import ScanInputs, selective_scan_ref
from ouro.recipes import Target, WeightFormat, check_target

from .onnx_export import (
    DOMAIN,
    PLUGIN_ATTRS,
    SCAN_OP,
    ExportError,
    ExportResult,
    SelectiveScanFn,
    is_none,
    example_input,
    scan_output_type,
    export_onnx,
    fp_scan,
)
from .passes import DEFAULT_PASSES, apply_passes_to_graph, finish_graph, fold_constants
from .plugin import emit_plugin_nodes

__all__ = ["QDQ_OPSET", "QDQError", "export_quantized", "trace_quantized", "qdq_twin", "PORTABLE_QDQ_PASSES"]

QDQ_OPSET = 21
"""Default opset of quantized exports (INT4 DequantizeLinear needs >= 21)."""
TORCH_MAX_OPSET = 20
"""The TorchScript exporter stops at opset 20; ops that changed in 21 only gained types (int4)."""
PORTABLE_QDQ_PASSES = ("fold_constants", "lower_selective_scan", "cleanup")
"""What turns the traced QDQ graph into the .qdq.onnx file that plain onnxruntime runs."""
TENSORRT_QDQ_PASSES = ("fold_constants", "cleanup")
"""The QDQ graph for TensorRT: scans stay SelectiveScan plugin nodes."""


class QDQError(ExportError):
    """The quantized model cannot be exported as asked (unsupported opset, target, ...)."""

    user_facing = True


@dataclass(frozen=True)
class RecurrenceQuant:
    """Quantization inside the recurrence (QMamba), as attributes of the scan node: h (TGQ, the
    SelectiveScan plugin contract's h_bits / h_group / h_scale / h_zero) and Abar = exp(dt*A)
    (abar_bits, abar_ltsq; inputs 15-18 abar_scale, abar_zero, abar_upper, abar_span: exporter
    internal, the lowering to an ONNX Scan loop computes them)."""

    h_bits: int = 0
    h_group: int = 1
    abar_bits: int = 0
    abar_ltsq: int = 0


class QuantScanFn(torch.autograd.Function):
    """A scan with Abar / h quantized inside the recurrence: one 19-input ouro::SelectiveScan node
    (7 operands, z an empty [0] tensor when there is no gate, 6 empty delta/B/C tables, h_scale,
    h_zero, 4 Abar scalars); forward: `inner`."""

    @staticmethod
    def forward(ctx, inner, name, direction, reverse, u, delta, A, Bm, Cm, Dskip, z, h_scale, h_zero, a_scale, a_zero, a_upper,
                a_span, spec: RecurrenceQuant):  # noqa: N803
        if torch.jit.is_tracing():
            return torch.zeros_like(u)
        return inner(direction, ScanInputs(u, delta, A, Bm, Cm, Dskip, z)).to(u.dtype)

    @staticmethod
    def symbolic(g, inner, name, direction, reverse, u, delta, A, Bm, Cm, Dskip, z, h_scale, h_zero, a_scale, a_zero, a_upper,
                 a_span, spec):  # noqa: N803
        empty = [g.op("Constant", value_t=torch.zeros(0)) for _ in range(6)]
        if is_none(z):
            z = g.op("Constant", value_t=torch.zeros(0))
        attrs = {f"{k}_s": v for k, v in PLUGIN_ATTRS.items()}
        y = g.op(f"{DOMAIN}::{SCAN_OP}", u, delta, A, Bm, Cm, Dskip, z, *empty, h_scale, h_zero, a_scale, a_zero, a_upper, a_span,
                 reverse_i=int(reverse), delta_softplus_i=1, h_bits_i=spec.h_bits, h_group_i=spec.h_group,
                 abar_bits_i=spec.abar_bits, abar_ltsq_i=spec.abar_ltsq, **attrs, **{f"{NODE_NAME_ATTR}_s": name})
        y.setType(scan_output_type(u))
        return y


def _scan_core(ops):
    """The scan of a hook point in export mode: one ouro::SelectiveScan node `<prefix>.scan_<dir>`;
    with Abar / h quantizers (QMamba) the node carries them (`QuantScanFn`)."""

    def core(direction: str, inputs: ScanInputs, *, reverse: bool, abar_quant=None, h_quant=None) -> Tensor:
        name = f"{ops.prefix}.scan_{direction}"
        if abar_quant is None and h_quant is None:
            return SelectiveScanFn.apply(partial(fp_scan, reverse=reverse), name, direction, reverse, *inputs)

        def inner(d: str, ins: ScanInputs) -> Tensor:
            return selective_scan_ref(*ins, delta_softplus=True, reverse=reverse,
                                      abar_quant=None if abar_quant is None else abar_quant.quantize,
                                      h_quant=None if h_quant is None else h_quant.hook)

        none = torch.zeros(0)
        h = h_quant.export_tables() if h_quant is not None else [none, none]
        ltsq, abar = abar_quant.export_tables() if abar_quant is not None else (False, [none] * 4)
        spec = RecurrenceQuant(h_bits=h_quant.format.bits if h_quant is not None else 0,
                               h_group=h_quant.format.group if h_quant is not None else 1,
                               abar_bits=abar_quant.format.bits if abar_quant is not None else 0, abar_ltsq=int(ltsq))
        return QuantScanFn.apply(inner, name, direction, reverse, *inputs, *h, *abar, spec)

    return core


@contextlib.contextmanager
def qdq_twin(qmodel: QuantizedModel) -> Iterator[QuantizedModel]:
    """The model computing what its QDQ graph computes (every quantizer's static Q/DQ, FP scans)."""
    with export_mode(qmodel, _scan_core) as m:
        yield m


def trace_quantized(qmodel: QuantizedModel, *, opset: int = QDQ_OPSET, batch: int = 1) -> ExportResult:
    """The traced graph (module docstring, step 2), opset `opset`, weights as int8/uint8 codes."""
    hi = onnx.defs.onnx_opset_version()
    if not QDQ_OPSET <= opset <= hi:
        raise QDQError(f"unsupported opset {opset} for a quantized export: use {QDQ_OPSET}..{hi} (INT4 DequantizeLinear needs >= {QDQ_OPSET})")
    if not isinstance(qmodel, QuantizedModel):
        raise QDQError(f"a quantized export needs a QuantizedModel (calibrate / load_quant_state), got {type(qmodel).__name__}")
    module = qmodel.module.eval()
    try:
        with qdq_twin(qmodel):
            res = export_onnx(module, example_input(module, batch), opset=TORCH_MAX_OPSET, hook_scans=False)
    except ValueError as e:  # not calibrated, unfrozen quantizers
        raise QDQError(str(e)) from None
    for o in res.model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    onnx.checker.check_model(res.model)
    return res


def export_quantized(qmodel: QuantizedModel, target: Target | str, *, passes: Sequence[str] | None = None,
                     opset: int = QDQ_OPSET, batch: int = 1) -> ExportResult:
    """The ONNX graph of `qmodel` for `target` (module docstring). `passes`: the plugin graph's
    passes after its nodes are emitted (default DEFAULT_PASSES)."""
    target = Target(target)
    if not isinstance(qmodel, QuantizedModel):
        raise QDQError(f"a quantized export needs a QuantizedModel (calibrate / load_quant_state), got {type(qmodel).__name__}")
    check_target(qmodel.formats, target, recipe_name=qmodel.recipe.name)
    res = trace_quantized(qmodel, opset=opset, batch=batch)
    graph = gs.import_onnx(res.model)
    if target is Target.PLUGIN:
        graph = emit_plugin_nodes(fold_constants(graph), qmodel)
        graph = apply_passes_to_graph(graph, DEFAULT_PASSES if passes is None else passes)
    elif target is Target.QDQ_ONNXRUNTIME:
        graph = apply_passes_to_graph(graph, PORTABLE_QDQ_PASSES)
    else:
        graph = apply_passes_to_graph(graph, TENSORRT_QDQ_PASSES)
    model = finish_graph(graph)
    if target is not Target.PLUGIN:
        model = type_int4_weights(model, qmodel)
    return ExportResult(model=model, seconds=res.seconds)


def type_int4_weights(model: onnx.ModelProto, qmodel: QuantizedModel) -> onnx.ModelProto:
    """Re-type the codes (and zero points) of weights of <= 4 bits as INT4 / UINT4 initializers.

    The bits come from each weight quantizer's format (its node `<node_name>/weight_dq`)."""
    formats = {q.node_name: q.format for _, q in iter_quantizers(qmodel) if isinstance(q.format, WeightFormat)}
    by_name = {t.name: t for t in model.graph.initializer}
    new: dict[str, onnx.TensorProto] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not node.name.endswith("/weight_dq"):
            continue
        key = node.name[: -len("/weight_dq")]
        fmt = formats.get(key)
        if fmt is None or fmt.bits > 4:
            continue
        typ, (lo, hi) = (TensorProto.INT4, (-8, 7)) if fmt.symmetric else (TensorProto.UINT4, (0, 15))
        arrays = []
        for idx in (0, 2):
            t = by_name.get(node.input[idx])
            if t is None:
                raise QDQError(f"{key}: weight DequantizeLinear input {idx} is not an initializer")
            arrays.append(numpy_helper.to_array(t).astype(np.int64))
        if any(a.size and (a.min() < lo or a.max() > hi) for a in arrays):
            if fmt.symmetric:
                raise QDQError(f"{key}: {fmt.bits}-bit weight codes out of [{lo}, {hi}]")
            continue  # an asymmetric zero point outside the 4-bit grid (one-sided range): keep the 8/16-bit container
        for idx, suffix, arr in ((0, "weight_int4", arrays[0]), (2, "weight_zero_int4", arrays[1])):
            name = f"{key}.{suffix}"
            new[name] = onnx.helper.make_tensor(name, typ, arr.shape, arr.flatten().tolist())
            node.input[idx] = name
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used and t.name not in new]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + list(new.values()))
    onnx.checker.check_model(model)
    return model
