"""--check on a quantized plugin graph: the node-level verdict (ouro.exporter.node_check)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from ouro.calib.quant import calibrate
from ouro.exporter.check import PLUGIN_TOL, CheckFailed, run_check
from ouro.exporter.context import RunContext
from ouro.exporter.node_check import LOGITS, NODE_FP16_RTOL, check_nodes
from ouro.exporter.outputs import Stage
from ouro.exporter.quantized import export_quantized
from ouro.recipes import get_preset


def _w4a4(model, calib):
    r = get_preset("w4a4")
    return calibrate(model, r.with_(calib=type(r.calib)(steps=0, init_samples=len(calib))), lambda m: m(calib), progress=False)


@pytest.fixture(scope="module")
def demo_plugin():
    from ouro.calib import data

    try:
        model = data.load_demo_model("vim")
    except Exception:
        pytest.skip("the demo checkpoint is not built yet (tools/train_demo.py)")
    q = _w4a4(model, data.load_digits_split("calib")[0][:32].float())
    return model, q, export_quantized(q, "plugin").model, data.load_digits_split("test")[0][:8].float()


def _corrupt(g: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    bad = onnx.ModelProto()
    bad.CopyFrom(g)
    t = next(t for t in bad.graph.initializer if t.name == name)
    t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * np.float32(factor), name))
    return bad


def test_demo_nodes_pass_and_a_wrong_weight_scale_fails_naming_the_node(demo_plugin):
    _, q, g, images = demo_plugin
    ok = check_nodes(g, q, images[:2])
    assert ok.passed and sum(n.op != "standard ops" for n in ok.nodes) == sum(n.domain == "ouro" for n in g.graph.node)
    assert any(n.node == LOGITS for n in ok.nodes) and sum(n.node.endswith(" input x") for n in ok.nodes) > 0
    assert ok.worst.max_rel < NODE_FP16_RTOL  # measured 3.6e-4 (fp16 I/O)
    node = "layers.2.mixer.in_proj"
    bad = check_nodes(_corrupt(g, f"{node}.w_scale", 1.1), q, images[:2])
    assert not bad.passed and bad.first_failure.node == node
    assert all(n.passed for n in bad.nodes if n.node != node)  # downstream nodes run on the graph's own inputs


@pytest.mark.parametrize("which", ["conv", "head"])
def test_a_wrong_standard_op_fails_where_it_acts(demo_plugin, which):
    """The standard ops between custom nodes are checked too: block 1's depthwise conv weight scaled by
    1.1 fails the next custom node's input (x_proj's x, first to read the conv's output); the head's
    weight scaled fails the logits entry. Every custom node itself still passes (it runs on graph values)."""
    _, q, g, images = demo_plugin
    names = [t.name for t in g.graph.initializer]
    if which == "conv":
        name, expect = "layers.1.mixer.conv1d.weight", "layers.1.mixer.x_proj input x"
    else:
        name, expect = next(n for n in names if n.startswith("head") and n.endswith("weight")), LOGITS
    bad = check_nodes(_corrupt(g, name, 1.1), q, images[:2])
    assert not bad.passed and bad.first_failure.node == expect, (name, bad.first_failure)
    assert all(n.passed for n in bad.nodes if n.op != "standard ops")


def test_run_check_fails_on_the_corrupted_node_and_writes_it_in_the_report(demo_plugin, tmp_path):
    model, q, g, images = demo_plugin
    path = tmp_path / "bad.onnx"
    onnx.save(_corrupt(g, "layers.0.mixer.x_proj.w_scale", 1.1), str(path))
    ctx = RunContext.start("cpu")
    with pytest.raises(CheckFailed, match=r"node layers\.0\.mixer\.x_proj \(OutlierLinear"):
        run_check([SimpleNamespace(graph_stage=Stage.PLUGIN, onnx_path=path)], model, q, images, fp16=False, ctx=ctx)
    r = json.loads(json.dumps(ctx.report["check"][str(path)]))
    assert r["verdict"] == "node" and not r["passed"] and r["node_check"]["failed_node"].startswith("layers.0.mixer.x_proj ")
    assert {"polygraphy_passed", "max_abs_err_vs_torch", "vs_fp", "mean_abs_err_vs_torch", "vs_torch"} <= r.keys()


@pytest.mark.slow
def test_deep_random_vim_passes_node_level_while_the_end_to_end_error_is_large(tmp_path, capsys):
    """Random-weight Vim-T width, 8 blocks, noise images: the end-to-end logits cascade past PLUGIN_TOL
    (a legitimate 4-bit boundary flip amplified by depth) while every custom node matches its twin."""
    from ouro.calib.models import build_model

    torch.manual_seed(0)
    model = build_model("vim_tiny", depth=8).eval()
    s = model.cfg.img_size
    q = _w4a4(model, torch.randn(4, 3, s, s, generator=torch.Generator().manual_seed(1)))
    path = tmp_path / "vim8.onnx"
    onnx.save(export_quantized(q, "plugin").model, str(path))
    images = torch.randn(4, 3, s, s, generator=torch.Generator().manual_seed(0))
    ctx = RunContext.start("cpu")
    run_check([SimpleNamespace(graph_stage=Stage.PLUGIN, onnx_path=path)], model, q, images, fp16=False, ctx=ctx)
    r = ctx.report["check"][str(path)]
    assert r["passed"] and r["node_check"]["passed"] and r["node_check"]["nodes"] == 64
    assert r["node_check"]["standard_op_checks"] > 64
    assert not r["polygraphy_passed"] and r["mean_abs_err_vs_torch"] > PLUGIN_TOL[1]
    out = capsys.readouterr().out
    assert "node check PASSED" in out and "Polygraphy FAILED" in out
