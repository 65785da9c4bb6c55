"""The model-family registry: dispatch (arch names, checkpoints, QuantStates), no family ladders in the
generic code, and VMamba through every stage the generic pipeline runs (hook points per direction,
every calibration method, QuantState, FP / QDQ / plugin ONNX with the onnxruntime reference ops)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ouro.calib.checkpoint import CheckpointError, load_checkpoint
from ouro.calib.families import all_families, arch_names, family_for_arch, family_of, get_family
from ouro.calib.metrics import sqnr_db
from ouro.calib.models import VimConfig, build_model
from ouro.calib.models.vmamba import DIRECTIONS, VMAMBA_ARCHS, VSSM, VMambaConfig
from ouro.calib.quant import QuantStateError, calibrate, iter_quant_points, load_quant_state, save_quant_state
from ouro.exporter import onnxruntime_session
from ouro.exporter.check import PLUGIN_TOL
from ouro.exporter.onnx_export import DOMAIN, SCAN_OP, example_input, export_fp
from ouro.exporter.passes import FP32_IO_PASSES
from ouro.exporter.quantized import export_quantized, qdq_twin
from ouro.recipes import Target, get_preset
from tools.scripts import repo_tool

REPO = Path(__file__).resolve().parents[2]
TINY = VMambaConfig(depths=(1, 1), dims=(32, 64), img_size=16, patch_size=4, num_classes=5, d_state=1, ssm_ratio=1.0,
                    name="tiny-family-test")
"""Released forward type (v05_noz, patch embed v2, downsample v3), 4x4 then 2x2 tokens; dt ranks 2 and 4
(even: a 4-bit OutlierLinear packs two weights per byte, as in VMamba-T/S/B)."""
GATED = VMambaConfig(depths=(1,), dims=(16,), img_size=16, patch_size=4, num_classes=5, d_state=2, ssm_ratio=2.0,
                     gate=True, mlp_ratio=0.0, name="gated-family-test")
VIM = VimConfig(embed_dim=32, depth=2, img_size=32, patch_size=8, stride=8, num_classes=10, name="tiny-vim")
FP_RTOL = 1e-4
"""FP ONNX (onnxruntime, reference scan op) vs PyTorch logits, max |diff| / max |logits| (as test_onnx_fp)."""
QUANT_RTOL = PLUGIN_TOL[0]
"""QDQ graph vs its twin, plugin graph vs the fake-quant model (as test_onnx_quant)."""
W8A8_MIN_SQNR_DB = 25.0
"""Logit SQNR of a W8A8 model vs FP on the tiny random VMamba: every method lands far above (30-50 dB
measured); a site left unquantized or quantized in the wrong token order would not move it much, a
broken one (a direction's scales applied to another's operands) drops it well below."""
METHODS = ("ouromamba", "ptq4vm", "qmamba", "minmax", "percentile")


def _model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    fam = get_family("vmamba") if isinstance(cfg, VMambaConfig) else get_family("vim")
    model = fam.build(cfg).eval()
    with torch.no_grad():  # random but non-trivial SSM parameters (the defaults give a near-identity scan)
        for name, p in model.named_parameters():
            if "A_log" in name or "dt_projs_bias" in name or name.endswith(".Ds"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def _images(cfg, n: int = 8, seed: int = 1):
    return torch.randn(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(seed))


def _calibrated(model, preset: str, method: str, steps: int = 1):
    images = _images(model.cfg)
    r = get_preset(preset, method)
    r = r.with_(calib=dict(steps=steps, init_samples=images.shape[0], batch_size=4))
    return calibrate(model, r, lambda m: m(images), progress=False)


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------ the registry
def test_registry_vim_first_then_vmamba():
    names = [f.name for f in all_families()]
    assert names[:2] == ["vim", "vmamba"]
    assert len(arch_names()) == len(set(arch_names()))
    for arch, cfg in VMAMBA_ARCHS.items():
        fam, got = family_for_arch(arch)
        assert fam.name == "vmamba" and got == cfg
    assert {"vmamba_tiny", "vmamba_small", "vmamba_base"} <= set(arch_names())
    assert family_for_arch("vim_small")[0].name == "vim"
    with pytest.raises(CheckpointError, match=r"unknown architecture 'vmamba_huge'.*vim_tiny.*vmamba_base"):
        family_for_arch("vmamba_huge")


def test_family_of_models_and_errors():
    assert family_of(_model(TINY)).name == "vmamba"
    assert family_of(build_model(VIM)).name == "vim"
    with pytest.raises(TypeError, match="not a model of a registered family"):
        family_of(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        get_family("nope")


_LADDER = re.compile(r"^\s*(?:el)?if\b.*(?:==|!=|\bin\b)\s*.*['\"](vim|vmamba|mambavision)['\"]", re.IGNORECASE)
_ISINSTANCE = re.compile(r"isinstance\([^)]*\b(VisionMamba|VSSM|MambaVision)\b")


def test_no_family_ladders_in_generic_code():
    """Issue 14: no family name in an if/elif (nor an isinstance on a family's model class) outside the
    family modules, the registry and the models themselves."""
    hits = []
    for root in ("calib", "exporter", "recipes"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith(("calib/families/", "calib/models/")):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if _LADDER.search(line) or _ISINSTANCE.search(line):
                    hits.append(f"{rel}:{n}: {line.strip()}")
    assert not hits, "family ladders in generic code:\n" + "\n".join(hits)


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_dispatch_by_family(tmp_path):
    vm, vi = _model(TINY), build_model(VIM).eval()
    torch.save({"model": vm.state_dict()}, tmp_path / "vmamba.pth")
    torch.save({"model": vi.state_dict()}, tmp_path / "vim.pth")
    a = load_checkpoint(tmp_path / "vmamba.pth", img_size=TINY.img_size)
    b = load_checkpoint(tmp_path / "vim.pth")
    assert isinstance(a, VSSM) and family_of(b).name == "vim"
    x = _images(TINY, 2)
    with torch.no_grad():
        torch.testing.assert_close(a(x), vm(x), rtol=0, atol=0)
    # a family's own errors: the other family's arch, then keys no family has
    with pytest.raises(CheckpointError, match="vmamba.pth"):
        load_checkpoint(tmp_path / "vmamba.pth", arch="vim_tiny")
    torch.save({"model": {"encoder.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"no model family recognises.*not a Vim.*not a VMamba"):
        load_checkpoint(tmp_path / "other.pth")


def test_vmamba_training_dict_through_load_checkpoint(tmp_path):
    """The full dict VMamba's main.py saves (tools/make_official_ckpt.py writes one) pickles a yacs CfgNode:
    load_checkpoint reads it weights-only and takes the input size from its DATA.IMG_SIZE."""
    cfg = VMambaConfig(**{**TINY.to_dict(), "img_size": 24})  # not what the shapes alone would say
    torch.save(repo_tool("make_official_ckpt").vmamba_checkpoint(cfg, "full"), tmp_path / "full.pth")
    model = load_checkpoint(tmp_path / "full.pth")
    assert isinstance(model, VSSM) and model.cfg.img_size == 24 and model.cfg.dims == TINY.dims


# ------------------------------------------------------------------------------ quantization
def test_vmamba_hook_points_per_direction():
    model = _model(TINY)
    points = get_family("vmamba").hook_points(model)
    assert [p.key for p in points] == ["layers.0.blocks.0", "layers.1.blocks.0"]
    for p, g in zip(points, (4, 2)):
        assert [(s.direction, s.reverse, s.layout, s.seq_len) for s in p.scans] == \
            [(d.name, d.reverse, d.order, g * g) for d in DIRECTIONS]
        assert {s.name: s.delta_for for s in p.linears if s.delta_for} == {f"dt_proj_{d.k}": d.name for d in DIRECTIONS}
        assert [s.kind for s in p.linears].count("x_proj") == 4


@pytest.mark.parametrize("method", METHODS)
def test_every_method_calibrates_vmamba(method, one_thread):
    model = _model(TINY)
    q = _calibrated(model, "w8a8", method)
    x = _images(TINY, 4, seed=2)
    with torch.no_grad():
        fp, out = model(x), q(x)
    assert sqnr_db(fp, out) > W8A8_MIN_SQNR_DB
    assert len(q.calib_losses) == 2
    for point, ops in iter_quant_points(q):
        assert set(ops.act) >= {"in_proj", "out_proj", "fc1", "fc2", *(f"x_proj_{d.k}" for d in DIRECTIONS)}
        for op in q.recipe.ssm_operands:
            assert {f"{op}_{d.name}" for d in DIRECTIONS} <= set(ops.ssm), (point.key, op)


def test_vmamba_quant_state_round_trip_and_family_check(tmp_path, one_thread):
    model = _model(TINY)
    q = _calibrated(model, "w4a4", "ouromamba")
    path = save_quant_state(q, tmp_path / "q.safetensors")
    again = load_quant_state(model, path)
    x = _images(TINY, 3, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(again(x), q(x), rtol=0, atol=0)
    with pytest.raises(QuantStateError, match="vmamba model.*vim model"):
        load_quant_state(build_model(VIM).eval(), path)


# ------------------------------------------------------------------------------ export
@pytest.mark.parametrize("cfg", [TINY, GATED], ids=["noz", "gated"])
def test_vmamba_fp_onnx(cfg, one_thread):
    """One SelectiveScan node per direction and block, reverse from the direction, 6 inputs (VMamba's gate,
    where there is one, multiplies after the out norm, outside the scans); onnxruntime with the
    reference ops equals PyTorch."""
    model = _model(cfg)
    graph = export_fp(model).model
    scans = [n for n in graph.graph.node if n.op_type == SCAN_OP and n.domain == DOMAIN]
    assert len(scans) == 4 * sum(cfg.depths)
    for n in scans:
        direction = n.name.rsplit("scan_", 1)[1]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["reverse"] == int(direction.endswith("bwd"))
        assert len(n.input) == 6
    for batch in (1, 3):
        x = example_input(model, batch)
        out = onnxruntime_session(graph).run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert _rel(out, ref) < FP_RTOL


def _plain_session(model: onnx.ModelProto):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("method", ["ouromamba", "qmamba"])
def test_vmamba_qdq_runs_in_plain_onnxruntime(method, one_thread):
    model = _model(TINY)
    q = _calibrated(model, "w4a4", method, steps=0)
    qdq = export_quantized(q, Target.QDQ_ONNXRUNTIME).model
    assert all(n.domain in ("", "ai.onnx") for n in qdq.graph.node)
    assert [n.op_type for n in qdq.graph.node].count("Scan") == 4 * sum(TINY.depths)
    x = example_input(model, 2)
    with qdq_twin(q), torch.no_grad():
        twin = q(x).numpy()
    assert _rel(_plain_session(qdq).run(None, {"images": x.numpy()})[0], twin) < QUANT_RTOL


def test_vmamba_plugin_graph_matches_fake_quant(one_thread):
    model = _model(TINY)
    q = _calibrated(model, "w4a4", "ouromamba", steps=0)
    plugin = export_quantized(q, Target.PLUGIN, passes=FP32_IO_PASSES).model
    ops = [n.op_type for n in plugin.graph.node]
    n_lin = sum(len(ops_.act) for _, ops_ in iter_quant_points(q))
    assert ops.count("OutlierLinear") == n_lin and ops.count("SelectiveScan") == 4 * sum(TINY.depths)
    assert "QuantizeLinear" not in ops
    from ouro.exporter.plugin import check_scan_nodes, ungated_scans

    assert len(ungated_scans(plugin)) == 4 * sum(TINY.depths)  # every scan: empty [0] z, read as "no gate"
    check_scan_nodes(plugin, "vmamba.onnx")  # the pre-build check accepts them (no refusal any more)
    assert not ungated_scans(export_fp(build_model(VIM).eval()).model)
    for batch in (1, 2):
        x = example_input(model, batch)
        out = onnxruntime_session(plugin).run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            fq = q(x).numpy()
        assert _rel(out, fq) < QUANT_RTOL


class _ReachedTensorRT(Exception):
    pass


def test_vmamba_graphs_reach_the_tensorrt_builder(tmp_path, monkeypatch):
    """build_engine takes ungated scans (6-input FP nodes, empty-z plugin nodes): its pre-build check passes and
    the build goes on to TensorRT (a stand-in module that stops at trt.Logger); a SelectiveScan node of a form
    the plugin does not take is refused before TensorRT, naming the node."""
    from ouro.exporter import trt_build
    from ouro.exporter.engine_config import EngineConfig
    from ouro.exporter.plugin import PluginError

    class FakeTrt:
        class Logger:
            WARNING = 0

            def __init__(self, *a):
                raise _ReachedTensorRT

    monkeypatch.setattr(trt_build, "import_tensorrt", lambda cfg=None: FakeTrt)
    lib = tmp_path / "libouro_trt_plugins.so"
    lib.write_bytes(b"\x7fELF")
    model = _model(TINY)
    q = _calibrated(model, "w4a4", "ouromamba", steps=0)
    graphs = {"fp": export_fp(model).model, "plugin": export_quantized(q, Target.PLUGIN).model}
    for name, graph in graphs.items():
        path = tmp_path / f"{name}.onnx"
        onnx.save(graph, str(path))
        with pytest.raises(_ReachedTensorRT):
            trt_build.build_engine(EngineConfig(path, tmp_path / f"{name}.plan", plugin_library=lib))
    bad = graphs["fp"]
    node = next(n for n in bad.graph.node if n.op_type == SCAN_OP)
    del node.input[5:]
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(PluginError, match=f"SelectiveScan node '{node.name}' has 5 inputs; the TensorRT plugin takes 6"):
        trt_build.build_engine(EngineConfig(tmp_path / "bad.onnx", tmp_path / "bad.plan", plugin_library=lib))


def test_plugin_refuses_odd_int4_rows():
    """dims 16: dt rank 1, an odd in_features for dt_proj at 4 bits: one clear line, no packing traceback."""
    from ouro.exporter.plugin import PluginError

    model = _model(VMambaConfig(**{**TINY.to_dict(), "dims": (16, 32)}))
    q = _calibrated(model, "w4a4", "ouromamba", steps=0)
    with pytest.raises(PluginError, match="dt_proj_0: a 4-bit OutlierLinear .* even in_features, got 1"):
        export_quantized(q, Target.PLUGIN)


# ------------------------------------------------------------------------------ OuroMamba-Gen
GEN_RTOL = 1e-5
"""The generic per-direction L^C vs Vim's own implementation (same arithmetic, other call order)."""


def test_generic_gen_losses_reduce_to_vims_definition(one_thread):
    """On a Vim (one layout with the CLS in the middle, fwd + reversed bwd) the per-direction grid form
    (ouro.calib.gen.grid) gives Vim's L^C, L^O and logits."""
    from ouro.calib.gen import GenConfig
    from ouro.calib.gen.generate import gen_losses
    from ouro.calib.gen.grid import family_gen_losses

    model = build_model(VIM).eval()
    x, t = _images(VIM, 2), torch.tensor([1, 3])
    cfg = GenConfig(mean=(0.5,) * 3, std=(0.25,) * 3, checkpoint=False)
    with torch.no_grad():
        ours, ref = family_gen_losses(model, x, t, cfg), gen_losses(model, x, t, cfg)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=GEN_RTOL, atol=GEN_RTOL)


