"""Each graph pass on a minimal hand-built onnx-graphsurgeon graph."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from ouro.calib.quantizers import outlier_fake_quant, pack_int4, qmax
from ouro.exporter.ort_ops import onnxruntime_session, outlier_linear_node_ref, selective_scan_node_ref
from ouro.exporter.passes import (
    DEFAULT_PASSES,
    PASSES,
    PassError,
    apply_passes_to_graph,
    describe_passes,
    match_act_qdq,
    parse_pass_names,
)

B, L, K, N = 2, 12, 8, 6
D, S = 4, 3
OUT_TOL = 1e-5
"""onnxruntime (fused node) vs the node reference on the same input: same `_ref`, fp32."""

META_LINEAR = {"a_bits": 4, "o_bits": 8, "n_refresh": 5, "threshold_policy": 0, "k_sigma": 3.0, "w_bits": 4}


def _act_qdq(graph: gs.Graph, x: gs.Variable, key: str, scale: np.ndarray, bits: int) -> gs.Variable:
    s = gs.Constant(f"{key}.s", scale.reshape(1, -1, 1).astype(np.float32))
    one, zero = gs.Constant(f"{key}.one", np.array(1.0, np.float32)), gs.Constant(f"{key}.zero", np.array(0, np.int8))
    t = [gs.Variable(f"{key}.t{i}", dtype=np.float32) for i in range(4)]
    graph.nodes.append(gs.Node("Div", f"{key}/act_div", inputs=[x, s], outputs=[t[0]]))
    q = float(qmax(bits))
    clip_out = gs.Variable(f"{key}.clip", dtype=np.float32)
    graph.nodes.append(gs.Node("Clip", f"{key}/act_clip", inputs=[t[0], gs.Constant(f"{key}.lo", np.array(-q, np.float32)),
                                                                  gs.Constant(f"{key}.hi", np.array(q, np.float32))], outputs=[clip_out]))
    q8 = gs.Variable(f"{key}.q", dtype=np.int8)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{key}/act_q", inputs=[clip_out, one, zero], outputs=[q8]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{key}/act_dq", inputs=[q8, one, zero], outputs=[t[1]]))
    graph.nodes.append(gs.Node("Mul", f"{key}/act_mul", inputs=[t[1], s], outputs=[t[2]]))
    return t[2]


def _linear_graph(seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(-7, 8, size=(N, K)).astype(np.int8)
    w_scale = rng.uniform(0.01, 0.05, N).astype(np.float32)
    s_in = rng.uniform(0.1, 0.3, L).astype(np.float32)
    bias = rng.normal(size=N).astype(np.float32)
    x = gs.Variable("x", dtype=np.float32, shape=(B, L, K))
    y = gs.Variable("y", dtype=np.float32, shape=(B, L, N))
    g = gs.Graph(inputs=[x], outputs=[y], opset=21)
    xq = _act_qdq(g, x, "lin", s_in, 4)
    wdq, wt, mm = (gs.Variable(n, dtype=np.float32) for n in ("wdq", "wt", "mm"))
    g.nodes.append(gs.Node("DequantizeLinear", "lin/weight_dq", attrs={"axis": 0},
                           inputs=[gs.Constant("codes", codes), gs.Constant("w_scale", w_scale), gs.Constant("wzero", np.zeros(N, np.int8))],
                           outputs=[wdq]))
    g.nodes.append(gs.Node("Transpose", "lin/weight_t", attrs={"perm": [1, 0]}, inputs=[wdq], outputs=[wt]))
    g.nodes.append(gs.Node("MatMul", "lin/matmul", inputs=[xq, wt], outputs=[mm]))
    g.nodes.append(gs.Node("Add", "lin/bias", inputs=[mm, gs.Constant("b", bias)], outputs=[y]))
    g.ouro_quant = {"linears": {"lin": dict(META_LINEAR)}, "scans": {}}
    return g, dict(codes=codes, w_scale=w_scale, s_in=s_in, bias=bias)


def _export(g: gs.Graph) -> onnx.ModelProto:
    m = gs.export_onnx(g)
    if not any(o.domain == "ouro" for o in m.opset_import):
        m.opset_import.append(onnx.helper.make_opsetid("ouro", 1))
    onnx.checker.check_model(m)
    return m


def test_match_act_qdq_reads_scale_and_bits():
    g, p = _linear_graph()
    mm = [n for n in g.nodes if n.op == "MatMul"][0]
    m = match_act_qdq(mm.inputs[0])
    assert m is not None and m.key == "lin" and m.bits == 4 and m.x.name == "x"
    np.testing.assert_array_equal(m.scale, p["s_in"])


def test_fuse_outlier_linear():
    g, p = _linear_graph()
    g = PASSES["fuse_outlier_linear"].fn(g)
    assert [n.op for n in g.nodes] == ["OutlierLinear"]
    node = g.nodes[0]
    assert node.domain == "ouro" and node.name == "lin"
    a = node.attrs
    assert (a["in_features"], a["out_features"], a["seq_len"], a["w_bits"], a["a_bits"], a["o_bits"]) == (K, N, L, 4, 4, 8)
    assert (a["n_refresh"], a["threshold_policy"], a["plugin_version"], a["plugin_namespace"]) == (5, 0, "1", "ouro")
    weight = node.inputs[1].values
    assert weight.dtype == np.int8 and weight.shape == (N, K // 2)
    np.testing.assert_array_equal(weight.view(np.uint8), pack_int4(torch.from_numpy(p["codes"])).numpy())  # bit-exact packing
    np.testing.assert_array_equal(node.inputs[3].values, p["s_in"])
    np.testing.assert_array_equal(node.inputs[5].values, p["bias"])
    # runs under onnxruntime and equals the node reference on the same input
    x = np.random.default_rng(1).normal(size=(B, L, K)).astype(np.float32) * 0.5
    x[:, :, 3] *= 20  # an outlier channel
    out = onnxruntime_session(_export(g)).run(None, {"x": x})[0]
    ref = outlier_linear_node_ref(x, weight, p["w_scale"], p["s_in"], np.zeros(L, np.float32), p["bias"], **{
        k: v for k, v in a.items() if not isinstance(v, str)})[0].numpy()
    np.testing.assert_allclose(out, ref, rtol=OUT_TOL, atol=OUT_TOL)
    # ... and the fake-quant linear (dequantized weight, outlier_fake_quant input) to float tolerance
    xq = outlier_fake_quant(torch.from_numpy(x), torch.from_numpy(p["s_in"]).reshape(1, L, 1), 4, 8, 5)
    fq = (xq @ (torch.from_numpy(p["codes"]).float() * torch.from_numpy(p["w_scale"])[:, None]).T + torch.from_numpy(p["bias"])).numpy()
    np.testing.assert_allclose(out, fq, rtol=1e-4, atol=1e-4)


def test_fp16_linear_io_feeds_the_plugin_fp16():
    g, p = _linear_graph()
    g = PASSES["fp16_linear_io"].fn(PASSES["fuse_outlier_linear"].fn(g))
    assert [n.op for n in g.nodes] == ["Cast", "OutlierLinear", "Cast"]
    node = g.nodes[1]
    assert node.inputs[0].dtype == np.float16 and node.outputs[0].dtype == np.float16
    assert g.outputs[0].name == "y" and g.outputs[0].inputs[0].op == "Cast"
    assert PASSES["fp16_linear_io"].fn(g).nodes == g.nodes  # idempotent: an fp16 node is left alone
    x = np.random.default_rng(1).normal(size=(B, L, K)).astype(np.float32) * 0.5
    x[:, :, 3] *= 20
    out = onnxruntime_session(_export(g)).run(None, {"x": x})[0]
    assert out.dtype == np.float32
    a = {k: v for k, v in node.attrs.items() if not isinstance(v, str)}
    ref = outlier_linear_node_ref(x.astype(np.float16).astype(np.float32), node.inputs[1].values, p["w_scale"],
                                  p["s_in"], np.zeros(L, np.float32), p["bias"], **a)[0].numpy()
    # the node sees the fp16-rounded x and its y is rounded to fp16 (ORT: same reference, then CastLike)
    np.testing.assert_allclose(out, ref.astype(np.float16).astype(np.float32), rtol=OUT_TOL, atol=OUT_TOL)


def _scan_graph():
    rng = np.random.default_rng(2)
    names = ("u", "delta", "Bm", "Cm", "z")
    shapes = {"u": (B, L, D), "delta": (B, L, D), "Bm": (B, L, S), "Cm": (B, L, S), "z": (B, L, D)}
    ins = {n: gs.Variable(n, dtype=np.float32, shape=shapes[n]) for n in names}
    y = gs.Variable("y", dtype=np.float32, shape=(B, L, D))
    g = gs.Graph(inputs=list(ins.values()), outputs=[y], opset=21)
    s_b = rng.uniform(0.05, 0.2, L).astype(np.float32)
    bq = _act_qdq(g, ins["Bm"], "layers.0.mixer.scan_fwd.B", s_b, 4)
    A = -rng.uniform(0.5, 1.5, (D, S)).astype(np.float32)
    Dskip = rng.normal(size=D).astype(np.float32)
    g.nodes.append(gs.Node("SelectiveScan", "layers.0.mixer.scan_fwd", domain="ouro",
                           attrs={"reverse": 0, "delta_softplus": 1, "plugin_version": "1", "plugin_namespace": "ouro"},
                           inputs=[ins["u"], ins["delta"], gs.Constant("A", A), bq, ins["Cm"], gs.Constant("D", Dskip), ins["z"]],
                           outputs=[y]))
    meta_b = {"a_bits": 4, "o_bits": 8, "n_refresh": 4, "threshold_policy": 0, "k_sigma": 3.0}
    g.ouro_quant = {"linears": {}, "scans": {"layers.0.mixer.scan_fwd": {"B": meta_b}}}
    feeds = {n: rng.normal(size=shapes[n]).astype(np.float32) for n in names}
    return g, feeds, dict(A=A, Dskip=Dskip, s_b=s_b)


def test_quantize_selective_scan():
    g, feeds, p = _scan_graph()
    g = PASSES["quantize_selective_scan"].fn(g)
    assert [n.op for n in g.nodes] == ["SelectiveScan"]
    node = g.nodes[0]
    assert len(node.inputs) == 15 and node.inputs[3].name == "Bm"
    a = node.attrs
    assert (a["b_bits"], a["b_bits_outlier"], a["delta_bits"], a["c_bits"], a["h_bits"], a["n_refresh"]) == (4, 8, 0, 0, 0, 4)
    np.testing.assert_array_equal(node.inputs[9].values, p["s_b"])  # b_scale
    assert node.inputs[7].values.size == 0 and node.inputs[13].values.size == 0  # delta_scale, h_scale empty
    out = onnxruntime_session(_export(g)).run(None, feeds)[0]
    ints = {k: v for k, v in a.items() if not isinstance(v, str)}
    ref = selective_scan_node_ref(feeds["u"], feeds["delta"], p["A"], feeds["Bm"], feeds["Cm"], p["Dskip"], feeds["z"],
                                  b_scale=p["s_b"], b_theta=np.zeros(L, np.float32), **ints).numpy()
    np.testing.assert_allclose(out, ref, rtol=OUT_TOL, atol=OUT_TOL)


def test_fold_constants_keeps_qdq():
    x = gs.Variable("x", dtype=np.float32, shape=(2, 3))
    y = gs.Variable("y", dtype=np.float32, shape=(2, 3))
    e, n, dq = (gs.Variable(s, dtype=np.float32) for s in ("e", "n", "dq"))
    g = gs.Graph(inputs=[x], outputs=[y], opset=21)
    g.nodes += [
        gs.Node("Exp", inputs=[gs.Constant("c", np.ones((2, 3), np.float32))], outputs=[e]),
        gs.Node("Neg", inputs=[e], outputs=[n]),
        gs.Node("DequantizeLinear", inputs=[gs.Constant("q", np.ones((2, 3), np.int8)), gs.Constant("s", np.array(0.5, np.float32))], outputs=[dq]),
    ]
    t = gs.Variable("t", dtype=np.float32)
    g.nodes += [gs.Node("Add", inputs=[x, n], outputs=[t]), gs.Node("Mul", inputs=[t, dq], outputs=[y])]
    g = PASSES["fold_constants"].fn(g)
    ops = sorted(n.op for n in g.nodes)
    assert ops == ["Add", "DequantizeLinear", "Mul"]
    add = [n for n in g.nodes if n.op == "Add"][0]
    np.testing.assert_allclose(add.inputs[1].values, -np.e * np.ones((2, 3)), rtol=1e-6)


def test_cleanup_and_toposort():
    x = gs.Variable("x", dtype=np.float32, shape=(2,))
    y = gs.Variable("y", dtype=np.float32, shape=(2,))
    a, dead = gs.Variable("a", dtype=np.float32), gs.Variable("dead", dtype=np.float32)
    g = gs.Graph(inputs=[x], outputs=[y], opset=17)
    g.nodes += [gs.Node("Neg", "second", inputs=[a], outputs=[y]), gs.Node("Relu", "first", inputs=[x], outputs=[a]),
                gs.Node("Abs", "unused", inputs=[x], outputs=[dead])]
    g = PASSES["cleanup"].fn(g)
    assert [n.name for n in g.nodes] == ["first", "second"]
    g.nodes.reverse()
    assert [n.name for n in PASSES["toposort"].fn(g).nodes] == ["first", "second"]


def test_unknown_pass_fails_loudly():
    with pytest.raises(PassError, match="unknown graph pass.*nope.*known: fold_constants"):
        parse_pass_names("cleanup,nope")
    with pytest.raises(PassError, match="unknown graph pass"):
        apply_passes_to_graph(gs.Graph(), ["nope"])
    assert parse_pass_names(None) == DEFAULT_PASSES
    assert parse_pass_names("cleanup, toposort") == ("cleanup", "toposort")


def test_describe_lists_every_pass():
    text = describe_passes()
    for name in PASSES:
        assert name in text


def test_missing_metadata_is_a_clear_error():
    g, _ = _linear_graph()
    g.ouro_quant = {}
    with pytest.raises(PassError, match="no ouro quantization metadata"):
        PASSES["fuse_outlier_linear"].fn(g)
