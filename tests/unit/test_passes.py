"""Each graph pass on a minimal hand-built onnx-graphsurgeon graph."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from ouro.calib.quantizers import pack_int4
from ouro.exporter.ort_ops import onnxruntime_session, outlier_linear_node_ref, selective_scan_node_ref
from ouro.exporter.passes import (
    DEFAULT_PASSES,
    PASSES,
    PassError,
    apply_passes_to_graph,
    describe_passes,
    parse_pass_names,
)

B, L, K, N = 2, 12, 8, 6
D, S = 4, 3
OUT_TOL = 1e-5
"""onnxruntime (plugin node) vs the node reference on the same input: same `_ref`, fp32."""
LOWERED_TOL = 1e-5
"""the lowered ONNX Scan loop vs the SelectiveScan node reference (both fp32, different op order)."""

def _plugin_linear_graph(seed: int = 0):
    """x -> ouro::OutlierLinear (W4A4, outliers 8-bit) -> y, as the plugin emitter builds it."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-7, 8, size=(N, K)).astype(np.int8)
    p = dict(codes=codes, w_scale=rng.uniform(0.01, 0.05, N).astype(np.float32), s_in=rng.uniform(0.1, 0.3, L).astype(np.float32),
             bias=rng.normal(size=N).astype(np.float32))
    x = gs.Variable("x", dtype=np.float32, shape=(B, L, K))
    y = gs.Variable("y", dtype=np.float32, shape=(B, L, N))
    g = gs.Graph(inputs=[x], outputs=[y], opset=21)
    weight = pack_int4(torch.from_numpy(codes)).numpy().view(np.int8)
    attrs = dict(in_features=K, out_features=N, seq_len=L, w_bits=4, a_bits=4, o_bits=8, n_refresh=5, threshold_policy=0,
                 k_sigma=3.0, max_outliers=K, plugin_version="1", plugin_namespace="ouro")
    g.nodes.append(gs.Node("OutlierLinear", "lin", domain="ouro", attrs=attrs, outputs=[y], inputs=[
        x, gs.Constant("w", weight), gs.Constant("ws", p["w_scale"]), gs.Constant("si", p["s_in"]),
        gs.Constant("th", np.zeros(L, np.float32)), gs.Constant("b", p["bias"])]))
    return g, p


def _export(g: gs.Graph) -> onnx.ModelProto:
    m = gs.export_onnx(g)
    if not any(o.domain == "ouro" for o in m.opset_import):
        m.opset_import.append(onnx.helper.make_opsetid("ouro", 1))
    onnx.checker.check_model(m)
    return m


def test_fp16_io_feeds_the_linear_fp16():
    g, p = _plugin_linear_graph()
    g = PASSES["fp16_io"].fn(g)
    assert [n.op for n in g.nodes] == ["Cast", "OutlierLinear", "Cast"]
    node = g.nodes[1]
    assert node.inputs[0].dtype == np.float16 and node.outputs[0].dtype == np.float16
    assert g.outputs[0].name == "y" and g.outputs[0].inputs[0].op == "Cast"
    assert PASSES["fp16_io"].fn(g).nodes == g.nodes  # idempotent: an fp16 node is left alone
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
    A = -rng.uniform(0.5, 1.5, (D, S)).astype(np.float32)
    Dskip = rng.normal(size=D).astype(np.float32)
    g.nodes.append(gs.Node("SelectiveScan", "layers.0.mixer.scan_fwd", domain="ouro",
                           attrs={"reverse": 0, "delta_softplus": 1, "plugin_version": "1", "plugin_namespace": "ouro"},
                           inputs=[ins["u"], ins["delta"], gs.Constant("A", A), ins["Bm"], ins["Cm"], gs.Constant("D", Dskip), ins["z"]],
                           outputs=[y]))
    feeds = {n: rng.normal(size=shapes[n]).astype(np.float32) for n in names}
    return g, feeds, dict(A=A, Dskip=Dskip)


def test_fp16_io_feeds_the_scan_fp16():
    g, feeds, p = _scan_graph()
    g = PASSES["fp16_io"].fn(g)
    node = [n for n in g.nodes if n.op == "SelectiveScan"][0]
    assert [t.dtype for t in node.inputs] == [np.float16, np.float16, np.float32, np.float16, np.float16, np.float32, np.float16]
    assert node.outputs[0].dtype == np.float16 and g.outputs[0].dtype == np.float32
    out = onnxruntime_session(_export(g)).run(None, feeds)[0]
    h = {k: v.astype(np.float16).astype(np.float32) for k, v in feeds.items()}
    ref = selective_scan_node_ref(h["u"], h["delta"], p["A"], h["Bm"], h["Cm"], p["Dskip"], h["z"]).numpy()
    np.testing.assert_allclose(out, ref.astype(np.float16).astype(np.float32), rtol=OUT_TOL, atol=OUT_TOL)


def test_lower_selective_scan_matches_the_node():
    g, feeds, p = _scan_graph()
    ref = onnxruntime_session(_export(g)).run(None, feeds)[0]
    g2, _, _ = _scan_graph()
    low = _export(PASSES["lower_selective_scan"].fn(g2))
    assert {n.op_type for n in low.graph.node} >= {"Scan"} and all(n.domain in ("", "ai.onnx") for n in low.graph.node)
    np.testing.assert_allclose(onnxruntime_session(low).run(None, feeds)[0], ref, rtol=LOWERED_TOL, atol=LOWERED_TOL)


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


def test_node_references_take_fp16_and_round_once():
    """The ORT reference ops accept fp16 activations, compute in fp32 and round the output once."""
    g, p = _plugin_linear_graph()
    node = g.nodes[0]
    a = {k: v for k, v in node.attrs.items() if not isinstance(v, str)}
    x = (np.random.default_rng(3).normal(size=(B, L, K)) * 0.5).astype(np.float16)
    args = (node.inputs[1].values, p["w_scale"], p["s_in"], np.zeros(L, np.float32), p["bias"])
    y16 = outlier_linear_node_ref(x, *args, **a)[0]
    y32 = outlier_linear_node_ref(x.astype(np.float32), *args, **a)[0]
    assert y16.dtype == torch.float16 and torch.equal(y16, y32.half())
    gs_, feeds, sp = _scan_graph()
    h = {k: v.astype(np.float16) for k, v in feeds.items()}
    s16 = selective_scan_node_ref(h["u"], h["delta"], sp["A"], h["Bm"], h["Cm"], sp["Dskip"], h["z"])
    s32 = selective_scan_node_ref(*(h[k].astype(np.float32) if k in h else sp[k if k != "D" else "Dskip"] for k in ("u", "delta", "A", "Bm", "Cm", "Dskip", "z")))
    assert s16.dtype == torch.float16 and torch.equal(s16, s32.half())
