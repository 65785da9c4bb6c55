"""onnxruntime reference implementations of ouro's custom nodes (CPU, Python, via onnxruntime-extensions).

Each node's numerics are the quantization core's `_ref` functions (ouro.calib.quantizers,
ouro.calib.scan); `selective_scan_node_ref` and `outlier_linear_node_ref` are the node-level
references, shared by the onnxruntime kernels below and the tests.

onnxruntime-extensions registers one Python kernel per (domain, op type) with a fixed arity and
fixed dtypes (no float16), and needs every declared attribute present. The files we write follow
the TensorRT plugin contract instead (7-input FP scans, 6 without a gate, 15-input quantized scans, int8 or
packed-int4 weights stored as int8 bytes, fp16 or fp32 activations: the plugin graph feeds fp16 by
default), so `onnxruntime_session` adapts an in-memory copy before creating the session: it pads
omitted inputs with empty tensors, fills absent attributes with their neutral defaults, casts float
operands to float32 (exact for fp16) and integer weights to int32, and casts the output back to the
dtype of input 0 (`CastLike`, opset >= 15): fp16 activations are computed in fp32 and the output is
rounded once. The file on disk is untouched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ouro.calib.quantizers import (
    ThresholdPolicy,
    outlier_fake_quant,
    outlier_linear_ref,
    outlier_quant_ref,
    unpack_int4,
)
from ouro.calib.scan import TemporalGroupQuant, selective_scan, selective_scan_ref

__all__ = [
    "OpSpec",
    "OPS",
    "POLICIES",
    "selective_scan_node_ref",
    "outlier_linear_node_ref",
    "prepare_for_ort",
    "onnxruntime_session",
]

DOMAIN = "ouro"
POLICIES = (ThresholdPolicy.DYNAMIC, ThresholdPolicy.CALIBRATED)
"""threshold_policy attribute value -> policy (0 dynamic, 1 calibrated)."""


@dataclass(frozen=True)
class OpSpec:
    """What the onnxruntime kernel of one custom op expects.

    inputs: one kind per input position: "act" (input 0: cast to float32, its dtype is the output's),
    "float" (cast to float32), "int" (cast to int32). attrs: name -> default (int or float; the type follows the default)."""

    inputs: tuple[str, ...]
    attrs: dict[str, int | float] = field(default_factory=dict)


SCAN_QUANT_INPUTS = ("delta_scale", "delta_theta", "b_scale", "b_theta", "c_scale", "c_theta", "h_scale", "h_zero")

OPS: dict[str, OpSpec] = {
    "SelectiveScan": OpSpec(
        inputs=("act",) + ("float",) * (6 + len(SCAN_QUANT_INPUTS)),
        attrs=dict(
            reverse=0, delta_softplus=1,
            delta_bits=0, delta_bits_outlier=0, b_bits=0, b_bits_outlier=0, c_bits=0, c_bits_outlier=0,
            n_refresh=1, threshold_policy=0, delta_k_sigma=4.0, bc_k_sigma=3.0, h_bits=0, h_group=1,
            std_correction=0,
        ),
    ),
    "OutlierLinear": OpSpec(
        inputs=("act", "int", "float", "float", "float", "float"),
        attrs=dict(
            in_features=0, out_features=0, seq_len=0, w_bits=8, a_bits=8, o_bits=16, n_refresh=1,
            threshold_policy=0, k_sigma=3.0, max_outliers=0, std_correction=0,
        ),
    ),
}


# ------------------------------------------------------------------------------ node references
def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a


def _act_quant(x: torch.Tensor, bits: int, bits_outlier: int, scale, theta, n_refresh: int, policy: int, k: float,
               std_correction: int = 0):
    """One SSM operand through the OuroMamba quantizer; bits 0 = not quantized."""
    if bits == 0:
        return x.float()
    return outlier_fake_quant(
        x.float(), _t(scale), bits, bits_outlier or 16, n_refresh, POLICIES[policy], k_sigma=k,
        theta=_t(theta) if policy == 1 else None, std_correction=int(std_correction),
    )


def selective_scan_node_ref(u, delta, A, Bm, Cm, Dskip, z=None, delta_scale=None, delta_theta=None, b_scale=None,
                            b_theta=None, c_scale=None, c_theta=None, h_scale=None, h_zero=None, **attrs) -> torch.Tensor:
    """`ouro::SelectiveScan` in PyTorch: operand quantization (delta, Bm, Cm: OuroMamba outlier
    quantizer with per-token static inlier scales; bits 0 = off), then the scan: `selective_scan_ref`
    with the TGQ h-quantizer when h_bits > 0, else the model's own dispatch `selective_scan`.
    z None or empty (0 elements; a 6-input node arrives here with an empty z): no gate.
    fp16 or fp32 activations (u, delta, B, C, z); computed in fp32, returned (B, L, D) in u's dtype
    (an fp16 output is rounded once, at the end)."""
    return _scan_node_ref(u, delta, A, Bm, Cm, Dskip, z, delta_scale, delta_theta, b_scale, b_theta, c_scale, c_theta,
                          h_scale, h_zero, **attrs).to(_t(u).dtype)


def _scan_node_ref(u, delta, A, Bm, Cm, Dskip, z, delta_scale, delta_theta, b_scale, b_theta, c_scale, c_theta, h_scale,
                   h_zero, **attrs) -> torch.Tensor:
    a = {**OPS["SelectiveScan"].attrs, **attrs}
    nr, pol, sc = int(a["n_refresh"]), int(a["threshold_policy"]), int(a["std_correction"])
    d = _act_quant(_t(delta), a["delta_bits"], a["delta_bits_outlier"], delta_scale, delta_theta, nr, pol, a["delta_k_sigma"], sc)
    b = _act_quant(_t(Bm), a["b_bits"], a["b_bits_outlier"], b_scale, b_theta, nr, pol, a["bc_k_sigma"], sc)
    c = _act_quant(_t(Cm), a["c_bits"], a["c_bits_outlier"], c_scale, c_theta, nr, pol, a["bc_k_sigma"], sc)
    kw = dict(delta_softplus=bool(a["delta_softplus"]), reverse=bool(a["reverse"]))
    u32 = _t(u).float()
    z32 = None if z is None or _t(z).numel() == 0 else _t(z).float()  # absent / empty z: no gate
    if not a["h_bits"]:
        # the dispatch the PyTorch model itself calls (chunked for L >= 16, matching _ref to fp32
        # tolerance): identical floats keep the next quantizer's codes identical (no rounding flips)
        return selective_scan(u32, d, _t(A), b, c, _t(Dskip), z32, **kw)
    hq = TemporalGroupQuant(int(a["h_bits"]), int(a["h_group"]), _t(h_scale).float(), _t(h_zero).float())
    return selective_scan_ref(u32, d, _t(A), b, c, _t(Dskip), z32, h_quant=hq, **kw)


def outlier_linear_node_ref(x, weight, w_scale, inlier_scale, theta, bias, **attrs):
    """`ouro::OutlierLinear` in PyTorch: `outlier_linear_ref` on the unpacked weight codes.

    x fp16 or fp32, computed in fp32. Returns (y (B, L, N) in x's dtype (rounded once), acc_inlier int64,
    acc_outlier, outlier_mask (B, L, K)). A window whose outlier list outgrows max_outliers yields NaN
    rows, as the CUDA kernel does."""
    a = {**OPS["OutlierLinear"].attrs, **attrs}
    w = _t(weight)
    codes = unpack_int4((w.to(torch.int16) & 0xFF).to(torch.uint8)) if int(a["w_bits"]) == 4 else w.to(torch.int8)
    pol = POLICIES[int(a["threshold_policy"])]
    th = _t(theta) if pol is ThresholdPolicy.CALIBRATED else None
    xf = _t(x).float()
    kw = dict(k_sigma=float(a["k_sigma"]), theta=th, std_correction=int(a["std_correction"]))
    y, acc_in, acc_out = outlier_linear_ref(
        xf, codes, _t(w_scale), _t(inlier_scale), int(a["a_bits"]), int(a["o_bits"]), int(a["n_refresh"]), pol,
        bias=_t(bias), **kw,
    )
    mask = outlier_quant_ref(xf, _t(inlier_scale), int(a["a_bits"]), int(a["o_bits"]), int(a["n_refresh"]), pol, **kw).outlier_mask
    cap = int(a["max_outliers"])
    if cap > 0:
        over = mask.sum(-1) > cap  # the mask only grows inside a window: the last token decides
        y = torch.where(over.unsqueeze(-1), torch.full_like(y, float("nan")), y)
    return y.to(_t(x).dtype), acc_in, acc_out, mask


# ------------------------------------------------------------------------------ ORT kernels
_REGISTERED = False


class _TorchSingleThread:
    """The kernels run many small torch ops inside onnxruntime's own thread pool; torch's intra-op
    threads only contend with it (measured 50x slower on 2 cores), so they run single-threaded."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        torch.set_num_threads(self.n)
        return False


def _register() -> None:
    """Register the Python kernels with onnxruntime-extensions (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    kind = {"act": PyCustomOpDef.dt_float, "float": PyCustomOpDef.dt_float, "int": PyCustomOpDef.dt_int32}

    def attr_types(spec: OpSpec):
        return {k: PyCustomOpDef.dt_float if isinstance(v, float) else PyCustomOpDef.dt_int64 for k, v in spec.attrs.items()}

    s = OPS["SelectiveScan"]

    @onnx_op(op_type=f"{DOMAIN}::SelectiveScan", inputs=[kind[k] for k in s.inputs], outputs=[PyCustomOpDef.dt_float],
             attrs=attr_types(s))
    def _scan(*inputs, **attrs):
        with _TorchSingleThread():
            return selective_scan_node_ref(*inputs, **attrs).numpy()

    o = OPS["OutlierLinear"]

    @onnx_op(op_type=f"{DOMAIN}::OutlierLinear", inputs=[kind[k] for k in o.inputs], outputs=[PyCustomOpDef.dt_float],
             attrs=attr_types(o))
    def _linear(*inputs, **attrs):
        with _TorchSingleThread():
            return outlier_linear_node_ref(*inputs, **attrs)[0].numpy()

    _REGISTERED = True


# ------------------------------------------------------------------------------ graph adapter
_EMPTY = "ouro_ort_empty"


def prepare_for_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    """In-memory copy of `model` shaped for the registered kernels (module docstring)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 15 and any(n.domain == DOMAIN for n in g.node):
        raise ValueError(f"ouro custom nodes need ONNX opset >= 15 under onnxruntime (CastLike); this model has opset {opset}")
    new_nodes = []
    need_empty = False
    for node in g.node:
        spec = OPS.get(node.op_type) if node.domain == DOMAIN else None
        if spec is None:
            if node.domain == DOMAIN:
                raise ValueError(f"node {node.name!r}: unknown ouro op type {node.op_type!r}; known: {', '.join(OPS)}")
            new_nodes.append(node)
            continue
        if len(node.input) > len(spec.inputs):
            raise ValueError(f"node {node.name!r} ({node.op_type}) has {len(node.input)} inputs, at most {len(spec.inputs)} expected")
        inputs = list(node.input) + [""] * (len(spec.inputs) - len(node.input))
        tag = node.name or node.op_type
        act = inputs[0]
        for i, (name, k) in enumerate(zip(inputs, spec.inputs)):
            if not name:
                inputs[i] = _EMPTY
                need_empty = True
                continue
            cast_out = f"{tag}/ort_in{i}"
            to = TensorProto.INT32 if k == "int" else TensorProto.FLOAT
            new_nodes.append(helper.make_node("Cast", [name], [cast_out], to=to, name=cast_out))
            inputs[i] = cast_out
        del node.input[:]
        node.input.extend(inputs)
        out = node.output[0]
        node.output[0] = f"{tag}/ort_out"
        after = helper.make_node("CastLike", [node.output[0], act], [out], name=f"{tag}/ort_cast_out")
        present = {a.name for a in node.attribute}
        node.attribute.extend(helper.make_attribute(k, v) for k, v in spec.attrs.items() if k not in present)
        new_nodes += [node, after]
    del g.node[:]
    g.node.extend(new_nodes)
    if need_empty:
        g.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), _EMPTY))
    return m


