"""Graph passes on onnx-graphsurgeon: `Graph -> Graph` transformations, registered by name.

    fold_constants          fold constant subgraphs (A = -exp(A_log), the dequantized A and D), keeping Q/DQ
    lower_selective_scan    each FP SelectiveScan node -> an ONNX Scan loop (plain onnxruntime, no custom ops)
    fp16_io                 fp16 activations into every OutlierLinear and SelectiveScan (Casts around them)
    cleanup / toposort      dead nodes and tensors removed / nodes sorted

`apply_passes` runs an ordered list of them on a ModelProto (`DEFAULT_PASSES`: what the plugin graph
gets after its nodes are emitted); unknown names fail loudly. The quantized nodes themselves are not
passes: each quantizer emits its own Q/DQ (ouro.calib.quant.qdq), and the plugin nodes are built
from the quantizers' formats and tensors (ouro.exporter.plugin), so no pass decodes a format from
the graph. Library decision: onnx-graphsurgeon's `GraphPattern` is not used: no pass matches a
subgraph any more (the emitters find their nodes by name, the remaining passes by op type).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .onnx_export import DOMAIN, SCAN_OP

__all__ = [
    "PASSES",
    "DEFAULT_PASSES",
    "FP32_IO_PASSES",
    "OUTLIER_LINEAR_OP",
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
DEFAULT_PASSES: tuple[str, ...] = ("fp16_io", "cleanup")
"""Passes run on the plugin graph after its nodes are emitted (`--passes` replaces them): fp16
activations into every plugin node, so TensorRT runs the kernels' fp16 paths (FP32_IO_PASSES: fp32)."""
FP32_IO_PASSES: tuple[str, ...] = ("cleanup",)
"""The plugin graph with fp32 activations into every OutlierLinear and SelectiveScan."""


