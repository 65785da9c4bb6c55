"""Quantized exports (W8A8, W4A4): QDQ graphs, the plugin graph, onnxruntime vs their PyTorch twins."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from ouro.calib.models import VimConfig, build_model
from ouro.calib.quant import calibrate, iter_quant_ops
from ouro.calib.quantizers import outlier_quant_ref, unpack_int4
from ouro.exporter import onnxruntime_session
from ouro.exporter.check import PLUGIN_TOL, compare_graph, fp16_io_nodes
from ouro.exporter.onnx_export import example_input
from ouro.exporter.outputs import Stage
from ouro.exporter.passes import FP32_IO_PASSES
from ouro.exporter.quantized import QDQError, export_quantized, qdq_twin
from ouro.recipes import Target, get_preset

QDQ_RTOL = PLUGIN_TOL[0]
"""QDQ graph vs its PyTorch twin (the same static Q/DQ numerics), max |diff| / max |logits|; same
reason for the tolerance as PLUGIN_TOL (last-bit differences upstream flip a few 8-bit codes)."""
PLUGIN_RTOL = PLUGIN_TOL[0]
"""plugin graph (ORT reference ops) vs the PyTorch fake-quant model, max |diff| / max |logits|."""

SMALL = VimConfig(embed_dim=64, depth=2, img_size=32, patch_size=8, stride=8, num_classes=10, name="small")
PRESETS = ("w8a8", "w4a4")


def _demo_model():
    from ouro.calib import data

    try:
        return data.load_demo_model().eval()
    except Exception as e:  # the demo checkpoint ships with the package; absent only mid-development
        pytest.skip(f"demo model unavailable: {e}")


def _calibrated(cfg, preset: str, n_images: int = 8, method: str = "ouromamba"):
    torch.manual_seed(0)
    model = _demo_model() if cfg == "demo" else build_model(cfg).eval()
    cfg = model.cfg
    images = torch.randn(n_images, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
    recipe = get_preset(preset, method)
    recipe = recipe.with_(calib=type(recipe.calib)(steps=0, init_samples=n_images))
    return model, calibrate(model, recipe, lambda m: m(images), progress=False)


@pytest.fixture(scope="module", params=[(m, p) for m in ("small", "demo") for p in PRESETS], ids=lambda mp: f"{mp[0]}-{mp[1]}")
def exported(request):
    which, preset = request.param
    model, q = _calibrated(SMALL if which == "small" else "demo", preset)
    return preset, model, q, export_quantized(q, Target.QDQ_ONNXRUNTIME).model, export_quantized(q, Target.PLUGIN, passes=FP32_IO_PASSES).model


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _plain_session(model: onnx.ModelProto):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_qdq_graph(exported):
    """The .qdq.onnx file: standard ops only (scans as ONNX Scan loops), INT4 weights at 4 bits, runs in
    plain onnxruntime and equals the model in export mode (its twin)."""
    preset, model, q, qdq, _ = exported
    onnx.checker.check_model(qdq)
    assert max(o.version for o in qdq.opset_import if o.domain in ("", "ai.onnx")) == 21
    assert all(n.domain in ("", "ai.onnx") for n in qdq.graph.node) and not qdq.metadata_props
    ops = [n.op_type for n in qdq.graph.node]
    depth = model.cfg.depth
    n_linear = 6 * depth
    assert ops.count("MatMul") == n_linear and ops.count("QuantizeLinear") == n_linear + 3 * 2 * depth  # + delta/B/C
    assert ops.count("Scan") == 2 * depth
    int4 = [t for t in qdq.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == (2 * n_linear if preset == "w4a4" else 0)  # codes + zero point per weight
    x = example_input(model, 3)
    with qdq_twin(q), torch.no_grad():
        twin = q(x).numpy()
    assert _rel(_plain_session(qdq).run(None, {"images": x.numpy()})[0], twin) < QDQ_RTOL


def test_qdq_for_tensorrt_keeps_scan_plugin_nodes(exported):
    preset, model, q, _, _ = exported
    trt = export_quantized(q, Target.QDQ_TENSORRT).model
    ops = [n.op_type for n in trt.graph.node]
    assert ops.count("SelectiveScan") == 2 * model.cfg.depth and "Scan" not in ops
    inits = _inits(trt)
    zeros = [inits[n.input[2]] for n in trt.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(zeros) == ops.count("QuantizeLinear") + ops.count("DequantizeLinear")
    assert all(not z.astype(np.int64).any() for z in zeros)  # symmetric: every zero point is 0
    x = example_input(model, 2)
    with qdq_twin(q), torch.no_grad():
        twin = q(x).numpy()
    assert _rel(onnxruntime_session(trt).run(None, {"images": x.numpy()})[0], twin) < QDQ_RTOL


def test_plugin_graph_matches_fake_quant(exported):
    _, model, q, _, plugin = exported
    onnx.checker.check_model(plugin)
    ops = [n.op_type for n in plugin.graph.node]
    assert ops.count("OutlierLinear") == 6 * model.cfg.depth and ops.count("SelectiveScan") == 2 * model.cfg.depth
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops and not plugin.metadata_props
    for batch in (1, 3):
        x = example_input(model, batch)
        out = onnxruntime_session(plugin).run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            fq = q(x).numpy()
        assert _rel(out, fq) < PLUGIN_RTOL


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_plugin_parameters_bit_exact(exported):
    """Weight codes, scales and tables in the plugin graph are exactly the calibrated ones."""
    _, _, q, _, plugin = exported
    inits = _inits(plugin)
    nodes = {n.name: n for n in plugin.graph.node}
    for i, ops in iter_quant_ops(q):
        for name, qw in ops.weight.items():
            node = nodes[f"layers.{i}.mixer.{name}"]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            w = torch.from_numpy(inits[node.input[1]].copy())
            codes = unpack_int4(w) if attrs["w_bits"] == 4 else w.to(torch.int8)
            assert torch.equal(codes, qw.codes)
            np.testing.assert_array_equal(inits[node.input[2]], qw.scale.detach().reshape(-1).numpy())
            np.testing.assert_array_equal(inits[node.input[3]], ops.act[name].scale().detach().reshape(-1).numpy())
        for d in ("fwd", "bwd"):
            node = nodes[f"layers.{i}.mixer.scan_{d}"]
            assert len(node.input) == 15
            for op, idx in (("delta", 7), ("B", 9), ("C", 11)):
                np.testing.assert_array_equal(inits[node.input[idx]], ops.ssm[f"{op}_{d}"].scale().detach().reshape(-1).numpy())


def test_integer_codes_bit_exact(exported):
    """The input of one OutlierLinear, taken from onnxruntime, quantizes to the same integer codes and
    outlier masks under the node's attributes as under the PyTorch quantizer's own parameters."""
    _, model, q, _, plugin = exported
    node = [n for n in plugin.graph.node if n.name == "layers.1.mixer.x_proj"][0]
    m = onnx.ModelProto()
    m.CopyFrom(plugin)
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.input[0]))
    x = example_input(model, 2)
    xin = torch.from_numpy(onnxruntime_session(m).run([node.input[0]], {"images": x.numpy()})[0])
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    s_node = torch.from_numpy(_inits(plugin)[node.input[3]].copy())
    ours = outlier_quant_ref(xin, s_node, attrs["a_bits"], attrs["o_bits"], attrs["n_refresh"],
                             ("dynamic", "calibrated")[attrs["threshold_policy"]], k_sigma=attrs["k_sigma"],
                             std_correction=attrs["std_correction"])
    qa = dict(iter_quant_ops(q))[1].act["x_proj"]
    assert attrs["std_correction"] == qa.std_correction == 1  # Bessel's by default, written on the node
    theirs = outlier_quant_ref(xin, qa.scale(), qa.bits_inlier, qa.bits_outlier, qa.n_refresh, qa.policy,
                               k_sigma=qa.k_sigma, theta=qa.theta, std_correction=qa.std_correction)
    assert torch.equal(ours.inlier_codes, theirs.inlier_codes)
    assert torch.equal(ours.outlier_mask, theirs.outlier_mask)
    assert torch.equal(ours.outlier_codes, theirs.outlier_codes)
    torch.testing.assert_close(ours.x_hat, qa(xin), rtol=0, atol=0)


def test_polygraphy_comparison_in_process(exported, tmp_path):
    _, model, q, qdq, plugin = exported
    cfg = model.cfg
    images = torch.randn(8, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(3))
    for stage, graph in ((Stage.PLUGIN, plugin), (Stage.QDQ, qdq)):
        path = tmp_path / f"{stage.value}.onnx"
        onnx.save(graph, str(path))
        res = compare_graph(str(path), stage, model, q, images, tol=PLUGIN_TOL)
        assert res.passed, (stage, res)
        assert -1.0 <= res.metrics_vs_fp["cosine"] <= 1.0 and 0.0 <= res.metrics_vs_fp["top1_agreement"] <= 1.0


def test_fp16_io_graph_and_its_twin(exported, tmp_path):
    """After the fp16_io pass every OutlierLinear and SelectiveScan takes fp16 activations; the check's
    PyTorch twin rounds exactly those nodes' activations in and out to fp16, and the comparison passes."""
    _, model, q, _, plugin = exported
    g16 = export_quantized(q, Target.PLUGIN, passes=("fp16_io", "cleanup")).model
    plugin_nodes = {n.name for n in g16.graph.node if n.op_type in ("OutlierLinear", "SelectiveScan")}
    assert len(plugin_nodes) == 8 * model.cfg.depth
    assert fp16_io_nodes(g16) == plugin_nodes and not fp16_io_nodes(plugin)
    for n in g16.graph.node:
        if n.op_type == "SelectiveScan":  # u, delta, B, C, z through a Cast to fp16; A and D fp32
            casts = {c.output[0] for c in g16.graph.node if c.op_type == "Cast"}
            assert [i in casts for i in n.input[:7]] == [True, True, False, True, True, False, True]
    cfg = model.cfg
    images = torch.randn(8, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "plugin_fp16io.onnx"
    onnx.save(g16, str(path))
    res = compare_graph(str(path), Stage.PLUGIN, model, q, images, tol=PLUGIN_TOL)
    assert res.passed, res


def test_bad_inputs_fail_clearly():
    model, q = _calibrated(SMALL, "w8a8", n_images=4)
    with pytest.raises(QDQError, match="needs a QuantizedModel"):
        export_quantized(model, Target.PLUGIN)
    with pytest.raises(QDQError, match="unsupported opset 17"):
        export_quantized(q, Target.PLUGIN, opset=17)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_vim_tiny_plugin_matches_fake_quant(preset):
    """Vim-T width and tokens (d 192, L 197), 4 of its 24 blocks: with random weights a single
    rounding flip is amplified block after block, so the full random 24-block stack is no test of
    the export (the per-node outputs still agree; see the closing note)."""
    model, q = _calibrated(build_model("vim_tiny", depth=4).cfg, preset, n_images=2)
    plugin = export_quantized(q, Target.PLUGIN, passes=FP32_IO_PASSES).model
    x = example_input(model, 1)
    out = onnxruntime_session(plugin).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        fq = q(x).numpy()
    assert _rel(out, fq) < PLUGIN_RTOL


# ------------------------------------------------------------------------------ every method exports
TINY = VimConfig(embed_dim=32, depth=2, img_size=32, patch_size=8, stride=8, num_classes=10, name="tiny-export")
BASELINES = [("ptq4vm", {}), ("minmax", {}), ("percentile", {}), ("qmamba", {"tau": 0.0}), ("qmamba", {"tau": 1.0})]


def _tiny_method(method: str, params: dict):
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    r = get_preset("w4a4", method)
    r = r.with_(calib=dict(steps=1, init_samples=8, batch_size=4), **({"method_params": params} if params else {}))
    return model, calibrate(model, r, lambda m: m(images), progress=False)


@pytest.mark.parametrize("method,params", BASELINES, ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{x}" for k, x in v.items()))
def test_baseline_exports_to_qdq_and_matches_fake_quant(method, params):
    """Every baseline's W4A4 model is a QDQ graph that plain onnxruntime runs and that matches the
    PyTorch fake-quant model: its quantizers are static, so the graph expresses all of it (QMamba's
    Abar (LtSQ with tau 0, uniform with tau 1) and TGQ on h inside the lowered Scan loop)."""
    model, q = _tiny_method(method, params)
    qdq = export_quantized(q, Target.QDQ_ONNXRUNTIME).model
    assert all(n.domain in ("", "ai.onnx") for n in qdq.graph.node)
    ops = {n.op_type for n in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Scan"} <= ops
    if method == "qmamba":
        ltsq = [c["quantizer"] == "ltsq" for c in q.method_info["abar_quantizers"]]
        assert all(ltsq) if params["tau"] == 0.0 else not any(ltsq)
        assert ("Log" in ops) == (params["tau"] == 0.0)  # the LtSQ grid is lowered with the loop
    x = example_input(model, 3)
    with torch.no_grad():
        fq = q(x).numpy()
        with qdq_twin(q):
            twin = q(x).numpy()
    np.testing.assert_array_equal(twin, fq)  # nothing of these methods is dropped by the QDQ graph
    assert _rel(_plain_session(qdq).run(None, {"images": x.numpy()})[0], fq) < QDQ_RTOL


@pytest.mark.parametrize("method", ["ptq4vm", "minmax", "percentile", "qmamba"])
def test_baselines_are_refused_by_the_tensorrt_targets(method):
    from ouro.recipes import TargetError, check_recipe_target

    r = get_preset("w4a4", method)
    for target in (Target.PLUGIN, Target.QDQ_TENSORRT):
        with pytest.raises(TargetError, match=r"asymmetric .*Write the QDQ ONNX for onnxruntime \(\.qdq\.onnx\) instead"):
            check_recipe_target(r, target)
    check_recipe_target(r, Target.QDQ_ONNXRUNTIME)