def onnxruntime_session(path_or_model, providers=None, sess_options=None, ops=None):
    """An onnxruntime.InferenceSession for an ONNX file (or ModelProto / bytes) with ouro's custom
    ops registered. Plain graphs pass through unchanged.

    The custom ops are the native library libouro_ort_ops.so when it is built, else the Python reference
    ops below (`ops` = "auto" | "native" | "python", default $OURO_ORT_OPS or "auto"; see
    `ouro.exporter.ort_native`, which also says which one a process took). The native session runs the
    file as written: no adapted copy.

    Without `sess_options`, graph optimisation stops at ORT_ENABLE_BASIC (exact rewrites such as
    constant folding): the extended level fuses DequantizeLinear(INT4 weight) + MatMul into kernels
    that quantize the activation again, which changed a W4 linear's output by 0.5 % (measured), and
    this session is the numerical reference."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    elif isinstance(path_or_model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(path_or_model))
    else:
        p = Path(os.fspath(path_or_model))
        if not p.is_file():
            raise FileNotFoundError(f"no ONNX file at {p}")
        model = onnx.load(str(p))
    if any(n.domain == DOMAIN for n in model.graph.node):
        from . import ort_native

        lib = ort_native.select_ops(ops)
        if lib is not None:
            return ort_native.session(model.SerializeToString(), lib, providers, sess_options)
    _register()
    so = sess_options
    if so is None:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(
        prepare_for_ort(model).SerializeToString(), so, providers=providers or ["CPUExecutionProvider"]
    )