GRID_FAST_RTOL = 1e-4
"""The fast grid L^C (blocked state attention + box-filter neighbourhood) vs its `_ref` twin (dense
neighbourhood mix over `implicit_attention`): the same sums in another order, fp32."""


@pytest.mark.parametrize("checkpoint", [False, True, None])
def test_grid_gen_losses_fast_equal_ref_with_gradients(one_thread, checkpoint):
    """On a VMamba (four directions, two of them column-major, one stage of 2x2 after 4x4) the fast
    `family_gen_losses` gives the `_ref` twin's L^C, L^O, logits and input gradient, with and without
    checkpointing (None: the readout recomputed above READOUT_CHECKPOINT_BYTES, forced here)."""
    from ouro.calib.gen import GenConfig, grid

    model = _model(TINY)
    x0, t = _images(TINY, 2), torch.tensor([1, 3])
    cfg = GenConfig(mean=(0.5,) * 3, std=(0.25,) * 3, checkpoint=checkpoint, neighbourhood=3)
    out = {}
    for name, fn in (("fast", grid.family_gen_losses), ("ref", grid.family_gen_losses_ref)):
        x = x0.clone().requires_grad_(True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(grid, "READOUT_CHECKPOINT_BYTES", 0)
            lc, lo, logits = fn(model, x, t, cfg)
            (lc + lo).sum().backward()
        out[name] = (lc.detach(), lo.detach(), logits.detach(), x.grad)
    assert float(out["ref"][0].abs().min()) > 0
    for a, b in zip(out["fast"], out["ref"]):
        torch.testing.assert_close(a, b, rtol=GRID_FAST_RTOL, atol=GRID_FAST_RTOL * float(b.abs().max()))


def test_vmamba_gen_layouts_follow_each_direction():
    """Row directions index the grid row-major, column directions column-major; the column map puts a
    column direction's attention columns back in row-major order."""
    from ouro.calib.gen.grid import column_map

    model = _model(TINY)
    fam = get_family("vmamba")
    point = fam.hook_points(model)[0]
    lays = {s.direction: fam.gen_layout(model, point, s) for s in point.scans}
    g = TINY.grids[0]
    grid_idx = torch.arange(g * g).view(g, g)
    assert torch.equal(lays["row_fwd"].positions, grid_idx.flatten())
    assert torch.equal(lays["col_bwd"].positions, grid_idx.t().flatten())
    cm = column_map(lays["row_fwd"], lays["col_fwd"])  # row-major token i sits at column-major position cm[i]
    assert torch.equal(lays["col_fwd"].positions[cm], torch.arange(g * g))


def test_gen_on_vmamba(one_thread):
    """`generate` runs on a VMamba: L^C over the four directions of every block, images move and stay in range."""
    from ouro.calib.gen import GenConfig
    from ouro.calib.gen.generate import generate

    model = _model(TINY)
    cfg = GenConfig(iterations=3, batch_size=2, lr=0.1, mean=(0.5,) * 3, std=(0.25,) * 3)
    res = generate(model, 2, 0, cfg, progress=False)
    noise = generate(model, 2, 0, cfg.replace(iterations=0), progress=False)
    assert res.images.shape == (2, 3, TINY.img_size, TINY.img_size) and torch.isfinite(res.images).all()
    assert len(res.history) == 3 and all(h["LC"] > 0 for h in res.history)
    assert not torch.equal(res.images, noise.images)
    assert res.images.min() >= (0 - 0.5) / 0.25 and res.images.max() <= (1 - 0.5) / 0.25


def test_kernel_benchmark_has_vmamba_shapes():
    """tools/bench_gemm.py's shape table: VMamba-T/S/B linears per stage, from the released configs."""
    shapes = repo_tool("bench_gemm").SHAPES
    assert shapes["vmamba_t"][:3] == [("s1.in_proj", 3136, 96, 96), ("s1.out_proj", 3136, 96, 96), ("s1.fc1", 3136, 96, 384)]
    assert shapes["vmamba_b"][-4:-2] == [("s4.in_proj", 49, 1024, 2048), ("s4.out_proj", 49, 2048, 1024)]  # ssm_ratio 2
    assert {L for _, L, _, _ in shapes["vmamba_s"]} == {3136, 784, 196, 49}
