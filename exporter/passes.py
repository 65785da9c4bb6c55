"""Graph passes on onnx-graphsurgeon: QDQ graph -> plugin graph.

Each pass is a `Graph -> Graph` function registered by name with `register_pass`; `apply_passes`
runs an ordered list of them (default: `DEFAULT_PASSES`). Unknown names fail loudly.

The quantization parameters that standard Q/DQ cannot carry (outlier bits, n_refresh, threshold
policy, k, theta) come from the QDQ model's metadata_props["ouro.quant"] (written by
`ouro.exporter.qdq`); `apply_passes` attaches them to the graph as `graph.ouro_quant`, keyed by the
name of the quantized consumer (`layers.{i}.mixer.{linear}`, `layers.{i}.mixer.scan_{dir}`).

Patterns (all emitted by qdq.py's single Q/DQ emitter):
    act    x -> Div(s) -> [Clip] -> QuantizeLinear -> DequantizeLinear -> Mul(s)     s: (1, L, 1)
    weight DequantizeLinear(codes [N, K], scale [N], axis 0) -> Transpose
    linear MatMul(act, weight) [-> Add(bias)]
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ouro.calib.quantizers import pack_int4

from .onnx_export import DOMAIN, PLUGIN_ATTRS, SCAN_OP
from .qdq import META_KEY

__all__ = [
    "PASSES",
    "DEFAULT_PASSES",
    "PassError",
    "register_pass",
    "parse_pass_names",
    "describe_passes",
    "apply_passes",
    "apply_passes_to_graph",
]

OUTLIER_LINEAR_OP = "OutlierLinear"
GraphPass = Callable[[gs.Graph], gs.Graph]


class PassError(ValueError):
    """Unknown pass name, or a graph a pass cannot transform (the message says which node)."""

    user_facing = True


@dataclass(frozen=True)
class PassSpec:
    name: str
    fn: GraphPass
    doc: str


PASSES: dict[str, PassSpec] = {}
DEFAULT_PASSES: tuple[str, ...] = ("fold_constants", "fuse_outlier_linear", "quantize_selective_scan", "cleanup")


def register_pass(name: str, doc: str) -> Callable[[GraphPass], GraphPass]:
    def deco(fn: GraphPass) -> GraphPass:
        if name in PASSES:
            raise ValueError(f"graph pass {name!r} registered twice")
        PASSES[name] = PassSpec(name, fn, doc)
        return fn

    return deco


def parse_pass_names(text: str | None) -> tuple[str, ...]:
    """`--passes a,b` -> ("a", "b"); None -> DEFAULT_PASSES. Unknown names raise PassError."""
    if text is None:
        return DEFAULT_PASSES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise PassError(f"unknown graph pass(es): {', '.join(unknown)}; known: {', '.join(PASSES)}")
    if not names:
        raise PassError(f"--passes is empty; known passes: {', '.join(PASSES)}")
    return names


def describe_passes() -> str:
    width = max(len(n) for n in PASSES)
    lines = ["graph passes (default order: " + ", ".join(DEFAULT_PASSES) + "):"]
    lines += [f"  {p.name:<{width}}  {p.doc}" for p in PASSES.values()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ pattern helpers
def _producer(t: gs.Tensor, op: str) -> gs.Node | None:
    if not t.inputs:
        return None
    n = t.inputs[0]
    return n if n.op == op else None


def _const(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    p = _producer(t, "Constant")
    if p is not None:
        return np.asarray(p.attrs["value"].values)
    return None


@dataclass
class ActMatch:
    """A matched static activation Q/DQ: input x, per-token scale (L,), inlier bits, owner key."""

    x: gs.Tensor
    scale: np.ndarray
    bits: int
    key: str


def match_act_qdq(t: gs.Tensor) -> ActMatch | None:
    """Match x -> Div(s) -> [Clip] -> Q -> DQ -> Mul(s) ending at tensor `t`."""
    mul = _producer(t, "Mul")
    if mul is None:
        return None
    dq = _producer(mul.inputs[0], "DequantizeLinear")
    q = dq and _producer(dq.inputs[0], "QuantizeLinear")
    if q is None:
        return None
    clip = _producer(q.inputs[0], "Clip")
    div = _producer((clip or q).inputs[0], "Div")
    if div is None:
        return None
    s_mul, s_div = _const(mul.inputs[1]), _const(div.inputs[1])
    if s_mul is None or s_div is None or not np.array_equal(s_mul, s_div):
        return None
    bits = 8
    if clip is not None:
        hi = _const(clip.inputs[2])
        bits = int(np.log2(float(hi) + 1)) + 1
    key = div.name.rsplit("/", 1)[0]
    return ActMatch(div.inputs[0], s_mul.astype(np.float32).reshape(-1), bits, key)


def _meta(graph: gs.Graph, kind: str, key: str) -> dict:
    meta = getattr(graph, "ouro_quant", None)
    if not meta:
        raise PassError(f"graph has no ouro quantization metadata ({META_KEY}); was it written by the QDQ export?")
    if key not in meta.get(kind, {}):
        raise PassError(f"no quantization metadata for {key!r} ({kind}); the QDQ graph and its metadata disagree")
    return meta[kind][key]


def _f32(graph_unique: str, arr) -> gs.Constant:
    return gs.Constant(graph_unique, np.ascontiguousarray(np.asarray(arr, dtype=np.float32)))


# ------------------------------------------------------------------------------ passes
@register_pass("fold_constants", "fold constant subgraphs (e.g. A = -exp(A_log)), keeping every Q/DQ node")
def fold_constants(graph: gs.Graph) -> gs.Graph:
    keep = {"QuantizeLinear", "DequantizeLinear"}
    graph.fold_constants(should_exclude_node=lambda n: n.op in keep or n.domain == DOMAIN, error_ok=True)
    return graph.cleanup()


@register_pass("fuse_outlier_linear", "DQ(W) + MatMul + activation Q/DQ [+ bias Add] -> one ouro::OutlierLinear node")
def fuse_outlier_linear(graph: gs.Graph) -> gs.Graph:
    for mm in [n for n in graph.nodes if n.op == "MatMul"]:
        act = match_act_qdq(mm.inputs[0])
        tr = _producer(mm.inputs[1], "Transpose")
        wdq = tr and _producer(tr.inputs[0], "DequantizeLinear")
        if act is None or wdq is None:
            continue
        codes, w_scale = _const(wdq.inputs[0]), _const(wdq.inputs[1])
        if codes is None or w_scale is None:
            raise PassError(f"{mm.name}: weight DequantizeLinear inputs are not constants")
        m = _meta(graph, "linears", act.key)
        N, K = codes.shape
        L = act.scale.size
        w_bits = int(m["w_bits"])
        codes8 = codes.astype(np.int8)
        weight = pack_int4_np(codes8) if w_bits == 4 else codes8
        out, bias = mm.outputs[0], np.zeros(N, np.float32)
        consumers = list(out.outputs)
        if len(consumers) == 1 and consumers[0].op == "Add" and _const(consumers[0].inputs[1]) is not None:
            add = consumers[0]
            bias = _const(add.inputs[1]).astype(np.float32).reshape(N)
            out = add.outputs[0]
            add.outputs = []
        theta = np.asarray(m.get("theta", np.zeros(L)), np.float32)
        k = act.key
        node = gs.Node(
            OUTLIER_LINEAR_OP, name=k, domain=DOMAIN,
            inputs=[act.x, gs.Constant(f"{k}.weight", weight), _f32(f"{k}.w_scale", w_scale.reshape(N)),
                    _f32(f"{k}.inlier_scale", act.scale), _f32(f"{k}.theta", theta), _f32(f"{k}.bias", bias)],
            outputs=[out],
            attrs=dict(
                in_features=K, out_features=N, seq_len=L, w_bits=w_bits, a_bits=act.bits, o_bits=int(m["o_bits"]),
                n_refresh=int(m["n_refresh"]), threshold_policy=int(m["threshold_policy"]), k_sigma=float(m["k_sigma"]),
                max_outliers=K, **PLUGIN_ATTRS,
            ),
        )
        mm.outputs = []
        graph.nodes.append(node)
    return graph.cleanup().toposort()


SCAN_OPERANDS = (("delta", 1, "delta_k_sigma"), ("B", 3, "bc_k_sigma"), ("C", 4, "bc_k_sigma"))


@register_pass("quantize_selective_scan", "strip the Q/DQ on delta/B/C of each SelectiveScan and give the node the recipe's SSM quantization tables and attributes")
def quantize_selective_scan(graph: gs.Graph) -> gs.Graph:
    for node in [n for n in graph.nodes if n.op == SCAN_OP and n.domain == DOMAIN]:
        if len(node.inputs) != 7:
            continue  # already quantized
        tables: list[gs.Tensor] = []
        attrs: dict = {}
        common: dict = {}
        for op, idx, kname in SCAN_OPERANDS:
            act = match_act_qdq(node.inputs[idx])
            lo = op.lower()
            if act is None:
                attrs.update({f"{lo}_bits": 0, f"{lo}_bits_outlier": 0})
                tables += [_f32(f"{node.name}.{lo}_scale", []), _f32(f"{node.name}.{lo}_theta", [])]
                continue
            m = _meta(graph, "scans", node.name).get(op)
            if m is None:
                raise PassError(f"{node.name}: operand {op} is quantized in the graph but has no metadata")
            node.inputs[idx] = act.x
            L = act.scale.size
            attrs.update({f"{lo}_bits": act.bits, f"{lo}_bits_outlier": int(m["o_bits"])})
            if kname not in attrs:
                attrs[kname] = float(m["k_sigma"])
            for field in ("n_refresh", "threshold_policy"):
                if common.setdefault(field, int(m[field])) != int(m[field]):
                    raise PassError(f"{node.name}: delta/B/C disagree on {field}; the plugin takes one value")
            tables += [_f32(f"{node.name}.{lo}_scale", act.scale),
                       _f32(f"{node.name}.{lo}_theta", m.get("theta", np.zeros(L)))]
        tables += [_f32(f"{node.name}.h_scale", []), _f32(f"{node.name}.h_zero", [])]
        node.inputs.extend(tables)
        node.attrs.update(dict(n_refresh=common.get("n_refresh", 1), threshold_policy=common.get("threshold_policy", 0),
                               delta_k_sigma=attrs.pop("delta_k_sigma", 4.0), bc_k_sigma=attrs.pop("bc_k_sigma", 3.0),
                               h_bits=0, h_group=1, **attrs))
    return graph.cleanup().toposort()


@register_pass("fp16_linear_io", "opt-in: run each OutlierLinear on fp16 activations (Cast in, Cast back out), so "
               "TensorRT picks the kernels' fused fp16 epilogue; y is rounded to fp16 once more")
def fp16_linear_io(graph: gs.Graph) -> gs.Graph:
    for node in [n for n in graph.nodes if n.op == OUTLIER_LINEAR_OP and n.domain == DOMAIN]:
        x, y = node.inputs[0], node.outputs[0]
        if x.dtype == np.float16:
            continue
        if x.dtype not in (None, np.float32):
            raise PassError(f"{node.name}: OutlierLinear activation has dtype {x.dtype}; expected float32 or float16")
        x16 = gs.Variable(f"{node.name}/x_fp16", dtype=np.float16, shape=x.shape)
        y16 = gs.Variable(f"{node.name}/y_fp16", dtype=np.float16, shape=y.shape)
        graph.nodes.append(gs.Node("Cast", f"{node.name}/cast_x_fp16", attrs={"to": onnx.TensorProto.FLOAT16},
                                   inputs=[x], outputs=[x16]))
        node.inputs[0] = x16
        node.outputs.clear()
        node.outputs.append(y16)
        graph.nodes.append(gs.Node("Cast", f"{node.name}/cast_y_fp32", attrs={"to": onnx.TensorProto.FLOAT},
                                   inputs=[y16], outputs=[y]))
    return graph.toposort()


@register_pass("cleanup", "remove dead nodes and tensors, then sort topologically")
def cleanup(graph: gs.Graph) -> gs.Graph:
    return graph.cleanup().toposort()


@register_pass("toposort", "sort the nodes topologically")
def toposort(graph: gs.Graph) -> gs.Graph:
    return graph.toposort()


def pack_int4_np(codes: np.ndarray) -> np.ndarray:
    """Packed int4 weight bytes stored as INT8 (same bits as `pack_int4`'s uint8): TensorRT plugins
    take INT8 inputs, not UINT8."""
    import torch

    return pack_int4(torch.from_numpy(codes)).numpy().view(np.int8)


# ------------------------------------------------------------------------------ driver
def _int4_to_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx-graphsurgeon 0.6 re-exports loaded INT4 constants with a wrong byte count, so passes work
    on INT8 codes; the INT4 type is restored for weights that stay Q/DQ (`qdq._to_int4`)."""
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == onnx.TensorProto.INT4:
            arr = numpy_helper.to_array(t).astype(np.int8)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))
    return m


