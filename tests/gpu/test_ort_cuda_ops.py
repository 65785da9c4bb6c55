"""libouro_ort_ops.so on onnxruntime-gpu's CUDA execution provider: ouro::OutlierLinear and ouro::SelectiveScan
run the project's CUDA kernels (ouro_kernels.h) on the EP's stream; compared with the CPU execution provider
of the same library (itself bit-exact with the Python reference ops, tests/unit/test_ort_native.py).

Needs a CUDA GPU, onnxruntime-gpu (CUDAExecutionProvider available) and the built library ($OURO_ORT_OPS_LIB or
build/trt/libouro_ort_ops.so); skipped otherwise.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_ort_native import (  # noqa: E402  (shared graph builders and cases of the CPU tests)
    LINEAR_CASES,
    NO_GATE_SCAN_CASES,
    SCAN_CASES,
    no_gate_case,
    activations,
    calibrated,
    inlier_scale,
    linear_case,
    linear_model,
    scan_model,
)

from ouro.exporter import ort_native  # noqa: E402
from ouro.exporter.ort_ops import onnxruntime_session  # noqa: E402

Y_FP32_RTOL = 1e-6
"""fp32 OutlierLinear: the kernels' separate epilogue computes the reference's fp32 expression (integer codes and
accumulators are bit-exact in the kernels' own GPU tests); margin for the rounding of the final product."""
Y_FP16_RTOL = 2e-3
"""fp16 OutlierLinear: the fused epilogue rounds the inlier term to fp16 once more (KERNELS.md)."""
SCAN_RTOL, SCAN_ATOL = 1e-4, 1e-5
"""SelectiveScan, CUDA vs CPU: two fp32 recurrences with their own exp and summation order."""
LOGITS_RTOL = 1e-2
"""Whole demo W4A4 graph, CUDA EP vs CPU EP: max |diff| / max |logits| (PLUGIN_TOL's reason: last-bit scan
differences flip single codes downstream)."""
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module", autouse=True)
def cuda_ep():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    try:
        lib = ort_native.library_path()
    except ort_native.NativeOpsUnavailable as e:
        pytest.skip(str(e))
    if lib is None:
        pytest.skip(f"{ort_native.LIB_NAME} not built; {ort_native.BUILD_HINT}")


def _providers_of(sess, feeds) -> dict:
    """op type -> set of execution providers that ran it (onnxruntime profiling)."""
    sess.run(None, feeds)
    events = json.load(open(sess.end_profiling()))
    out: dict = {}
    for e in events:
        if e.get("cat") == "Node" and "op_name" in e.get("args", {}):
            out.setdefault(e["args"]["op_name"], set()).add(e["args"].get("provider"))
    return out


def _session(model, providers, profile=False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = profile
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ouro_ort")
    return onnxruntime_session(model, providers=providers, sess_options=so, ops="native")


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"B{c[0]}K{c[2]}N{c[3]}-w{c[4]}a{c[5]}o{c[6]}{'-fp16' if c[9] else ''}")
def test_outlier_linear_cuda_ep_matches_cpu(case):
    B, L, K, N, w_bits, a_bits, o_bits, policy, nr, fp16 = case
    rng = np.random.default_rng(K * N + B)
    x, tables, attrs = linear_case(rng, B, L, K, N, w_bits, a_bits, o_bits, policy, nr)
    if fp16:
        x = x.astype(np.float16)
    model = linear_model(K, N, L, w_bits, attrs, *tables, fp16=fp16)
    gpu = _session(model, CUDA, profile=True)
    assert _providers_of(gpu, {"x": x})["OutlierLinear"] == {"CUDAExecutionProvider"}
    y = gpu.run(None, {"x": x})[0]
    ref = _session(model, ["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rtol = Y_FP16_RTOL if fp16 else Y_FP32_RTOL
    np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=rtol,
                               atol=rtol * float(np.abs(ref.astype(np.float32)).max()))


def test_outlier_linear_cuda_ep_batch_changes():
    """Workspace from the EP allocator is sized per call: batch 1, 4, 1 in one session."""
    rng = np.random.default_rng(9)
    x, tables, attrs = linear_case(rng, 4, 13, 64, 32, 4, 4, 8, 0, 5)
    model = linear_model(64, 32, 13, 4, attrs, *tables)
    gpu, cpu = _session(model, CUDA), _session(model, ["CPUExecutionProvider"])
    for b in (1, 4, 1):
        y, ref = gpu.run(None, {"x": x[:b]})[0], cpu.run(None, {"x": x[:b]})[0]
        np.testing.assert_allclose(y, ref, rtol=Y_FP32_RTOL, atol=Y_FP32_RTOL * float(np.abs(ref).max()))


@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: c[0])
def test_selective_scan_cuda_ep_matches_cpu(case):
    name, B, L, D, S, reverse, qattrs, fp16 = case
    if qattrs and qattrs.get("h_bits"):
        pytest.skip("TGQ step boundaries amplify last-bit differences; covered by the kernels' own GPU tests")
    rng = np.random.default_rng(L * D)
    feeds = dict(u=rng.standard_normal((B, L, D)), delta=rng.standard_normal((B, L, D)) - 2, Bm=activations(rng, B, L, S),
                 Cm=activations(rng, B, L, S), z=rng.standard_normal((B, L, D)))
    feeds = {k: v.astype(np.float16 if fp16 else np.float32) for k, v in feeds.items()}
    inits = dict(A=-np.exp(rng.uniform(0, 2.5, (D, S))).astype(np.float32), Dskip=rng.uniform(0.5, 1.5, D).astype(np.float32))
    attrs = dict(reverse=reverse, delta_softplus=1, **(qattrs or {}))
    if qattrs is not None:
        for op, t in (("delta", feeds["delta"]), ("b", feeds["Bm"]), ("c", feeds["Cm"])):
            inits[f"{op}_scale"] = inlier_scale(t.astype(np.float32), 8)
            inits[f"{op}_theta"] = (np.abs(t.astype(np.float32)).mean(axis=(0, 2)) * 3).astype(np.float32)
        inits["h_scale"], inits["h_zero"] = np.ones(L, np.float32), np.zeros(L, np.float32)
    model = scan_model(B, L, D, S, attrs, inits, qattrs is not None, fp16)
    gpu = _session(model, CUDA, profile=True)
    assert _providers_of(gpu, feeds)["SelectiveScan"] == {"CUDAExecutionProvider"}
    y = gpu.run(None, feeds)[0].astype(np.float32)
    ref = _session(model, ["CPUExecutionProvider"]).run(None, feeds)[0].astype(np.float32)
    tol = (2e-3, 2e-3) if fp16 else (SCAN_RTOL, SCAN_ATOL)
    np.testing.assert_allclose(y, ref, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("case", NO_GATE_SCAN_CASES, ids=lambda c: c[0])
def test_selective_scan_without_gate_cuda_ep_matches_cpu(case):
    """Empty or omitted z (no gate) on the CUDA EP: the kernel's NULL z, equal to the CPU EP."""
    name, B, L, D, S, reverse, quantized, fp16, gate = case
    feeds, inits, tables, attrs = no_gate_case(np.random.default_rng(L * D + 1), B, L, D, S, reverse, quantized, fp16)
    model = scan_model(B, L, D, S, attrs, {**inits, **tables}, quantized, fp16, gate=gate)
    gpu = _session(model, CUDA, profile=True)
    assert _providers_of(gpu, feeds)["SelectiveScan"] == {"CUDAExecutionProvider"}
    y = gpu.run(None, feeds)[0].astype(np.float32)
    ref = _session(model, ["CPUExecutionProvider"]).run(None, feeds)[0].astype(np.float32)
    tol = (2e-3, 2e-3) if fp16 else (SCAN_RTOL, SCAN_ATOL)
    np.testing.assert_allclose(y, ref, rtol=tol[0], atol=tol[1])


KERNELS_TAKE_STD_CORRECTION = "std_correction" in (
    Path(__file__).resolve().parents[2] / "trt_plugins" / "common" / "ouro_kernels.h").read_text()
"""Whether the kernels this checkout builds carry the threshold's std correction (issue 16 adds it to
ouroActQuant_t); without it the CUDA EP refuses std_correction = 1 with a message instead of computing c = 0."""


def _refused_or_equal(run_gpu, run_cpu, close) -> None:
    if KERNELS_TAKE_STD_CORRECTION:
        close(run_gpu(), run_cpu())
    else:
        with pytest.raises(Exception, match="attribute 'std_correction' = 1 is not supported by the CUDA kernels"):
            run_gpu()


def test_std_correction_on_the_cuda_ep():
    """std_correction = 1 (Bessel) on both custom nodes: equal to the CPU EP (itself bit-exact with the reference
    ops) when the kernels take it, else a clear refusal."""
    rng = np.random.default_rng(11)
    x, tables, attrs = linear_case(rng, 3, 13, 384, 44, 4, 4, 8, 0, 10)
    model = linear_model(384, 44, 13, 4, {**attrs, "std_correction": 1}, *tables)
    _refused_or_equal(lambda: _session(model, CUDA).run(None, {"x": x})[0],
                      lambda: _session(model, ["CPUExecutionProvider"]).run(None, {"x": x})[0],
                      lambda y, ref: np.testing.assert_allclose(y, ref, rtol=Y_FP32_RTOL,
                                                                atol=Y_FP32_RTOL * float(np.abs(ref).max())))


def test_demo_plugin_graph_on_the_cuda_ep():
    """The exported demo W4A4 plugin graph (fp16 activations, std_correction = 1 as the exporter writes it)."""
    from ouro.exporter.onnx_export import example_input
    from ouro.exporter.quantized import export_quantized

    model, q = calibrated("demo", "w4a4")
    plugin = export_quantized(q, "plugin").model
    x = {"images": example_input(model, 3).numpy()}

    def gpu_run():
        gpu = _session(plugin, CUDA, profile=True)
        ran = _providers_of(gpu, x)
        assert ran["OutlierLinear"] == ran["SelectiveScan"] == {"CUDAExecutionProvider"}
        return gpu.run(None, x)[0]

    def close(y, ref):
        assert np.abs(y - ref).max() <= LOGITS_RTOL * np.abs(ref).max()
        assert (y.argmax(1) == ref.argmax(1)).all()

    _refused_or_equal(gpu_run, lambda: _session(plugin, ["CPUExecutionProvider"]).run(None, x)[0], close)
