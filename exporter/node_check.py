"""Node-level check of a quantized plugin graph: every ouro custom node against its PyTorch twin.

The end-to-end logits of a deep W4A4 graph cannot be compared with a tolerance: a last-bit
difference in a standard op (RMSNorm, MatMul, Conv) moves an activation across a 4-bit rounding
boundary, the flipped code changes the next block's input, and the difference cascades (the twin
against itself with the input nudged by one float32 ulp diverges just as much). So the verdict is
taken node by node, on the graph's own values:

    1. a copy of the graph (in memory) exposes every custom node's inputs and output as graph outputs;
    2. onnxruntime runs it once (the session of `onnxruntime_session`: native ops or the Python ones);
    3. the PyTorch twin (the fake-quant model; fp16 rounding of the nodes the `fp16_io` pass feeds fp16)
       runs with every OutlierLinear / SelectiveScan op fed the graph's input values of that node, and
       its output is compared with the graph's output of that node.

A node passes when at most NODE_FLIP_FRACTION of its output elements differ by more than
rtol * max|y_graph| (rtol NODE_FP16_RTOL for a node with fp16 I/O, NODE_FP32_RTOL for fp32 I/O).

The standard ops between the custom nodes are checked the same way, without a cascade either: each
custom op of the twin passes the graph's output onward, so the twin's standard ops compute every
node's activation inputs, and finally the logits, from the graph's own values; those are compared
with the graph's (entries "<node> input <field>" and LOGITS, same tolerances: a custom node's fp16
input is the graph's cast, so it gets the fp16 tolerance). A wrong norm, conv or head weight fails here.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["NODE_FP16_RTOL", "NODE_FP32_RTOL", "NODE_FLIP_FRACTION", "NODE_IMAGES", "LOGITS", "NodeError", "NodeCheckResult",
           "custom_nodes", "check_nodes"]

NODE_FP16_RTOL = 2e-3
"""Node output error allowed for fp16 I/O, relative to the node's max |y|. Fed the graph's own inputs,
every node of the W4A4 demo and of a random-weight Vim-T (8 blocks) matched its twin within 5.5e-4
(one fp16 last bit at the top of the range is 2^-11 = 4.9e-4); 2e-3 is four such bits."""
NODE_FP32_RTOL = 1e-5
"""The same for fp32 I/O: measured 4e-7..6e-7 (float32 accumulation order), so 1e-5 leaves 16x."""
NODE_FLIP_FRACTION = 5e-3
"""Fraction of a node's output elements allowed beyond the tolerance: a quantizer input exactly on a
decision boundary (an outlier threshold, a rounding tie) may be decided differently by the two
implementations' last bits; the flip moves one token's row (1/(B*L) of the elements, 2.5e-3 at batch
2 of 197 tokens). A wrong scale, table or packed weight moves most of the elements (> 0.5). A defect
confined to a single output channel of a wide node can hide in this budget."""
LOGITS = "logits (standard ops after the last custom node)"
"""Name of the check entry of the graph's output computed by the twin from the last nodes' graph values."""
NODE_IMAGES = 2
"""Images per node check (the exposed graph keeps every intermediate of the custom nodes)."""

_FIELDS = {"OutlierLinear": (("x", 0),), "SelectiveScan": (("u", 0), ("delta", 1), ("Bm", 3), ("Cm", 4), ("z", 6))}
"""Activation inputs of each custom op (ONNX input index) that the twin's op receives."""


@dataclass
class NodeError:
    node: str
    op: str
    fp16: bool
    max_rel: float
    beyond: int
    numel: int

    @property
    def rtol(self) -> float:
        return NODE_FP16_RTOL if self.fp16 else NODE_FP32_RTOL

    @property
    def passed(self) -> bool:
        return self.beyond <= NODE_FLIP_FRACTION * self.numel

    def describe(self) -> str:
        return (f"{self.node} ({self.op}, {'fp16' if self.fp16 else 'fp32'} I/O): max |err| {self.max_rel:.3g} of max |y| "
                f"(rtol {self.rtol:g}), {self.beyond}/{self.numel} elements beyond")


@dataclass
class NodeCheckResult:
    nodes: list[NodeError] = field(default_factory=list)
    images: int = 0

    @property
    def passed(self) -> bool:
        return bool(self.nodes) and all(n.passed for n in self.nodes)

    @property
    def first_failure(self) -> NodeError | None:
        return next((n for n in self.nodes if not n.passed), None)

    @property
    def worst(self) -> NodeError:
        return max(self.nodes, key=lambda n: n.max_rel / n.rtol)

    def to_dict(self) -> dict:
        w = self.worst
        bad = self.first_failure
        return {"passed": self.passed, "nodes": sum(n.op != "standard ops" for n in self.nodes),
                "standard_op_checks": sum(n.op == "standard ops" for n in self.nodes), "images": self.images,
                "fp16_rtol": NODE_FP16_RTOL, "fp32_rtol": NODE_FP32_RTOL, "flip_fraction": NODE_FLIP_FRACTION,
                "worst_node": w.node, "worst_max_rel": w.max_rel,
                "max_rel_fp16": max((n.max_rel for n in self.nodes if n.fp16), default=None),
                "max_rel_fp32": max((n.max_rel for n in self.nodes if not n.fp16), default=None),
                "elements_beyond": sum(n.beyond for n in self.nodes),
                "failed_node": None if bad is None else bad.describe(),
                "per_node_max_rel": {n.node: n.max_rel for n in self.nodes}}


