"""Calibrated fake-quant model -> QDQ ONNX (standard QuantizeLinear / DequantizeLinear, static scales).

Q/DQ are emitted in exactly one place: `_emit_act_qdq` (activations) and `_emit_weight_dq`
(weights), called from the ONNX `symbolic` of `ActQDQFn` and `QLinearFn`.

    activation (per-time-step static inlier scale s_t, shape (1, L, 1), b bits):
        x -> Div(s_t) -> [Clip(-qmax, qmax) when b < 8] -> QuantizeLinear(1, int8 0)
          -> DequantizeLinear(1, int8 0) -> Mul(s_t)
    weight (per output channel, symmetric, zero point 0):
        DequantizeLinear(codes [N, K] INT8, or INT4 at opset >= 21, scale [N], axis 0) -> Transpose
    linear: MatMul(activation, weight) [+ Add(bias)]

Why a per-tensor Q/DQ between constant Div/Mul: ONNX and TensorRT Q/DQ scales are per tensor or
per channel of the quantized axis; a per-time-step scale is a per-row scale of the GEMM input,
and row scaling commutes with the GEMM (diag(s) X W = diag(s) (X W)), so TensorRT can run the INT8
GEMM on X/s and apply s to the output, and onnxruntime runs the same graph as written. The Clip
makes b < 8 bits exact on an INT8 grid (TensorRT has no INT4 activations); at 8 bits the grid is
the full INT8 range [-128, 127] (the fake-quant model uses the restricted [-127, 127]).

This graph is the portable artifact: static numerics only, no dynamic outliers (outliers are
clipped to the inlier range). `export_qdq` returns it with one `ouro::SelectiveScan` node per scan
(delta/B/C carry the same static Q/DQ): that is the input of the graph passes. The .qdq.onnx file
that `ouro-export` writes has each scan lowered to a standard ONNX `Scan` loop (pass
`lower_selective_scan`), so it runs in plain onnxruntime without custom ops; TensorRT users take the
plugin graph instead (a 197-step ONNX loop per direction and layer is slow on every runtime).
Everything the plugin graph needs beyond the Q/DQ (outlier bits, n_refresh, threshold policy, k,
theta) is stored as JSON in metadata_props["ouro.quant"], keyed by node name, for the passes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import Tensor, nn

from ouro.calib.quantizers import FP_PASSTHROUGH_BITS, ThresholdPolicy, qmax
from ouro.calib.scan import ScanInputs

from .onnx_export import _NAME_ATTR, ExportError, ExportResult, example_input, export_onnx

__all__ = ["QDQ_OPSET", "META_KEY", "ActSpec", "QDQError", "export_qdq", "quant_metadata"]

QDQ_OPSET = 21
"""Default opset of quantized exports (INT4 DequantizeLinear needs >= 21)."""
TORCH_MAX_OPSET = 20
"""The TorchScript exporter stops at opset 20; ops that changed in 21 only gained types (int4)."""
META_KEY = "ouro.quant"
POLICY_CODE = {ThresholdPolicy.DYNAMIC: 0, ThresholdPolicy.CALIBRATED: 1}


class QDQError(ExportError):
    """The quantized model cannot be exported as asked (unsupported opset, quantizer type, ...)."""

    user_facing = True


@dataclass(frozen=True)
class ActSpec:
    """A static activation quantizer as exported: name (the consumer, e.g. layers.0.mixer.in_proj)
    and its inlier bit width."""

    name: str
    bits: int


# ------------------------------------------------------------------------------ the one Q/DQ emitter
def _const(g, value: Tensor):
    return g.op("Constant", value_t=value)


def _named(name: str) -> dict:
    return {f"{_NAME_ATTR}_s": name}


def _emit_act_qdq(g, x, scale, spec: ActSpec):
    """Div(s_t) -> [Clip] -> Q -> DQ -> Mul(s_t); node names `{spec.name}/act_*`."""
    one, zero = _const(g, torch.tensor(1.0)), _const(g, torch.tensor(0, dtype=torch.int8))
    y = g.op("Div", x, scale, **_named(f"{spec.name}/act_div"))
    if spec.bits < 8:
        q = float(qmax(spec.bits))
        y = g.op("Clip", y, _const(g, torch.tensor(-q)), _const(g, torch.tensor(q)), **_named(f"{spec.name}/act_clip"))
    y = g.op("QuantizeLinear", y, one, zero, **_named(f"{spec.name}/act_q"))
    y = g.op("DequantizeLinear", y, one, zero, **_named(f"{spec.name}/act_dq"))
    return g.op("Mul", y, scale, **_named(f"{spec.name}/act_mul"))


def _emit_weight_dq(g, codes, scale, name: str):
    """DequantizeLinear(int8 codes [N, K], scale [N], zero 0, axis 0); int4 is applied after export."""
    n = codes.type().sizes()[0]
    zero = _const(g, torch.zeros(n, dtype=torch.int8))
    return g.op("DequantizeLinear", codes, scale, zero, axis_i=0, **_named(f"{name}/weight_dq"))


def _static_fake_quant(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """What the Q/DQ chain computes (round half to even, clamp to the INT8 or restricted grid)."""
    lo, hi = (-qmax(bits), qmax(bits)) if bits < 8 else (-128, 127)
    return torch.clamp(torch.round(x.float() / scale), lo, hi) * scale


class ActQDQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, spec: ActSpec) -> Tensor:
        return _static_fake_quant(x, scale, spec.bits).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale, spec):
        return _emit_act_qdq(g, x, scale, spec)


class QLinearFn(torch.autograd.Function):
    """y = QDQ(x) @ DQ(W)^T + b."""

    @staticmethod
    def forward(ctx, x, scale, codes, w_scale, bias, spec: ActSpec):
        w = codes.float() * w_scale.reshape(-1, 1)
        y = _static_fake_quant(x, scale, spec.bits) @ w.t()
        return (y + bias).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale, codes, w_scale, bias, spec):
        xq = _emit_act_qdq(g, x, scale, spec)
        w = _emit_weight_dq(g, codes, w_scale, spec.name)
        wt = g.op("Transpose", w, perm_i=[1, 0], **_named(f"{spec.name}/weight_t"))
        y = g.op("MatMul", xq, wt, **_named(f"{spec.name}/matmul"))
        return g.op("Add", y, bias, **_named(f"{spec.name}/bias"))


# ------------------------------------------------------------------------------ quantizer access
def _check_act(q, where: str) -> None:
    from ouro.calib.quant import OutlierActQuantizer

    if not isinstance(q, OutlierActQuantizer):
        raise QDQError(f"{where}: QDQ export supports OuroMamba activation quantizers (OutlierActQuantizer), got {type(q).__name__}")
    if q.bits_inlier >= FP_PASSTHROUGH_BITS:
        raise QDQError(f"{where}: {q.bits_inlier}-bit activations are FP16, not a Q/DQ")
    if getattr(q, "detection", "dynamic") != "dynamic":
        raise QDQError(f"{where}: outlier detection {q.detection!r} (an ablation) has no plugin node; only 'dynamic' is exported")
    if getattr(q, "applied_in_linear", False):
        raise QDQError(f"{where}: delta_before_bias (Delta quantized before dt_proj's bias) is not in the SelectiveScan "
                       "plugin contract (its delta input includes the bias); export with delta_before_bias = false")


def _token_scale(q, L: int) -> Tensor:
    """The inlier scale as (1, L, 1) (a per-tensor scale is broadcast over the tokens)."""
    s = (q.scale() if callable(getattr(q, "scale", None)) else q.static_scale).detach().float().reshape(-1)
    return (s.expand(L) if s.numel() == 1 else s).reshape(1, L, 1).contiguous()


def _act_meta(q) -> dict:
    """What the plugin node needs beyond the Q/DQ: outliers, refresh, threshold policy, theta."""
    m = {
        "a_bits": int(q.bits_inlier),
        "o_bits": int(q.bits_outlier),
        "n_refresh": int(q.n_refresh),
        "threshold_policy": POLICY_CODE[q.policy],
        "k_sigma": float(q.k_sigma),
    }
    if q.policy is ThresholdPolicy.CALIBRATED:
        m["theta"] = [float(v) for v in q.theta.detach().float().reshape(-1)]
    return m


class _QuantHooks:
    """mixer.ops replacements that route every quantized op through the Q/DQ emitter."""

    def __init__(self, qmodel: nn.Module) -> None:
        from ouro.calib.quant import iter_quant_ops

        self.qmodel = qmodel
        self.ops = dict(iter_quant_ops(qmodel))
        if len(self.ops) != len(qmodel.layers):
            raise QDQError("this model is not calibrated: some mixers carry no quantizers (use ouro.calib.quant.calibrate or load_quant_state)")
        self.meta: dict = {"linears": {}, "scans": {}}

    def __enter__(self):
        from ouro.calib.models.vim import override_ops

        self._override = override_ops(
            self.qmodel, lambda i, mixer: {"linear": self._linear_hook(i), "scan": self._scan_hook(i, mixer)}
        )
        self._override.__enter__()
        return self

    def __exit__(self, *exc):
        return bool(self._override.__exit__(*exc))

    def _linear_hook(self, i: int):
        ops = self.ops[i]

        def linear(name: str, module: nn.Linear, x: Tensor) -> Tensor:
            key = f"layers.{i}.mixer.{name}"
            qa, qw = ops.act[name] if name in ops.act else None, ops.weight[name] if name in ops.weight else None
            if qa is None and qw is None:
                return nn.functional.linear(x, module.weight, module.bias)
            if qa is None or qw is None:
                raise QDQError(f"{key}: QDQ export needs both the input and the weight quantized (W-only or A-only is not supported)")
            _check_act(qa, key)
            if not bool(getattr(qw, "frozen", False)):
                raise QDQError(f"{key}: weight quantizer is not frozen (calibration did not finish)")
            L = self.qmodel.cfg.seq_len
            bias = module.bias.detach() if module.bias is not None else torch.zeros(module.out_features)
            meta = _act_meta(qa) | {"w_bits": int(qw.bits)}
            self.meta["linears"][key] = meta
            return QLinearFn.apply(x, _token_scale(qa, L), qw.codes, qw.scale.detach().float().reshape(-1), bias.float(),
                                   ActSpec(key, int(qa.bits_inlier)))

        return linear

    def _scan_hook(self, i: int, mixer):
        from .onnx_export import SelectiveScanFn, _default_scan

        ops = self.ops[i]
        operands = {"delta": "delta", "B": "Bm", "C": "Cm"}

        def scan(direction: str, inputs: ScanInputs) -> Tensor:
            key = f"layers.{i}.mixer.scan_{direction}"
            if f"h_{direction}" in ops.ssm:
                raise QDQError(f"{key}: h quantization inside the recurrence is not exported (QDQ/plugin) yet")
            for op, arg in (("A", "A"), ("D", "Dskip")):
                q = ops.ssm[f"{op}_{direction}"] if f"{op}_{direction}" in ops.ssm else None
                if q is not None:
                    inputs = inputs._replace(**{arg: q(getattr(inputs, arg))})  # constants: folded into the graph
            meta = {}
            for op, arg in operands.items():
                q = ops.ssm[f"{op}_{direction}"] if f"{op}_{direction}" in ops.ssm else None
                if q is None:
                    continue
                _check_act(q, f"{key}.{op}")
                meta[op] = _act_meta(q)
                L = self.qmodel.cfg.seq_len
                inputs = inputs._replace(**{arg: ActQDQFn.apply(getattr(inputs, arg), _token_scale(q, L), ActSpec(f"{key}.{op}", int(q.bits_inlier)))})
            self.meta["scans"][key] = meta
            return SelectiveScanFn.apply(_default_scan, key, direction == "bwd", *inputs)

        return scan


# ------------------------------------------------------------------------------ post-processing
def _to_int4(model: onnx.ModelProto, meta: dict) -> None:
    """Re-type the int8 weight codes of 4-bit linears as INT4 initializers (opset >= 21)."""
    by_name = {t.name: t for t in model.graph.initializer}
    new: dict[str, onnx.TensorProto] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not node.name.endswith("/weight_dq"):
            continue
        key = node.name[: -len("/weight_dq")]
        if meta["linears"].get(key, {}).get("w_bits") != 4:
            continue
        t = by_name.get(node.input[0])
        if t is None:
            raise QDQError(f"{key}: weight codes are not an initializer (found no {node.input[0]!r})")
        if t.data_type == TensorProto.INT4:
            continue
        arr = numpy_helper.to_array(t).astype(np.int8)
        if arr.min() < -8 or arr.max() > 7:
            raise QDQError(f"{key}: 4-bit weight codes out of [-8, 7]")
        codes = onnx.helper.make_tensor(f"{key}.weight_int4", TensorProto.INT4, arr.shape, arr.flatten().tolist())
        zero = onnx.helper.make_tensor(f"{key}.weight_zero_int4", TensorProto.INT4, [arr.shape[0]], [0] * arr.shape[0])
        new[codes.name], new[zero.name] = codes, zero
        node.input[0], node.input[2] = codes.name, zero.name
    used = {i for n in model.graph.node for i in n.input}
    nodes = [n for n in model.graph.node if n.op_type != "Constant" or n.output[0] in used]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep = [t for t in model.graph.initializer if t.name in used and t.name not in new]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + list(new.values()))


def quant_metadata(model: onnx.ModelProto) -> dict:
    """The JSON that `export_qdq` stored in metadata_props (empty dict when absent)."""
    for p in model.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    return {}


def export_qdq(qmodel: nn.Module, *, opset: int = QDQ_OPSET, batch: int = 1) -> ExportResult:
    """Export the calibrated fake-quant `qmodel` as a QDQ graph (module docstring)."""
    hi = onnx.defs.onnx_opset_version()
    if not QDQ_OPSET <= opset <= hi:
        raise QDQError(f"unsupported opset {opset} for a quantized export: use {QDQ_OPSET}..{hi} (INT4 DequantizeLinear needs >= {QDQ_OPSET})")
    if not hasattr(qmodel, "ouro_recipe"):
        raise QDQError("this model carries no quantization recipe: export_qdq needs a calibrated model (calibrate / load_quant_state)")
    qmodel = qmodel.eval()
    with _QuantHooks(qmodel) as hooks:  # the hooks route the scans through SelectiveScanFn themselves
        res = export_onnx(qmodel, example_input(qmodel, batch), opset=TORCH_MAX_OPSET, hook_scans=False)
    model = res.model
    meta = hooks.meta
    meta["recipe"] = getattr(qmodel.ouro_recipe, "name", "")
    meta["seq_len"] = int(qmodel.cfg.seq_len)
    _to_int4(model, meta)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    onnx.helper.set_model_props(model, {META_KEY: json.dumps(meta)})
    onnx.checker.check_model(model)
    return replace(res, model=model)