def apply_passes_to_graph(graph: gs.Graph, names=DEFAULT_PASSES) -> gs.Graph:
    for name in names:
        if name not in PASSES:
            raise PassError(f"unknown graph pass {name!r}; known: {', '.join(PASSES)}")
        graph = PASSES[name].fn(graph)
    return graph


def apply_passes(model: onnx.ModelProto, names=DEFAULT_PASSES) -> onnx.ModelProto:
    """Run the named passes on a QDQ ModelProto; returns the checked result (plugin graph)."""
    from .qdq import _to_int4, quant_metadata

    meta = quant_metadata(model)
    graph = gs.import_onnx(_int4_to_int8(model))
    graph.ouro_quant = meta
    graph = apply_passes_to_graph(graph, names)
    out = gs.export_onnx(graph)
    if meta:
        _to_int4(out, meta)
        onnx.helper.set_model_props(out, {META_KEY: json.dumps(meta)})
    used = any(n.domain == DOMAIN for n in out.graph.node)
    imports = [o for o in out.opset_import if o.domain != DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(imports + ([onnx.helper.make_opsetid(DOMAIN, 1)] if used else []))
    onnx.checker.check_model(out)
    return out


# ------------------------------------------------------------------------------ scan lowering
def _scan_body(name: str) -> gs.Graph:
    """One recurrence step: h = dA_t * h + dBu_t;  y_t = sum_s h * C_t."""
    f = np.float32
    h_prev, dA, dBu, C = (gs.Variable(f"{name}/{n}", dtype=f) for n in ("h_prev", "dA_t", "dBu_t", "C_t"))
    m, h, c1, p, y = (gs.Variable(f"{name}/{n}", dtype=f) for n in ("m", "h", "c1", "p", "y"))
    body = gs.Graph(inputs=[h_prev, dA, dBu, C], outputs=[h, y], name=f"{name}/body")
    body.nodes += [
        gs.Node("Mul", inputs=[dA, h_prev], outputs=[m]),
        gs.Node("Add", inputs=[m, dBu], outputs=[h]),
        gs.Node("Unsqueeze", inputs=[C, gs.Constant(f"{name}/ax1", np.array([1], np.int64))], outputs=[c1]),
        gs.Node("Mul", inputs=[h, c1], outputs=[p]),
        gs.Node("ReduceSum", attrs={"keepdims": 0}, inputs=[p, gs.Constant(f"{name}/axm1", np.array([-1], np.int64))], outputs=[y]),
    ]
    return body


@register_pass("lower_selective_scan", "replace each unquantized SelectiveScan by standard ONNX ops (an ONNX Scan loop), for plain onnxruntime")
def lower_selective_scan(graph: gs.Graph) -> gs.Graph:
    f = np.float32
    for node in [n for n in graph.nodes if n.op == SCAN_OP and n.domain == DOMAIN]:
        if len(node.inputs) != 7:
            raise PassError(f"{node.name}: only the 7-input (unquantized operand) SelectiveScan can be lowered; run it before quantize_selective_scan")
        u, delta, A, Bm, Cm, Dskip, z = node.inputs
        k = node.name
        rev = int(node.attrs.get("reverse", 0))

        def v(n):
            return gs.Variable(f"{k}/{n}", dtype=f)

        def c(n, arr):
            return gs.Constant(f"{k}/{n}", np.asarray(arr))

        nodes = []

        def op(kind, inputs, out, **attrs):
            nodes.append(gs.Node(kind, name=f"{k}/{out.name.rsplit('/', 1)[1]}", attrs=attrs, inputs=inputs, outputs=[out]))
            return out

        dt = op("Softplus", [delta], v("dt")) if int(node.attrs.get("delta_softplus", 1)) else delta
        dt4 = op("Unsqueeze", [dt, c("axm1", np.array([-1], np.int64))], v("dt4"))
        dA = op("Exp", [op("Mul", [dt4, A], v("dtA"))], v("dA"))
        b3 = op("Unsqueeze", [Bm, c("ax2", np.array([2], np.int64))], v("B3"))
        u4 = op("Unsqueeze", [u, c("axm1u", np.array([-1], np.int64))], v("u4"))
        dBu = op("Mul", [op("Mul", [dt4, b3], v("dtB")), u4], v("dBu"))
        first = op("Gather", [dBu, c("t0", np.array(0, np.int64))], v("dBu0"), axis=1)
        h0 = op("ConstantOfShape", [op("Shape", [first], gs.Variable(f"{k}/hshape", dtype=np.int64))], v("h0"),
                value=onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0]))
        h_last, ys = v("h_last"), v("ys")
        nodes.append(gs.Node("Scan", name=f"{k}/scan", inputs=[h0, dA, dBu, Cm], outputs=[h_last, ys], attrs=dict(
            body=_scan_body(k), num_scan_inputs=3, scan_input_axes=[1, 1, 1], scan_output_axes=[1],
            scan_input_directions=[rev] * 3, scan_output_directions=[rev])))
        y = op("Add", [ys, op("Mul", [u, Dskip], v("uD"))], v("y"))
        gate = op("Mul", [z, op("Sigmoid", [z], v("sz"))], v("silu_z"))
        out = node.outputs[0]
        node.outputs = []
        nodes.append(gs.Node("Mul", name=f"{k}/out", inputs=[y, gate], outputs=[out]))
        graph.nodes += nodes
    return graph.cleanup().toposort()
