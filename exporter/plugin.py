"""The plugin graph's nodes, built from the quantizers (no decoding of the Q/DQ graph).

The traced graph (ouro.exporter.quantized) holds each quantizer's standard Q/DQ nodes, named
`<site>/act_div` ... `<site>/bias`, and one 7-input `ouro::SelectiveScan` per scan (6 inputs when
the scan has no gate z). For every quantized site of the model (the hook points of its family),
its quantizers give the plugin node everything it takes:

    linear <prefix>.<name>  ->  ouro::OutlierLinear(x, weight, w_scale, inlier_scale, theta, bias)
        attributes: in/out_features, seq_len, then `linear_onnx_attrs(act.format, weight.format)`,
        max_outliers; weight: the int8 codes, two int4 per byte (INT8 bytes) at w_bits 4
    scan <prefix>.scan_<dir> -> the SelectiveScan node gets delta/B/C un-quantized (the inputs of their
        Q/DQ) plus 8 tables (delta/b/c scale + theta, h_scale, h_zero) and `scan_onnx_attrs`; a
        6-input node (no gate) first gets an empty [0] z at input 6, which the plugin reads as "no gate"
(trt_plugins/*/README.md). The node replaces the site's Q/DQ nodes, which `cleanup` then drops.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import torch

from ouro.calib.quant import QuantizedModel, iter_quant_points
from ouro.calib.quantizers import pack_int4
from ouro.recipes.formats import SCAN_QUANT_OPERANDS, linear_onnx_attrs, scan_onnx_attrs

from .onnx_export import DOMAIN, PLUGIN_ATTRS, SCAN_OP

__all__ = ["OUTLIER_LINEAR_OP", "PluginError", "emit_plugin_nodes", "pack_int4_bytes", "ungated_scans", "refuse_ungated_scans"]

OUTLIER_LINEAR_OP = "OutlierLinear"


class PluginError(ValueError):
    """The traced graph and the model disagree (a site's nodes are missing); names the site."""

    user_facing = True


def pack_int4_bytes(codes: np.ndarray) -> np.ndarray:
    """Packed int4 weight bytes stored as INT8 (same bits as `pack_int4`'s uint8): TensorRT plugins
    take INT8 inputs, not UINT8."""
    return pack_int4(torch.from_numpy(codes)).numpy().view(np.int8)


def _f32(name: str, arr) -> gs.Constant:
    return gs.Constant(name, np.ascontiguousarray(np.asarray(arr, dtype=np.float32)))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _node(nodes: dict[str, gs.Node], name: str) -> gs.Node:
    n = nodes.get(name)
    if n is None:
        raise PluginError(f"the traced graph has no node {name!r}: it was not exported from this model in export mode")
    return n


def emit_plugin_nodes(graph: gs.Graph, qmodel: QuantizedModel) -> gs.Graph:
    """Replace every quantized linear's and scan's Q/DQ nodes by its plugin node (module docstring)."""
    nodes = {n.name: n for n in graph.nodes}
    linears = {}
    points = list(iter_quant_points(qmodel))
    for point, ops in points:
        for name, qa in ops.act.items():
            linears[qa.node_name] = (qa, ops.weight[name] if name in ops.weight else None, point.linear(name).module)
    # in the traced graph's order (the nodes are appended; cleanup sorts them)
    for mm in [n for n in graph.nodes if n.op == "MatMul" and n.name.endswith("/matmul")]:
        key = mm.name[: -len("/matmul")]
        if key in linears:
            graph.nodes.append(_outlier_linear(nodes, key, *linears[key]))
    scans = {f"{ops.prefix}.scan_{sc.direction}": (ops, sc.direction) for point, ops in points for sc in point.scans}
    for node in [n for n in graph.nodes if n.op == SCAN_OP and n.domain == DOMAIN and n.name in scans]:
        ops, d = scans[node.name]
        _quantize_scan(nodes, node, {op: ops.ssm[f"{op}_{d}"] for op, _, _ in SCAN_QUANT_OPERANDS if f"{op}_{d}" in ops.ssm})
    return graph


def _outlier_linear(nodes: dict[str, gs.Node], key: str, qa, qw, module) -> gs.Node:
    if qw is None:
        raise PluginError(f"{key}: an OutlierLinear node needs the weight quantized too")
    div, mm, add = _node(nodes, f"{key}/act_div"), _node(nodes, f"{key}/matmul"), _node(nodes, f"{key}/bias")
    codes = _np(qw.codes).astype(np.int8)
    N, K = codes.shape
    if qw.format.bits == 4 and K % 2:
        raise PluginError(f"{key}: a 4-bit OutlierLinear packs two weights per byte and needs an even in_features, got {K}; "
                          "quantize this linear's weights to 8 bits or write the QDQ ONNX (.qdq.onnx)")
    L = qa.seq_len
    bias = _np(module.bias).astype(np.float32) if module.bias is not None else np.zeros(N, np.float32)
    weight = pack_int4_bytes(codes) if qw.format.bits == 4 else codes
    out = add.outputs[0]
    mm.outputs, add.outputs = [], []
    return gs.Node(
        OUTLIER_LINEAR_OP, name=key, domain=DOMAIN,
        inputs=[div.inputs[0], gs.Constant(f"{key}.weight", weight), _f32(f"{key}.w_scale", _np(qw.scale).reshape(N)),
                _f32(f"{key}.inlier_scale", _np(qa.token_scale()).reshape(L)), _f32(f"{key}.theta", _np(qa.theta_table())),
                _f32(f"{key}.bias", bias)],
        outputs=[out],
        attrs=dict(in_features=K, out_features=N, seq_len=L, **linear_onnx_attrs(qa.format, qw.format), max_outliers=K,
                   **PLUGIN_ATTRS),
    )


def _quantize_scan(nodes: dict[str, gs.Node], node: gs.Node, quantizers: dict) -> None:
    if len(node.inputs) not in (6, 7):
        raise PluginError(f"{node.name}: expected the traced 6- or 7-input SelectiveScan, got {len(node.inputs)} inputs")
    if len(node.inputs) == 6:  # no gate: z is an empty tensor once more inputs follow
        node.inputs.append(_f32(f"{node.name}.z_none", []))
    tables: list[gs.Tensor] = []
    for op, prefix, _ in SCAN_QUANT_OPERANDS:
        q = quantizers.get(op)
        if q is None:
            tables += [_f32(f"{node.name}.{prefix}_scale", []), _f32(f"{node.name}.{prefix}_theta", [])]
            continue
        idx = {"delta": 1, "B": 3, "C": 4}[op]
        node.inputs[idx] = _node(nodes, f"{q.node_name}/act_div").inputs[0]
        tables += [_f32(f"{node.name}.{prefix}_scale", _np(q.token_scale()).reshape(-1)),
                   _f32(f"{node.name}.{prefix}_theta", _np(q.theta_table()))]
    tables += [_f32(f"{node.name}.h_scale", []), _f32(f"{node.name}.h_zero", [])]
    node.inputs.extend(tables)
    node.attrs.update(scan_onnx_attrs({op: q.format for op, q in quantizers.items()}))


def ungated_scans(model) -> list[str]:
    """Names of the `ouro::SelectiveScan` nodes of an onnx.ModelProto without a gate z (6 inputs, or an
    empty z initializer): VMamba's scans, whose gate (if any) acts after the out norm."""
    empty = {t.name for t in model.graph.initializer if 0 in tuple(t.dims)}
    return [n.name for n in model.graph.node if n.op_type == SCAN_OP and n.domain == DOMAIN
            and (len(n.input) < 7 or not n.input[6] or n.input[6] in empty)]


def refuse_ungated_scans(model, what: str) -> None:
    """The TensorRT SelectiveScan plugin takes z as (B, L, D) (trt_plugins/selective_scan/README.md):
    a graph with ungated scans cannot be built into an engine yet."""
    names = ungated_scans(model)
    if names:
        raise NotImplementedError(
            f"{what}: {len(names)} SelectiveScan nodes have no gate z (e.g. {names[0]}; VMamba's scans), which the "
            "TensorRT SelectiveScan plugin does not take yet (it needs z as (B, L, D)); run the .onnx with "
            "onnxruntime (ouro.exporter.onnxruntime_session) or write the .qdq.onnx"
        )