def register_pass(name: str, doc: str):
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
    lines = ["graph passes run on the plugin graph after its nodes are emitted (default: " + ", ".join(DEFAULT_PASSES)
             + "; fp32 activations into the plugin nodes: " + ",".join(FP32_IO_PASSES) + "):"]
    lines += [f"  {p.name:<{width}}  {p.doc}" for p in PASSES.values()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ passes
@register_pass("fold_constants", "fold constant subgraphs (e.g. A = -exp(A_log)), keeping every Q/DQ node")
def fold_constants(graph: gs.Graph) -> gs.Graph:
    keep = {"QuantizeLinear", "DequantizeLinear"}
    graph.fold_constants(should_exclude_node=lambda n: n.op in keep or n.domain == DOMAIN, error_ok=True)
    return graph.cleanup()


def _cast(graph: gs.Graph, name: str, x: gs.Variable, to: int, dtype) -> gs.Variable:
    out = gs.Variable(name, dtype=dtype, shape=x.shape)
    graph.nodes.append(gs.Node("Cast", f"{name}_cast", attrs={"to": to}, inputs=[x], outputs=[out]))
    return out


FP16_IO_INPUTS = {OUTLIER_LINEAR_OP: (0,), SCAN_OP: (0, 1, 3, 4, 6)}
"""Activation inputs cast to fp16 per plugin node: OutlierLinear x; SelectiveScan u, delta, B, C, z
(A, D and the quantization tables stay fp32, as the plugins take them; an absent or empty z, a scan
without a gate, stays as it is)."""


def is_absent(node: gs.Node, i: int) -> bool:
    """Input i of `node` is absent: not given, an empty name, or an empty [0] constant (SelectiveScan's
    z of a scan without a gate, the tables of an operand that is not quantized)."""
    if i >= len(node.inputs):
        return True
    x = node.inputs[i]
    return not x.name or (isinstance(x, gs.Constant) and x.values.size == 0)


@register_pass("fp16_io", "fp16 activations into every OutlierLinear and SelectiveScan (Cast in, Cast back to fp32 out): "
               "TensorRT runs the kernels' fp16 paths; each node's output is rounded to fp16 once")
def fp16_io(graph: gs.Graph) -> gs.Graph:
    halves: dict[str, gs.Variable] = {}  # one Cast per tensor (z feeds both scans of a mixer)
    for node in [n for n in graph.nodes if n.domain == DOMAIN and n.op in FP16_IO_INPUTS]:
        y = node.outputs[0]
        if y.dtype == np.float16:
            continue
        for i in FP16_IO_INPUTS[node.op]:
            if is_absent(node, i):
                continue
            x = node.inputs[i]
            if x.dtype not in (None, np.float32):
                raise PassError(f"{node.name}: input {i} has dtype {x.dtype}; expected float32")
            if x.name not in halves:
                halves[x.name] = _cast(graph, f"{node.name}/in{i}_fp16", x, onnx.TensorProto.FLOAT16, np.float16)
            node.inputs[i] = halves[x.name]
        y16 = gs.Variable(f"{node.name}/y_fp16", dtype=np.float16, shape=y.shape)
        node.outputs.clear()
        node.outputs.append(y16)
        graph.nodes.append(gs.Node("Cast", f"{node.name}/y_fp32_cast", attrs={"to": onnx.TensorProto.FLOAT},
                                   inputs=[y16], outputs=[y]))
    return graph.toposort()


@register_pass("cleanup", "remove dead nodes and tensors, then sort topologically")
def cleanup(graph: gs.Graph) -> gs.Graph:
    return graph.cleanup().toposort()


@register_pass("toposort", "sort the nodes topologically")
def toposort(graph: gs.Graph) -> gs.Graph:
    return graph.toposort()


# ------------------------------------------------------------------------------ driver
def apply_passes_to_graph(graph: gs.Graph, names=DEFAULT_PASSES) -> gs.Graph:
    for name in names:
        if name not in PASSES:
            raise PassError(f"unknown graph pass {name!r}; known: {', '.join(PASSES)}")
        graph = PASSES[name].fn(graph)
    return graph


def apply_passes(model: onnx.ModelProto, names=DEFAULT_PASSES) -> onnx.ModelProto:
    """Run the named passes on a ModelProto; returns the checked result."""
    graph = apply_passes_to_graph(gs.import_onnx(model), names)
    return finish_graph(graph)


def finish_graph(graph: gs.Graph) -> onnx.ModelProto:
    """gs.export_onnx, with the ouro domain declared exactly when ouro nodes remain; checked."""
    out = gs.export_onnx(graph)
    used = any(n.domain == DOMAIN for n in out.graph.node)
    imports = [o for o in out.opset_import if o.domain != DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(imports + ([onnx.helper.make_opsetid(DOMAIN, 1)] if used else []))
    onnx.checker.check_model(out)
    return out


# ------------------------------------------------------------------------------ scan lowering
LTSQ_MIN_RATIO = 2.0**-40
"""As ouro.calib.baselines.qmamba: (u - Abar)/s is clamped below by this before the log."""


def _fake_quant_asym_nodes(op, v, c, x, scale, zero, bits: int, tag: str):
    """s * (Clip(Round(x / s) + z, 0, 2**bits - 1) - z): the same float ops as `fake_quant_asym`."""
    q = op("Round", [op("Div", [x, scale], v(f"{tag}_div"))], v(f"{tag}_round"))
    q = op("Clip", [op("Add", [q, zero], v(f"{tag}_addz")), c(f"{tag}_lo", np.array(0.0, np.float32)),
                    c(f"{tag}_hi", np.array(float((1 << bits) - 1), np.float32))], v(f"{tag}_clip"))
    return op("Mul", [op("Sub", [q, zero], v(f"{tag}_subz")), scale], v(f"{tag}_q"))


def _scan_body(name: str, h_bits: int) -> gs.Graph:
    """One recurrence step: h = dA_t * h + dBu_t [; h = TGQ(h) with this step's (s_t, z_t)]; y_t = sum_s h * C_t."""
    f = np.float32
    h_prev, dA, dBu, C = (gs.Variable(f"{name}/{n}", dtype=f) for n in ("h_prev", "dA_t", "dBu_t", "C_t"))
    m, h, c1, p, y = (gs.Variable(f"{name}/{n}", dtype=f) for n in ("m", "h", "c1", "p", "y"))
    inputs = [h_prev, dA, dBu, C]
    nodes = [gs.Node("Mul", inputs=[dA, h_prev], outputs=[m]), gs.Node("Add", inputs=[m, dBu], outputs=[h])]
    if h_bits:
        s_t, z_t = gs.Variable(f"{name}/h_scale_t", dtype=f), gs.Variable(f"{name}/h_zero_t", dtype=f)
        inputs += [s_t, z_t]

        def v(n):
            return gs.Variable(f"{name}/{n}", dtype=f)

        def c(n, arr):
            return gs.Constant(f"{name}/{n}", np.asarray(arr))

        def op(kind, ins, out):
            nodes.append(gs.Node(kind, inputs=ins, outputs=[out]))
            return out

        h = _fake_quant_asym_nodes(op, v, c, h, s_t, z_t, h_bits, "tgq")
    nodes += [
        gs.Node("Unsqueeze", inputs=[C, gs.Constant(f"{name}/ax1", np.array([1], np.int64))], outputs=[c1]),
        gs.Node("Mul", inputs=[h, c1], outputs=[p]),
        gs.Node("ReduceSum", attrs={"keepdims": 0}, inputs=[p, gs.Constant(f"{name}/axm1", np.array([-1], np.int64))], outputs=[y]),
    ]
    body = gs.Graph(inputs=inputs, outputs=[h, y], name=f"{name}/body")
    body.nodes += nodes
    return body


@register_pass("lower_selective_scan", "replace each SelectiveScan by standard ONNX ops (an ONNX Scan loop; with QMamba's "
               "TGQ of h and Abar quantizer when the node carries them), for plain onnxruntime")
def lower_selective_scan(graph: gs.Graph) -> gs.Graph:
    """Nodes with delta/B/C quantized (OuroMamba's dynamic outliers: the plugin graph) are refused;
    6/7-input nodes and the exporter's 15/19-input nodes with h (h_bits, h_group, h_scale, h_zero at
    inputs 13-14) and Abar (abar_bits, abar_ltsq; abar_scale, abar_zero, abar_upper, abar_span at
    inputs 15-18) quantized inside the recurrence are lowered. An absent or empty z: no gate."""
    f = np.float32
    for node in [n for n in graph.nodes if n.op == SCAN_OP and n.domain == DOMAIN]:
        a = node.attrs
        if len(node.inputs) not in (6, 7, 15, 19) or any(int(a.get(f"{p}_bits", 0)) for p in ("delta", "b", "c")):
            raise PassError(f"{node.name}: a SelectiveScan that quantizes delta/B/C (dynamic outliers) cannot be lowered "
                            "to standard ONNX ops; only its plugin computes it")
        u, delta, A, Bm, Cm, Dskip = node.inputs[:6]
        z = None if is_absent(node, 6) else node.inputs[6]
        k = node.name
        rev = int(a.get("reverse", 0))
        h_bits, h_group = int(a.get("h_bits", 0)), int(a.get("h_group", 1))
        abar_bits, ltsq = int(a.get("abar_bits", 0)), int(a.get("abar_ltsq", 0))

        def v(n):
            return gs.Variable(f"{k}/{n}", dtype=f)

        def c(n, arr):
            return gs.Constant(f"{k}/{n}", np.asarray(arr))

        nodes = []

        def op(kind, inputs, out, **attrs):
            nodes.append(gs.Node(kind, name=f"{k}/{out.name.rsplit('/', 1)[1]}", attrs=attrs, inputs=inputs, outputs=[out]))
            return out

        dt = op("Softplus", [delta], v("dt")) if int(a.get("delta_softplus", 1)) else delta
        dt4 = op("Unsqueeze", [dt, c("axm1", np.array([-1], np.int64))], v("dt4"))
        dA = op("Exp", [op("Mul", [dt4, A], v("dtA"))], v("dA"))
        if abar_bits:
            s_a, z_a, upper, span = node.inputs[15:19]
            if ltsq:  # upper - span * 2**-clamp(round(-log2(max((upper - Abar) / span, 2**-40))), 0, 2**b - 1)
                r = op("Max", [op("Div", [op("Sub", [upper, dA], v("ltsq_gap")), span], v("ltsq_ratio")),
                               c("ltsq_min", np.array(LTSQ_MIN_RATIO, f))], v("ltsq_r"))
                lg = op("Neg", [op("Div", [op("Log", [r], v("ltsq_ln")), c("ln2", np.array(np.log(2.0), f))], v("ltsq_log2"))],
                        v("ltsq_nlog2"))
                code = op("Clip", [op("Round", [lg], v("ltsq_round")), c("ltsq_lo", np.array(0.0, f)),
                                   c("ltsq_hi", np.array(float((1 << abar_bits) - 1), f))], v("ltsq_code"))
                step = op("Pow", [c("two", np.array(2.0, f)), op("Neg", [code], v("ltsq_ncode"))], v("ltsq_pow"))
                dA = op("Sub", [upper, op("Mul", [span, step], v("ltsq_step"))], v("dA_q"))
            else:
                dA = _fake_quant_asym_nodes(op, v, c, dA, s_a, z_a, abar_bits, "abar")
        b3 = op("Unsqueeze", [Bm, c("ax2", np.array([2], np.int64))], v("B3"))
        u4 = op("Unsqueeze", [u, c("axm1u", np.array([-1], np.int64))], v("u4"))
        dBu = op("Mul", [op("Mul", [dt4, b3], v("dtB")), u4], v("dBu"))
        first = op("Gather", [dBu, c("t0", np.array(0, np.int64))], v("dBu0"), axis=1)
        h0 = op("ConstantOfShape", [op("Shape", [first], gs.Variable(f"{k}/hshape", dtype=np.int64))], v("h0"),
                value=onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0]))
        scan_in, axes = [dA, dBu, Cm], [1, 1, 1]
        if h_bits:  # TGQ: scan step i uses group i // g, i.e. token t belongs to group (t or L-1-t) // g
            i64 = np.int64
            L = op("Gather", [op("Shape", [u], gs.Variable(f"{k}/ushape", dtype=i64)), c("dim1", np.array(1, i64))],
                   gs.Variable(f"{k}/L", dtype=i64), axis=0)
            t = op("Range", [c("zero_i", np.array(0, i64)), L, c("one_i", np.array(1, i64))], gs.Variable(f"{k}/t", dtype=i64))
            if rev:
                t = op("Sub", [op("Sub", [L, c("one_j", np.array(1, i64))], gs.Variable(f"{k}/Lm1", dtype=i64)), t],
                       gs.Variable(f"{k}/step", dtype=i64))
            group = op("Div", [t, c("h_group", np.array(h_group, i64))], gs.Variable(f"{k}/tgq_group", dtype=i64))
            scan_in += [op("Gather", [node.inputs[13], group], v("h_scale_tok"), axis=0),
                        op("Gather", [node.inputs[14], group], v("h_zero_tok"), axis=0)]
            axes += [0, 0]
        h_last, ys = v("h_last"), v("ys")
        nodes.append(gs.Node("Scan", name=f"{k}/scan", inputs=[h0, *scan_in], outputs=[h_last, ys], attrs=dict(
            body=_scan_body(k, h_bits), num_scan_inputs=len(scan_in), scan_input_axes=axes, scan_output_axes=[1],
            scan_input_directions=[rev] * len(scan_in), scan_output_directions=[rev])))
        out = node.outputs[0]
        node.outputs = []
        if z is None:
            nodes.append(gs.Node("Add", name=f"{k}/out", inputs=[ys, op("Mul", [u, Dskip], v("uD"))], outputs=[out]))
        else:
            y = op("Add", [ys, op("Mul", [u, Dskip], v("uD"))], v("y"))
            gate = op("Mul", [z, op("Sigmoid", [z], v("sz"))], v("silu_z"))
            nodes.append(gs.Node("Mul", name=f"{k}/out", inputs=[y, gate], outputs=[out]))
        graph.nodes += nodes
    return graph.cleanup().toposort()