def custom_nodes(onnx_model) -> list:
    """The ouro custom nodes of a graph (OutlierLinear / SelectiveScan), in graph order."""
    from .onnx_export import DOMAIN

    return [n for n in onnx_model.graph.node if n.domain == DOMAIN]


def _absent(name: str, inits: dict) -> bool:
    if not name:
        return True
    t = inits.get(name)
    return t is not None and 0 in tuple(t.dims)


def _exposed(onnx_model, fp16_nodes: set[str]):
    """(copy of the graph with every custom node's activation inputs and output as graph outputs,
    {(node, field): tensor name})."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    inits = {t.name: t for t in m.graph.initializer}
    have = {o.name for o in m.graph.output}
    where: dict[tuple[str, str], str] = {}
    for n in custom_nodes(m):
        if n.op_type not in _FIELDS:
            raise NotImplementedError(f"--check: no PyTorch twin for custom node {n.name} ({n.domain}::{n.op_type})")
        elem = onnx.TensorProto.FLOAT16 if n.name in fp16_nodes else onnx.TensorProto.FLOAT
        for f, i in _FIELDS[n.op_type]:
            if i < len(n.input) and not _absent(n.input[i], inits):
                where[(n.name, f)] = n.input[i]
        where[(n.name, "y")] = n.output[0]
        for t in {where[k] for k in where if k[0] == n.name}:
            if t not in have:
                m.graph.output.append(onnx.helper.make_tensor_value_info(t, elem, None))
                have.add(t)
    return m, where


def _as(graph_value: np.ndarray, like: torch.Tensor, what: str) -> torch.Tensor:
    if graph_value.size != like.numel():
        raise ValueError(f"node check: {what} has {graph_value.size} elements in the graph, {like.numel()} in the twin")
    return torch.from_numpy(np.ascontiguousarray(graph_value, dtype=np.float32)).reshape(like.shape).to(like.device, like.dtype)


def _error(node, op: str, fp16: bool, twin: torch.Tensor, graph: np.ndarray) -> NodeError:
    g = np.asarray(graph, dtype=np.float32).reshape(-1)
    t = twin.detach().float().cpu().numpy().reshape(-1)
    d = np.abs(t - g)
    scale = max(float(np.abs(g).max()), 1e-30)
    tol = (NODE_FP16_RTOL if fp16 else NODE_FP32_RTOL) * scale
    d = np.where(np.isfinite(d), d, np.inf)  # a NaN or inf on either side is an error
    return NodeError(node, op, fp16, float(d.max() / scale), int((d > tol).sum()), int(d.size))


def check_nodes(onnx_model, qmodel, images: torch.Tensor) -> NodeCheckResult:
    """Run the node-level check of a quantized plugin graph (module docstring) on `images`."""
    import onnx

    from ouro.calib.families import override_ops

    from .check import _fp16_io, fp16_io_nodes
    from .ort_ops import onnxruntime_session

    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model))
    fp16_nodes = fp16_io_nodes(onnx_model)
    exposed, where = _exposed(onnx_model, fp16_nodes)
    ops = {n.name: n.op_type for n in custom_nodes(onnx_model)}
    sess = onnxruntime_session(exposed)
    names = [o.name for o in sess.get_outputs()]
    graph = dict(zip(names, sess.run(None, {"images": images.numpy().astype(np.float32)})))
    del sess, exposed
    val = {k: graph[t] for k, t in where.items()}
    result = NodeCheckResult(images=int(len(images)))
    seen: set[str] = set()

    def check_input(key: str, field: str, twin_value: torch.Tensor) -> None:
        """The twin's standard ops' value of a node's activation input (from upstream graph values) vs the graph's."""
        result.nodes.append(_error(f"{key} input {field}", "standard ops", key in fp16_nodes, twin_value, val[(key, field)]))

    def record(key: str, y: torch.Tensor) -> torch.Tensor:
        seen.add(key)
        result.nodes.append(_error(key, ops[key], key in fp16_nodes, y, val[(key, "y")]))
        return _as(val[(key, "y")], y, f"{key} output")  # downstream runs on the graph's values too

    def make(point) -> dict:
        prefix, inner_linear, inner_scan = point.path, point.module.ops.linear, point.module.ops.scan

        def linear(name, module, x):
            run = inner_linear or (lambda _n, mod, v: torch.nn.functional.linear(v, mod.weight, mod.bias))
            key = f"{prefix}.{name}"
            if key not in ops:
                return run(name, module, x)
            check_input(key, "x", x)
            return record(key, run(name, module, _as(val[(key, "x")], x, f"{key} input x")))

        def scan(direction, inputs):
            key = f"{prefix}.scan_{direction}"
            if key not in ops:
                return inner_scan(direction, inputs)
            fed = {f: _as(val[(key, f)], getattr(inputs, f), f"{key} input {f}")
                   for f, _ in _FIELDS["SelectiveScan"] if (key, f) in val and getattr(inputs, f) is not None}
            for f in fed:
                check_input(key, f, getattr(inputs, f))
            return record(key, inner_scan(direction, inputs._replace(**fed)))

        return {"linear": linear, "scan": scan}

    with torch.no_grad(), (_fp16_io(qmodel, fp16_nodes) if fp16_nodes else nullcontext()), override_ops(qmodel.module, make):
        logits = qmodel.module(images.to(next(qmodel.module.parameters()).device))
    result.nodes.append(_error(LOGITS, "standard ops", False, logits, graph[names[0]]))
    missing = [k for k in ops if k not in seen]
    if missing:
        raise NotImplementedError(f"--check: the PyTorch twin has no op for custom node(s) {', '.join(missing[:3])}")
    return result
