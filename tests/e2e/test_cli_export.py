"""`ouro-export` end to end (in-process): FP / plugin / QDQ exports, --check, output naming and safety."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pytest
import torch

from ouro.calib.models import VimConfig, build_model
from ouro.exporter.cli import main

SMALL = VimConfig(embed_dim=64, depth=2, img_size=32, patch_size=8, stride=8, num_classes=10, name="small")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    ckpt = d / "small.pth"
    torch.save({"model": build_model(SMALL).state_dict()}, ckpt)
    calib = d / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(calib / f"{i}.png")
    return d, ckpt, calib


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_fp_export_check_report(files, capsys, tmp_path):
    _, ckpt, _ = files
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    rc, stdout, err = _run([ckpt, "-o", out, "--check", "--report", rep], capsys)
    assert rc == 0, err
    onnx.checker.check_model(onnx.load(str(out)))
    assert "Polygraphy PASSED" in stdout
    r = json.loads(rep.read_text())["check"][str(out)]
    assert r["polygraphy_passed"] and r["stage"] == "fp" and r["vs_fp"]["top1_agreement"] == 1.0
    assert stat.S_IMODE(out.stat().st_mode) & 0o044  # readable like any other file (not mkstemp's 0600)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_existing_output_needs_force(files, capsys, tmp_path):
    _, ckpt, _ = files
    out = tmp_path / "m.onnx"
    out.write_text("old")
    rc, _, err = _run([ckpt, "-o", out], capsys)
    assert rc == 2 and "already exists; pass --force" in err and out.read_text() == "old"
    rc, _, err = _run([ckpt, "-o", out, "--force"], capsys)
    assert rc == 0, err
    onnx.checker.check_model(onnx.load(str(out)))


@pytest.mark.parametrize("name,msg", [("m.txt", "cannot tell the output format"), ("missing_dir/m.onnx", "does not exist")])
def test_bad_output_path(files, capsys, tmp_path, name, msg):
    _, ckpt, _ = files
    rc, _, err = _run([ckpt, "-o", tmp_path / name], capsys)
    assert rc == 2 and msg in err and err.count("\n") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_folder(files, capsys, tmp_path):
    _, ckpt, _ = files
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    rc, _, err = _run([ckpt, "-o", ro / "m.onnx"], capsys)
    assert rc == 2 and "not writable" in err


def test_quantized_outputs_need_a_recipe(files, capsys, tmp_path):
    _, ckpt, _ = files
    rc, _, err = _run([ckpt, "-o", tmp_path / "m.qdq.onnx"], capsys)
    assert rc == 2 and "needs a quantized model" in err


def test_unknown_pass_and_opset_fail_before_work(files, capsys, tmp_path):
    _, ckpt, calib = files
    rc, _, err = _run([ckpt, "--w8a8", "--calib-dir", calib, "-o", tmp_path / "m.onnx", "--passes", "cleanup,nope"], capsys)
    assert rc == 2 and "unknown graph pass" in err and "nope" in err
    rc, _, err = _run([ckpt, "--w8a8", "--calib-dir", calib, "-o", tmp_path / "m.onnx", "--opset", "17"], capsys)
    assert rc == 2 and "unsupported --opset 17" in err
    assert not list(tmp_path.iterdir())


def test_print_passes(capsys):
    rc, out, _ = _run(["--print-passes"], capsys)
    assert rc == 0 and "fp16_io" in out and "lower_selective_scan" in out and "default:" in out


def test_w4a4_plugin_and_qdq(files, capsys, tmp_path):
    _, ckpt, calib = files
    state = tmp_path / "q.safetensors"
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    rc, stdout, err = _run([ckpt, "--w4a4", "--calib-dir", calib, "--save-calib", state, "-o", out, "--check", "--report", rep], capsys)
    assert rc == 0, err
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("OutlierLinear") == 6 * SMALL.depth and ops.count("SelectiveScan") == 2 * SMALL.depth
    r = json.loads(rep.read_text())["check"][str(out)]
    assert r["passed"] and r["verdict"] == "node" and r["node_check"]["nodes"] == 8 * SMALL.depth
    assert r["images_source"] == "--calib-dir" and "polygraphy_passed" in r  # end to end: reported, not the verdict
    assert "(plugin): node check PASSED" in stdout
    # resume from the QuantState: the QDQ graph
    qdq = tmp_path / "m.qdq.onnx"
    rc, stdout, err = _run([ckpt, "--load-calib", state, "-o", qdq, "--check"], capsys)
    assert rc == 0, err
    assert "Polygraphy PASSED" in stdout
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(qdq)).graph.node}


@pytest.mark.parametrize("name", ["m.onnx", "m.plan"])
def test_w6a6_refused_before_calibration_by_the_plugin_targets(files, capsys, tmp_path, name):
    _, ckpt, calib = files
    rc, out, err = _run([ckpt, "--w6a6", "--calib-dir", calib, "-o", tmp_path / name], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "plugin ONNX / TensorRT engine" in err and "6-bit (supported: 4, 8)" in err and ".qdq.onnx" in err
    assert out == "" and not list(tmp_path.iterdir())  # refused before loading, calibrating or writing


def test_w6a6_qdq_and_a_baseline(files, capsys, tmp_path):
    """`--w6a6 -o x.qdq.onnx` works (plain onnxruntime); so does a baseline's QDQ graph, checked with Polygraphy;
    a QuantState whose recipe the plugin graph cannot express is refused before the model is loaded."""
    import onnxruntime as ort

    _, ckpt, calib = files
    qdq, state = tmp_path / "w6a6.qdq.onnx", tmp_path / "w6a6.safetensors"
    rc, _, err = _run([ckpt, "--w6a6", "--calib-dir", calib, "--save-calib", state, "-o", qdq], capsys)
    assert rc == 0, err
    sess = ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"])  # no ouro ops registered
    assert sess.run(None, {"images": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, SMALL.num_classes)
    rc, _, err = _run([ckpt, "--load-calib", state, "-o", tmp_path / "m.onnx"], capsys)
    assert rc == 2 and "cannot express recipe 'w6a6'" in err and not (tmp_path / "m.onnx").exists()
    base = tmp_path / "ptq4vm.qdq.onnx"
    rc, stdout, err = _run([ckpt, "--w4a4", "--method", "ptq4vm", "--calib-dir", calib, "-o", base, "--check"], capsys)
    assert rc == 0, err
    assert "Polygraphy PASSED" in stdout


def test_plan_without_tensorrt_writes_onnx_then_explains(files, capsys, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    _, ckpt, _ = files
    rc, _, err = _run([ckpt, "-o", tmp_path / "m.plan"], capsys)
    assert rc == 2
    assert (tmp_path / "m.onnx").is_file() and not (tmp_path / "m.plan").exists()
    assert "tensorrt" in err.lower() and "trtexec" in err


@pytest.mark.slow
def test_demo_w4a4_check(capsys, tmp_path):
    """The issue's acceptance command: `ouro-export --demo --w4a4 -o demo.onnx --check`."""
    from ouro.calib import data

    try:
        files = data.demo_files()
        present = all(p.is_file() for p in files)
    except Exception:
        present = False
    if not present:
        pytest.skip("the demo checkpoint is not built yet (tools/train_demo.py)")
    out = tmp_path / "demo.onnx"
    rc, stdout, err = _run(["--demo", "--w4a4", "-o", out, "--check"], capsys)
    assert rc == 0, err
    assert "(plugin): node check PASSED" in stdout and "Polygraphy PASSED" in stdout  # the demo also passes end to end


