"""Engine-build configuration without TensorRT: batch profiles, ONNX input discovery, the exact
trtexec command lines, plugin-library lookup, atomic writes, and the no-TensorRT error."""
from __future__ import annotations

import importlib.util
import shlex
from dataclasses import replace

import onnx
import pytest
from onnx import TensorProto, helper

from ouro.exporter import engine_config as ec
from ouro.exporter import native
from ouro.exporter.engine_config import (
    BatchProfile,
    EngineConfig,
    EngineConfigError,
    InputSpec,
    TensorRTUnavailableError,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
SAMPLE_SHAPE = (3, 32, 32)  # the demo model's input


def _write_model(path, dims=("batch", *SAMPLE_SHAPE), name="images", extra_inputs=()):
    inp = helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    node = helper.make_node("ReduceMean", [name], ["logits"], keepdims=0, axes=[2, 3])
    inputs = [inp] + [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in extra_inputs]
    graph = helper.make_graph([node], "g", inputs, [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("text, expected", [("1,32,128", (1, 32, 128)), ("8", (8, 8, 8)), (" 2 , 4 ,4", (2, 4, 4))])
def test_batch_profile_parse(text, expected):
    b = BatchProfile.parse(text)
    assert (b.min, b.opt, b.max) == expected
    assert BatchProfile.parse(str(b)) == b


@pytest.mark.parametrize("text, fragment", [("32,1,128", "min <= opt <= max"), ("0,1,2", ">= 1"),
                                            ("1,2", "1 or 3"), ("a,b,c", "integers")])
def test_batch_profile_rejects(text, fragment):
    with pytest.raises(EngineConfigError, match=fragment):
        BatchProfile.parse(text)


def test_engine_config_validates():
    with pytest.raises(EngineConfigError, match=r"\.plan"):
        EngineConfig("m.onnx", "m.engine")
    with pytest.raises(EngineConfigError, match="workspace"):
        EngineConfig("m.onnx", "m.plan", workspace_mib=0)
    cfg = EngineConfig("m.onnx", "m.plan", batch="2,4,8")
    assert cfg.batch == BatchProfile(2, 4, 8)


def test_input_spec_from_onnx(tmp_path):
    spec = ec.input_spec_from_onnx(_write_model(tmp_path / "m.onnx"))
    assert spec == InputSpec("images", SAMPLE_SHAPE)
    assert spec.trtexec_shape(32) == "images:32x3x32x32"


def test_input_spec_rejects_dynamic_non_batch_dims_and_extra_inputs(tmp_path):
    with pytest.raises(EngineConfigError, match="dimension 2"):
        ec.input_spec_from_onnx(_write_model(tmp_path / "a.onnx", dims=("batch", 3, "H", 32)))
    with pytest.raises(EngineConfigError, match="exactly one graph input"):
        ec.input_spec_from_onnx(_write_model(tmp_path / "b.onnx", extra_inputs=("other",)))
    with pytest.raises(EngineConfigError, match="does not exist"):
        ec.input_spec_from_onnx(tmp_path / "missing.onnx")


def test_trtexec_build_command_exact(tmp_path):
    onnx_path = _write_model(tmp_path / "vim.onnx")
    lib = tmp_path / ec.PLUGIN_LIBRARY_NAME
    cfg = EngineConfig(onnx_path, tmp_path / "vim.plan", batch=BatchProfile(1, 32, 128), workspace_mib=2048,
                       timing_cache=tmp_path / "tc.cache", plugin_library=lib)
    assert ec.trtexec_build_command(cfg) == [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={tmp_path / 'vim.plan'}",
        f"--dynamicPlugins={lib}",
        "--minShapes=images:1x3x32x32",
        "--optShapes=images:32x3x32x32",
        "--maxShapes=images:128x3x32x32",
        "--memPoolSize=workspace:2048M",
        f"--timingCacheFile={tmp_path / 'tc.cache'}",
    ]
    # TensorRT 10 needs the explicit strongly-typed flag; 11 has it always on.
    assert "--stronglyTyped" in ec.trtexec_build_command(cfg, tensorrt_major=10)
    assert "--stronglyTyped" not in ec.trtexec_build_command(cfg, tensorrt_major=11)
    # Plugin libraries are embedded only in version-compatible plans.
    vc = ec.trtexec_build_command(EngineConfig(onnx_path, tmp_path / "vim.plan", plugin_library=lib,
                                               version_compatible=True))
    assert vc[3:6] == [f"--dynamicPlugins={lib}", "--versionCompatible", f"--setPluginsToSerialize={lib}"]


def test_trtexec_bench_command_exact():
    spec = InputSpec("images", (3, 224, 224))
    cmd = ec.trtexec_bench_command("vim_s.plan", spec, 32, plugin_library="lib/libouro_trt_plugins.so", iterations=100)
    assert cmd == ["trtexec", "--loadEngine=vim_s.plan", "--shapes=images:32x3x224x224",
                   "--dynamicPlugins=lib/libouro_trt_plugins.so", "--iterations=100", "--warmUp=500", "--duration=0",
                   "--useCudaGraph", "--noDataTransfers", "--useSpinWait"]
    assert ec.trtexec_bench_command("vim_s.plan", spec, 1, export_times="t.json")[-1] == "--exportTimes=t.json"
    with pytest.raises(EngineConfigError, match="batch"):
        ec.trtexec_bench_command("x.plan", spec, 0)


def test_shell_join_round_trips_paths_with_spaces():
    cmd = ["trtexec", "--onnx=my model.onnx"]
    assert shlex.split(ec.shell_join(cmd)) == cmd


def test_find_plugin_library(tmp_path, monkeypatch):
    lib = tmp_path / ec.PLUGIN_LIBRARY_NAME
    with pytest.raises(EngineConfigError, match="does not exist"):
        ec.find_plugin_library(lib)
    lib.write_bytes(b"\x7fELF")
    assert ec.find_plugin_library(lib) == lib
    monkeypatch.setenv(ec.PLUGIN_LIBRARY_ENV, str(lib))
    assert ec.find_plugin_library() == lib
    monkeypatch.setenv(ec.PLUGIN_LIBRARY_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(EngineConfigError, match=ec.PLUGIN_LIBRARY_ENV):
        ec.find_plugin_library()
    monkeypatch.delenv(ec.PLUGIN_LIBRARY_ENV)
    monkeypatch.setattr(native, "repo_root", lambda: tmp_path)
    assert ec.find_plugin_library() is None
    (tmp_path / native.IN_TREE_BUILD_DIR).mkdir(parents=True)
    (tmp_path / native.IN_TREE_BUILD_DIR / ec.PLUGIN_LIBRARY_NAME).write_bytes(b"\x7fELF")
    assert ec.find_plugin_library() == tmp_path / native.IN_TREE_BUILD_DIR / ec.PLUGIN_LIBRARY_NAME


def test_onnx_path_for_plan():
    assert ec.onnx_path_for_plan("out/vim_s.plan").as_posix() == "out/vim_s.onnx"


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-TensorRT path cannot be exercised")
def test_build_engine_without_tensorrt_names_install_and_trtexec(tmp_path):
    from ouro.exporter.trt_build import build_engine

    onnx_path = _write_model(tmp_path / "vim_s.onnx")
    lib = tmp_path / ec.PLUGIN_LIBRARY_NAME
    cfg = EngineConfig(onnx_path, tmp_path / "vim_s.plan", plugin_library=lib)
    with pytest.raises(TensorRTUnavailableError) as info:
        build_engine(cfg)
    msg = str(info.value)
    assert "pypi.nvidia.com" in msg and "TensorRT SDK" in msg
    assert f"The ONNX model was written to {onnx_path}" in msg
    assert ec.shell_join(ec.trtexec_build_command(cfg)) in msg
    assert ec.shell_join(ec.trtexec_build_command(replace(cfg, version_compatible=True))) in msg
    assert "--dynamicPlugins=" in msg and "--setPluginsToSerialize=" in msg
    assert not (tmp_path / "vim_s.plan").exists()
    assert getattr(info.value, "user_facing", False)


def _write_plugin_model(path):
    """A graph with one ouro::SelectiveScan node (attributes as the exporter writes them)."""
    names = ["u", "delta", "A", "Bm", "Cm", "Dskip", "z"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    node = helper.make_node("SelectiveScan", names, ["y"], domain="ouro", reverse=1, delta_softplus=1,
                            plugin_version="1", plugin_namespace="ouro")
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ouro", 1)])
    onnx.save(model, str(path))
    return path


def test_custom_ops_and_missing_plugin_library(tmp_path, monkeypatch):
    plugin_onnx = _write_plugin_model(tmp_path / "p.onnx")
    assert ec.custom_ops_in_onnx(plugin_onnx) == {"SelectiveScan": 1}
    assert ec.custom_ops_in_onnx(_write_model(tmp_path / "fp.onnx")) == {}
    monkeypatch.delenv(ec.PLUGIN_LIBRARY_ENV, raising=False)
    monkeypatch.setattr(native, "repo_root", lambda: tmp_path)  # no in-tree build
    cfg = EngineConfig.for_plan(tmp_path / "p.plan")
    assert cfg.onnx_path == tmp_path / "p.onnx" and cfg.plugin_library is None
    with pytest.raises(EngineConfigError, match=r"SelectiveScan x1.*--plugin-lib"):
        cfg.check_plugins_available()
    EngineConfig.for_plan(tmp_path / "fp.plan").check_plugins_available()  # plugin-free graph: fine


def test_for_plan_uses_cli_values(tmp_path):
    lib = tmp_path / ec.PLUGIN_LIBRARY_NAME
    lib.write_bytes(b"\x7fELF")
    cfg = EngineConfig.for_plan(tmp_path / "v.plan", batch="1,8,16", workspace_mib=1024,
                                timing_cache=tmp_path / "t.cache", plugin_library=lib)
    assert (cfg.batch, cfg.workspace_mib, cfg.timing_cache, cfg.plugin_library) == (
        BatchProfile(1, 8, 16), 1024, tmp_path / "t.cache", lib)