def test_polygraphy_run_extension(files, capsys, tmp_path):
    """`polygraphy run model.onnx --ouro-onnxrt` loads the custom ops (the stock --onnxrt cannot)."""
    import shutil
    import subprocess

    exe = shutil.which("polygraphy")
    if exe is None:
        pytest.skip("polygraphy CLI not on PATH")
    _, ckpt, _ = files
    out = tmp_path / "m.onnx"
    assert _run([ckpt, "-o", out], capsys)[0] == 0
    r = subprocess.run([exe, "run", str(out), "--ouro-onnxrt"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "PASSED" in r.stdout + r.stderr


# ------------------------------------------------------------------------------ VMamba (issue 14)
def test_vmamba_checkpoint_fp_check_and_arch_errors(capsys, tmp_path):
    """An official-format VMamba file goes through the same CLI: FP ONNX + --check; another family's or
    a wrong --arch, and an unknown --demo, are one-line errors."""
    from ouro.calib.models.vmamba import VSSM, VMambaConfig

    cfg = VMambaConfig(depths=(1, 1), dims=(32, 64), img_size=16, num_classes=5, name="e2e-vmamba")
    torch.manual_seed(0)
    ckpt = tmp_path / "vmamba.pth"
    torch.save({"model": VSSM(cfg).state_dict()}, ckpt)
    rc, stdout, err = _run([ckpt, "-o", tmp_path / "v.onnx", "--check"], capsys)
    assert rc == 0, err
    assert "Polygraphy PASSED" in stdout
    for arch in ("vmamba_tiny", "vim_tiny"):
        rc, _, err = _run([ckpt, "--arch", arch, "-o", tmp_path / "never.onnx"], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "does not match" in err, err
    rc, _, err = _run(["--demo", "nope", "-o", tmp_path / "never.onnx"], capsys)
    assert rc == 2 and "--demo nope" in err and "vmamba" in err


@pytest.mark.slow
def test_vmamba_demo_w4a4_plugin_check(capsys, tmp_path):
    """Issue 14's acceptance: the plugin graph of the VMamba demo passes --check."""
    rc, stdout, err = _run(["--demo", "vmamba", "--w4a4", "-o", tmp_path / "vmamba_demo.onnx", "--check"], capsys)
    assert rc == 0, err
    assert "vmamba_demo.onnx (plugin): node check PASSED" in stdout  # the path is printed in full


# ------------------------------------------------------------------------------ MambaVision (issue 15)
@pytest.mark.slow
def test_mambavision_checkpoint_fp_check_and_gen(capsys, tmp_path):
    """An official-format MambaVision file (the released .pth.tar layout, a small config) through the same
    CLI: FP ONNX + --check, and `gen` writes synthetic images; a wrong --arch is a one-line error."""
    import importlib.util
    import sys
    from pathlib import Path

    from ouro.calib.models.mambavision import MambaVisionConfig

    name = "make_official_ckpt"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "tools" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    cfg = MambaVisionConfig(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(8, 8, 2, 2),
                            img_size=32, num_classes=5, name="e2e-mambavision")
    ckpt = tmp_path / "mv.pth.tar"
    torch.save(sys.modules[name].mambavision_checkpoint(cfg, "full"), ckpt)
    rc, stdout, err = _run([ckpt, "-o", tmp_path / "mv.onnx", "--check"], capsys)
    assert rc == 0, err
    assert "Polygraphy PASSED" in stdout
    rc, _, err = _run([ckpt, "--arch", "mambavision_t", "-o", tmp_path / "never.onnx"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "does not match" in err, err
    cfgfile = tmp_path / "gen.toml"
    cfgfile.write_text("iterations = 2\nbatch_size = 2\n")
    rc, stdout, err = _run(["gen", ckpt, "-n", 2, "-o", tmp_path / "synth", "--config", cfgfile], capsys)
    assert rc == 0, err
    assert (tmp_path / "synth" / "gen.json").is_file()


@pytest.mark.slow
def test_mambavision_demo_w4a4_plugin_check(capsys, tmp_path):
    """Issue 15's acceptance: the plugin graph of the MambaVision demo passes --check (Python ORT ops)."""
    rc, stdout, err = _run(["--demo", "mambavision", "--w4a4", "--calib", "real:64", "-o", tmp_path / "mv_demo.onnx",
                            "--check"], capsys)
    assert rc == 0, err
    assert "mv_demo.onnx (plugin): node check PASSED" in stdout
