"""libouro_ort_ops.so (trt_plugins/ort/): the native onnxruntime custom ops against the Python reference ops.

The library is built with CMake in the build tree the README and CI use ($OURO_TRT_BUILD_DIR or build/trt),
with the onnxruntime C API headers from $ONNXRUNTIME_ROOT (CI: ../shared/sdk/onnxruntime). Native tests skip,
with the reason, when nvcc, cmake or the headers are missing, and fail instead when OURO_REQUIRE_NATIVE=1.

What is compared:
  * quantizer codes, outlier masks and scales (through libouro_ort_testing.so, the same CPU objects behind a
    ctypes ABI) == outlier_quant_ref, bit for bit; the dynamic threshold == torch's mean + k * std;
  * one-node onnxruntime sessions: OutlierLinear y == outlier_linear_node_ref bit for bit (both GEMM paths, fp32
    and fp16 activations, the largest K); SelectiveScan within SCAN_RTOL / SCAN_ATOL of selective_scan_node_ref;
  * whole graphs (demo and Vim-T, batch 1 and 3): native vs Python-op sessions, logits within LOGITS_RTOL and the
    OutlierLinear outputs upstream of the first scan identical;
  * the C++ session test (CTest ort.*) and the C++ runner on the demo's W4A4 plugin graph.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ouro.calib.quantizers import outlier_quant_ref, pack_int4
from ouro.exporter import native as native_libs
from ouro.exporter import ort_native
from ouro.exporter.ort_ops import onnxruntime_session, outlier_linear_node_ref, selective_scan_node_ref

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 3600
TARGETS = ("ouro_ort_ops", "ouro_ort_testing", "ouro_ort_tests", "ouro_ort_run")

SCAN_RTOL, SCAN_ATOL = 1e-4, 1e-5
"""Native SelectiveScan vs selective_scan_node_ref (fp32): our exp/log1p polynomials (1-2 ulp) and a different
summation order over the state. Measured on SCAN_CASES: at most 5 % of this bound (relative error <= 1e-5)."""
SCAN_FP16_TOL = 2e-3
"""fp16 SelectiveScan output vs the reference rounded to fp16: one fp16 ulp (2^-11 relative) either side."""
LOGITS_RTOL = 1e-3
"""Whole graph, native vs Python reference ops, max |diff| / max |logits|. The OutlierLinear codes are identical
for identical inputs; the scans differ in the last fp32 bits, and a value that lands within an ulp of a
rounding boundary of the next quantizer flips one code by one step downstream (PLUGIN_TOL's reason). Measured
at batch 1 and 3 (demo W4A4, demo W8A8, Vim-T 4 blocks W4A4): at most 5.3e-7, bit-identical in 4 of the 6."""
FP_LOGITS_RTOL = 1e-5
"""FP graph, native vs Python-op scan: fp32 rounding only (measured at most 6.9e-7)."""
LARGEST_K = 1536
"""Vim-B's d_inner, the widest reduction of the supported models (out_proj and x_proj)."""


# ------------------------------------------------------------------------------------------ build
def _onnxruntime_root() -> Path | None:
    for cand in (os.environ.get("ONNXRUNTIME_ROOT"), os.environ.get("ORT_ROOT")):
        if cand and (Path(cand) / "include" / "onnxruntime_c_api.h").is_file():
            return Path(cand)
    return None


def _cached_onnxruntime_headers(bdir: Path) -> bool:
    """A build tree configured before remembers where it found the onnxruntime headers (CMake cache)."""
    cache = bdir / "CMakeCache.txt"
    if not cache.is_file():
        return False
    m = re.search(r"^ONNXRUNTIME_INCLUDE_DIR:PATH=(.+)$", cache.read_text(errors="replace"), re.M)
    return bool(m) and (Path(m.group(1).strip()) / "onnxruntime_c_api.h").is_file()


def _tensorrt_root() -> Path | None:
    for cand in (os.environ.get("TensorRT_ROOT"), os.environ.get("TRT_ROOT")):
        if cand and (Path(cand) / "include" / "NvInferRuntime.h").is_file():
            return Path(cand)
    return None


def _run(cmd: list, timeout: int = BUILD_TIMEOUT_S, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.fixture(scope="module")
def build_dir() -> Path:
    missing = next((f"{t} not on PATH" for t in ("nvcc", "cmake", "nm", "readelf") if shutil.which(t) is None), None)
    bdir = Path(os.environ.get("OURO_TRT_BUILD_DIR", REPO / "build" / "trt"))
    ort_root = _onnxruntime_root()
    if missing is None and ort_root is None and not _cached_onnxruntime_headers(bdir):
        missing = "onnxruntime C API headers not found (set ONNXRUNTIME_ROOT to an onnxruntime release or its headers)"
    if missing:
        if os.environ.get("OURO_REQUIRE_NATIVE") == "1":
            pytest.fail(f"OURO_REQUIRE_NATIVE=1 but libouro_ort_ops.so cannot be built: {missing}")
        pytest.skip(missing)
    trt = _tensorrt_root()
    cmd = ["cmake", "-S", REPO / "trt_plugins", "-B", bdir, "-DOURO_BUILD_ORT_OPS=ON", "-DOURO_BUILD_TESTS=ON",
           f"-DTensorRT_ROOT={trt}" if trt else "-DOURO_BUILD_PLUGINS=OFF"]
    if ort_root is not None:
        cmd.append(f"-DONNXRUNTIME_ROOT={ort_root}")
    if not (bdir / "CMakeCache.txt").is_file():
        cmd += [f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('OURO_CUDA_ARCHS', '80')}", "-DCMAKE_BUILD_TYPE=Release"]
    _run(cmd)
    _run(["cmake", "--build", bdir, "-j", os.cpu_count() or 2, "--target", *TARGETS])
    return bdir


@pytest.fixture(scope="module")
def native(build_dir):
    """Sessions of this module take the freshly built library ($OURO_ORT_OPS_LIB)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ort_native.LIB_ENV, str(build_dir / ort_native.LIB_NAME))
        yield build_dir


@pytest.fixture(scope="module")
def testing_lib(build_dir):
    lib = ctypes.CDLL(str(build_dir / "libouro_ort_testing.so"))
    P = ctypes.c_void_p
    lib.ouro_test_outlier_quant.argtypes = [P, *[ctypes.c_int] * 7, ctypes.c_float, ctypes.c_int, *[P] * 7]
    lib.ouro_test_torch_order_sum.argtypes = [P, ctypes.c_longlong]
    lib.ouro_test_torch_order_sum.restype = ctypes.c_float
    lib.ouro_test_dynamic_threshold.argtypes = [P, ctypes.c_int, ctypes.c_float, ctypes.c_int]
    lib.ouro_test_dynamic_threshold.restype = ctypes.c_float
    lib.ouro_test_exact_k_chunk.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.ouro_test_gemm.argtypes = [P, P, P, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.ouro_test_fp16_roundtrip.argtypes = [P, P, ctypes.c_longlong]
    return lib


def _ptr(a: np.ndarray):
    assert a.flags["C_CONTIGUOUS"]
    return a.ctypes.data_as(ctypes.c_void_p)


# ------------------------------------------------------------------------------------------ data
def activations(rng, B, L, C, outlier_frac=0.04, outlier_gain=12.0):
    """Heavy-tailed activations with a few persistent outlier channels (what OuroMamba targets)."""
    x = rng.standard_t(4, size=(B, L, C)).astype(np.float32)
    x[..., rng.random(C) < outlier_frac] *= outlier_gain
    return x


def inlier_scale(x, bits, clip=0.5):
    """Per-token scales clipping the largest |x| at `clip` of its range, so the dynamic trigger fires."""
    return (np.abs(x).max(axis=(0, 2)) * clip / (2 ** (bits - 1) - 1)).astype(np.float32)


# ------------------------------------------------------------------------------------------ library contract
@pytest.mark.native
def test_library_exports_register_custom_ops_only(build_dir):
    lib = build_dir / ort_native.LIB_NAME
    syms = _run(["nm", "-D", "--defined-only", lib], timeout=60).stdout.split("\n")
    exported = {line.split()[-1] for line in syms if re.search(r" [TDBW] ", line)}
    assert exported == {"RegisterCustomOps"}, exported
    dyn = _run(["readelf", "-d", lib], timeout=60).stdout
    needed = [line.split("[")[-1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]
    assert needed and not [n for n in needed if n.startswith(("libonnxruntime", "libcudart", "libnvinfer"))], needed


@pytest.mark.native
def test_cpp_session_tests(build_dir):
    """CTest ort.*: the library registered into an onnxruntime session from C++ (libonnxruntime of the wheel),
    outputs against a scalar reference, error messages."""
    r = _run(["ctest", "--test-dir", build_dir, "--output-on-failure", "-R", r"^ort\."], timeout=600)
    assert "100% tests passed" in r.stdout and "ort.outlier_linear" in r.stdout, r.stdout


# ------------------------------------------------------------------------------------------ quantizer codes
QUANT_CASES = [  # (B, L, C, bits, bits_outlier, n_refresh, policy, k_sigma)
    (3, 13, 384, 4, 8, 10, 0, 3.0),   # Vim-T width, the W4A4 preset's window
    (3, 13, 16, 8, 16, 1, 0, 3.0),    # B/C of the scan (d_state 16), fp16 outliers
    (2, 11, 12, 4, 4, 11, 0, 2.0),    # dt_rank width (12 channels: a z-score above sqrt(11) is impossible), one window per image
    (3, 9, 44, 4, 8, 3, 1, 0.0),      # calibrated thresholds
    (1, 197, 1536, 8, 8, 5, 0, 3.0),  # Vim-B width, Vim tokens
]


@pytest.mark.native
@pytest.mark.parametrize("case", QUANT_CASES, ids=lambda c: f"C{c[2]}-a{c[3]}o{c[4]}-n{c[5]}-p{c[6]}")
@pytest.mark.parametrize("std_correction", [0, 1])
def test_quantizer_codes_bit_exact(testing_lib, case, std_correction):
    B, L, C, bits, bo, nr, policy, k = case
    rng = np.random.default_rng(C + nr)
    x = activations(rng, B, L, C)
    scale = inlier_scale(x, bits)
    theta = (np.abs(x).mean(axis=(0, 2)) * 3).astype(np.float32)
    codes, ocodes, xhat = (np.zeros((B, L, C), np.float32) for _ in range(3))
    mask = np.zeros((B, L, C), np.uint8)
    oscale = np.zeros((B, L), np.float32)
    rc = testing_lib.ouro_test_outlier_quant(_ptr(x), B, L, C, bits, bo, nr, policy, k, std_correction, _ptr(scale),
                                             _ptr(theta), _ptr(codes), _ptr(mask), _ptr(ocodes), _ptr(oscale), _ptr(xhat))
    assert rc == 0
    ref = outlier_quant_ref(torch.from_numpy(x), torch.from_numpy(scale), bits, bo, nr, ("dynamic", "calibrated")[policy],
                            k_sigma=k, theta=torch.from_numpy(theta) if policy else None, std_correction=std_correction)
    assert ref.outlier_mask.any() and not ref.outlier_mask.all(), "the case must exercise both inliers and outliers"
    np.testing.assert_array_equal(mask.astype(bool), ref.outlier_mask.numpy())
    np.testing.assert_array_equal(codes, ref.inlier_codes.numpy())
    np.testing.assert_array_equal(ocodes, ref.outlier_codes.numpy())
    np.testing.assert_array_equal(oscale, ref.outlier_scale.numpy())
    np.testing.assert_array_equal(xhat, ref.x_hat.numpy())


@pytest.mark.native
@pytest.mark.parametrize("C", [3, 7, 12, 16, 44, 192, 384, 1536, 70001])
def test_mean_is_summed_in_torch_order(testing_lib, C):
    """The dynamic threshold's mean is PyTorch's own fp32 sum (its AVX2 cascade), bit for bit; a correctly
    rounded sum would differ from it in about a third of the rows."""
    rng = np.random.default_rng(C)
    rows = (np.abs(rng.standard_normal((32, C))) * rng.uniform(0.1, 50, (32, 1))).astype(np.float32)
    ours = np.array([testing_lib.ouro_test_torch_order_sum(_ptr(np.ascontiguousarray(r)), C) for r in rows], np.float32)
    np.testing.assert_array_equal(ours, torch.from_numpy(rows).sum(-1).numpy())


@pytest.mark.native
@pytest.mark.parametrize("correction", [0, 1])
def test_dynamic_threshold_matches_torch(testing_lib, correction):
    rng = np.random.default_rng(5)
    for C in (16, 44, 384, 1536):
        a = np.abs(rng.standard_t(3, (64, C))).astype(np.float32)
        t = torch.from_numpy(a)
        want = (t.mean(-1) + 3.0 * t.std(-1, correction=correction)).numpy()
        got = np.array([testing_lib.ouro_test_dynamic_threshold(_ptr(np.ascontiguousarray(r)), C, 3.0, correction) for r in a])
        np.testing.assert_array_equal(got.astype(np.float32), want)


@pytest.mark.native
def test_fp16_conversion_is_exact(testing_lib):
    """fp32 -> fp16 -> fp32 as torch's .half().float(): normals, subnormals, ties, overflow to inf, NaN (the F16C path
    in blocks of 8, the portable one on the tail)."""
    rng = np.random.default_rng(0)
    special = [65504, 65519.99, 65520, 1e-8, -6e-8, 2.0 ** -24 * 1.5, 0.0, -0.0, np.inf, -np.inf, np.nan, -65520]
    x = np.concatenate([rng.standard_normal(4096) * 10 ** rng.uniform(-9, 5, 4096), special, special[:5]]).astype(np.float32)
    out = np.zeros_like(x)
    testing_lib.ouro_test_fp16_roundtrip(_ptr(x), _ptr(out), x.size)
    np.testing.assert_array_equal(out, torch.from_numpy(x).half().float().numpy())


# ------------------------------------------------------------------------------------------ one-node sessions
def linear_model(K, N, L, w_bits, attrs, weight, w_scale, s_in, theta, bias, fp16=False) -> onnx.ModelProto:
    act = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    node = helper.make_node("OutlierLinear", ["x", "w", "ws", "si", "th", "b"], ["y"], domain="ouro", name="lin",
                            plugin_version="1", plugin_namespace="ouro", **attrs)
    inits = [numpy_helper.from_array(a, n) for a, n in ((weight, "w"), (w_scale, "ws"), (s_in, "si"), (theta, "th"), (bias, "b"))]
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", act, ["B", L, K])],
                          [helper.make_tensor_value_info("y", act, ["B", L, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ouro", 1)])


def linear_case(rng, B, L, K, N, w_bits, a_bits, o_bits, policy, n_refresh, k_sigma=3.0, max_outliers=0, w_codes=None):
    x = activations(rng, B, L, K)
    wmax = 7 if w_bits == 4 else 127
    codes = w_codes if w_codes is not None else rng.integers(-wmax - 1, wmax + 1, (N, K)).astype(np.int8)
    weight = pack_int4(torch.from_numpy(codes)).numpy().view(np.int8) if w_bits == 4 else codes
    w_scale = rng.uniform(0.002, 0.05, N).astype(np.float32)
    s_in = inlier_scale(x, a_bits)
    theta = (np.abs(x).mean(axis=(0, 2)) * 4).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    attrs = dict(in_features=K, out_features=N, seq_len=L, w_bits=w_bits, a_bits=a_bits, o_bits=o_bits, n_refresh=n_refresh,
                 threshold_policy=policy, k_sigma=float(k_sigma), max_outliers=max_outliers)
    return x, (weight, w_scale, s_in, theta, bias), attrs


def _native_session(model, gemm="onnxruntime"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("ouro.cpu_gemm", gemm)
    return onnxruntime_session(model, sess_options=so, ops="native")


LINEAR_CASES = [  # (B, L, K, N, w_bits, a_bits, o_bits, policy, n_refresh, fp16)
    (1, 197, 192, 96, 4, 4, 8, 0, 10, False),   # W4A4 preset, Vim-T in_proj width
    (3, 13, 384, 44, 4, 4, 8, 0, 10, False),    # x_proj shape, batch 3
    (3, 13, 12, 40, 8, 8, 16, 0, 1, False),     # dt_proj (K = dt_rank), fp16 outliers
    (2, 17, 64, 24, 8, 4, 4, 1, 5, False),      # calibrated thresholds
    (3, 13, 384, 44, 4, 4, 8, 0, 10, True),     # fp16 activations in and out
    (2, 197, 192, 96, 4, 4, 8, 0, 10, True),    # fp16, large enough (M*K) to widen over the thread pool
]


@pytest.mark.native
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"B{c[0]}K{c[2]}N{c[3]}-w{c[4]}a{c[5]}o{c[6]}-p{c[7]}n{c[8]}{'-fp16' if c[9] else ''}")
@pytest.mark.parametrize("gemm", ["onnxruntime", "builtin"])
def test_outlier_linear_bit_exact(native, case, gemm):
    B, L, K, N, w_bits, a_bits, o_bits, policy, nr, fp16 = case
    rng = np.random.default_rng(K * N + B)
    x, tables, attrs = linear_case(rng, B, L, K, N, w_bits, a_bits, o_bits, policy, nr)
    if fp16:
        x = x.astype(np.float16)
    y = _native_session(linear_model(K, N, L, w_bits, attrs, *tables, fp16=fp16), gemm).run(None, {"x": x})[0]
    ref, _, acc_out, mask = outlier_linear_node_ref(x.astype(np.float32), *tables, **attrs)
    assert mask.any() and acc_out.abs().sum() > 0, "the case must have outliers"
    want = ref.half().numpy() if fp16 else ref.numpy()  # the reference ops compute in fp32 and round once (CastLike)
    assert y.dtype == want.dtype
    np.testing.assert_array_equal(y, want)


@pytest.mark.native
@pytest.mark.parametrize("gemm", ["onnxruntime", "builtin"])
def test_exact_gemm_at_the_largest_k(native, testing_lib, gemm):
    """kExactF32: at K = 1536, 8-bit codes near their extremes (odd products, partial sums past 2^24) need
    the chunked path (Kc = 1040 for |w| <= 127) and still give y bit-identical to the int64 reference;
    4-bit codes at their extremes fit one call."""
    assert testing_lib.ouro_test_exact_k_chunk(8, 127) == 1040 < LARGEST_K
    assert testing_lib.ouro_test_exact_k_chunk(4, 8) == 299593
    rng = np.random.default_rng(1)
    B, L, N = 1, 8, 16
    for w_bits, a_bits, hi in ((8, 8, 127), (4, 4, 7)):
        w = rng.integers(hi - 2, hi + 1, (N, LARGEST_K)).astype(np.int8) | 1  # odd codes: no free zeros in the sums
        _, tables, attrs = linear_case(rng, B, L, LARGEST_K, N, w_bits, a_bits, 8, 0, L, w_codes=w)
        x = rng.uniform(hi - 0.4, hi + 0.4, (B, L, LARGEST_K)).astype(np.float32)  # S_I = 1: every code is hi,
        s_in = np.ones(L, np.float32)  # and the threshold (mean + 3 std, std ~ 0.23) leaves no outlier
        tables = (tables[0], tables[1], s_in, tables[3], tables[4])
        y = _native_session(linear_model(LARGEST_K, N, L, w_bits, attrs, *tables), gemm).run(None, {"x": x})[0]
        ref, acc_in, _, _ = outlier_linear_node_ref(x, *tables, **attrs)
        if w_bits == 8:
            assert int(acc_in.abs().max()) > 2**24  # beyond exact fp32 integers: a single fp32 GEMM would round
        np.testing.assert_array_equal(y, ref.numpy())
    # the library's own GEMM alone, on 4-bit extremes at K = 1536
    A = rng.choice(np.array([-7, 7], np.float32), (5, LARGEST_K))
    Bm = rng.choice(np.array([-8, 7], np.float32), (LARGEST_K, 9))
    C = np.zeros((5, 9), np.float32)
    testing_lib.ouro_test_gemm(_ptr(A), _ptr(Bm), _ptr(C), 5, LARGEST_K, 9)
    np.testing.assert_array_equal(C, (A.astype(np.int64) @ Bm.astype(np.int64)).astype(np.float32))


@pytest.mark.native
def test_outlier_capacity_yields_nan_rows(native):
    """max_outliers exceeded in an (image, window): that window's rows are NaN, as in the CUDA kernel; every
    other row is the reference's, bit for bit."""
    rng = np.random.default_rng(3)
    B, L, K, N, nr = 2, 12, 64, 8, 4
    x, tables, attrs = linear_case(rng, B, L, K, N, 8, 4, 8, 0, nr, max_outliers=2)
    y = _native_session(linear_model(K, N, L, 8, attrs, *tables)).run(None, {"x": x})[0]
    ref, _, _, mask = outlier_linear_node_ref(x, *tables, **{**attrs, "max_outliers": 0})
    per_window = mask.reshape(B, L // nr, nr, K).any(2).sum(-1)  # outlier channels of each window
    over = np.repeat((per_window > 2).numpy(), nr, axis=1)  # (B, L)
    assert over.any() and not over.all()
    assert np.isnan(y[over]).all()
    np.testing.assert_array_equal(y[~over], ref.numpy()[~over])


def scan_model(B, L, D, S, attrs, inits: dict, quantized: bool, fp16=False, gate="z") -> onnx.ModelProto:
    """One SelectiveScan node. gate: "z" a (B, L, D) feed; "empty" an empty [0] FLOAT initializer z (what the
    exporter writes for a scan without a gate, whatever the activations' dtype); "absent" no z (6 inputs, or an
    empty input name in a 15-input node). The last two mean "no gate"."""
    act = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    names = ["u", "delta", "A", "Bm", "Cm", "Dskip", "z"]
    tables = ["delta_scale", "delta_theta", "b_scale", "b_theta", "c_scale", "c_theta", "h_scale", "h_zero"]
    if gate == "empty":
        inits = {**inits, "z": np.zeros(0, np.float32)}
    elif gate == "absent":
        names = names[:6] + ([""] if quantized else [])
    node = helper.make_node("SelectiveScan", names + (tables if quantized else []), ["y"], domain="ouro", name="scan", **attrs)
    feeds = [helper.make_tensor_value_info(n, act, ["B", L, D if n in ("u", "delta", "z") else S])
             for n in ("u", "delta", "Bm", "Cm") + (("z",) if gate == "z" else ())]
    g = helper.make_graph([node], "g", feeds, [helper.make_tensor_value_info("y", act, ["B", L, D])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ouro", 1)])


SCAN_CASES = [  # (name, B, L, D, S, reverse, quantized attrs or None, fp16)
    ("fp", 3, 17, 40, 16, 0, None, False),
    ("fp-reverse", 1, 197, 36, 16, 1, None, False),
    ("w4a4", 3, 13, 48, 16, 1, dict(delta_bits=4, delta_bits_outlier=8, b_bits=4, b_bits_outlier=8, c_bits=4,
                                    c_bits_outlier=8, n_refresh=5, threshold_policy=0, delta_k_sigma=4.0, bc_k_sigma=3.0), False),
    ("fp16-outliers+tgq", 2, 11, 24, 8, 0, dict(delta_bits=8, b_bits=8, c_bits=8, n_refresh=3, threshold_policy=0,
                                                 delta_k_sigma=4.0, bc_k_sigma=3.0, h_bits=8, h_group=4), False),
    ("calibrated", 2, 9, 16, 16, 0, dict(delta_bits=4, delta_bits_outlier=8, b_bits=4, b_bits_outlier=8, n_refresh=9,
                                         threshold_policy=1), False),
    ("fp16-io", 3, 13, 24, 16, 0, dict(delta_bits=4, delta_bits_outlier=8, b_bits=4, b_bits_outlier=8, c_bits=4,
                                       c_bits_outlier=8, n_refresh=5, threshold_policy=0), True),
]


@pytest.mark.native
@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: c[0])
def test_selective_scan_matches_reference(native, case):
    name, B, L, D, S, reverse, qattrs, fp16 = case
    rng = np.random.default_rng(L * D)
    feeds = dict(u=rng.standard_normal((B, L, D)), delta=rng.standard_normal((B, L, D)) - 2, Bm=activations(rng, B, L, S),
                 Cm=activations(rng, B, L, S), z=rng.standard_normal((B, L, D)))
    feeds = {k: v.astype(np.float16 if fp16 else np.float32) for k, v in feeds.items()}
    inits = dict(A=-np.exp(rng.uniform(0, 2.5, (D, S))).astype(np.float32), Dskip=rng.uniform(0.5, 1.5, D).astype(np.float32))
    attrs = dict(reverse=reverse, delta_softplus=1, **(qattrs or {}))
    tables = {}
    if qattrs is not None:
        f32 = {k: v.astype(np.float32) for k, v in feeds.items()}
        G = -(-L // attrs.get("h_group", 1))
        for op, t, bits in (("delta", f32["delta"], attrs.get("delta_bits", 0)), ("b", f32["Bm"], attrs.get("b_bits", 0)),
                            ("c", f32["Cm"], attrs.get("c_bits", 0))):
            tables[f"{op}_scale"] = inlier_scale(t, bits or 8)
            tables[f"{op}_theta"] = (np.abs(t).mean(axis=(0, 2)) * 3).astype(np.float32)
        tables["h_scale"] = np.full(G, 0.02, np.float32)
        tables["h_zero"] = np.full(G, 128.0, np.float32)
        inits.update(tables)
    y = onnxruntime_session(scan_model(B, L, D, S, attrs, inits, qattrs is not None, fp16), ops="native").run(None, feeds)[0]
    ref = selective_scan_node_ref(*(feeds[k].astype(np.float32) for k in ("u", "delta")), inits["A"],
                                  feeds["Bm"].astype(np.float32), feeds["Cm"].astype(np.float32), inits["Dskip"],
                                  feeds["z"].astype(np.float32), *(tables[k] for k in tables), **attrs) if tables else \
        selective_scan_node_ref(feeds["u"], feeds["delta"], inits["A"], feeds["Bm"], feeds["Cm"], inits["Dskip"], feeds["z"], **attrs)
    if fp16:
        assert y.dtype == np.float16
        np.testing.assert_allclose(y.astype(np.float32), ref.half().float().numpy(), rtol=SCAN_FP16_TOL, atol=SCAN_FP16_TOL)
    else:
        np.testing.assert_allclose(y, ref.numpy(), rtol=SCAN_RTOL, atol=SCAN_ATOL)


NO_GATE_SCAN_CASES = [  # (name, B, L, D, S, reverse, quantized, fp16, gate)
    ("fp-empty-z", 3, 17, 40, 16, 0, False, False, "empty"),
    ("fp-6-inputs", 2, 33, 24, 1, 1, False, False, "absent"),  # VMamba's d_state 1
    ("w4a4-empty-z", 3, 13, 48, 16, 1, True, False, "empty"),
    ("w4a4-fp16-empty-fp32-z", 2, 13, 24, 16, 0, True, True, "empty"),  # the plugin graph's form
    ("w4a4-unnamed-z", 2, 9, 16, 16, 0, True, False, "absent"),
]


def no_gate_case(rng, B, L, D, S, reverse, quantized, fp16):
    feeds = dict(u=rng.standard_normal((B, L, D)), delta=rng.standard_normal((B, L, D)) - 2, Bm=activations(rng, B, L, S),
                 Cm=activations(rng, B, L, S))
    feeds = {k: v.astype(np.float16 if fp16 else np.float32) for k, v in feeds.items()}
    inits = dict(A=-np.exp(rng.uniform(0, 2.5, (D, S))).astype(np.float32), Dskip=rng.uniform(0.5, 1.5, D).astype(np.float32))
    attrs = dict(reverse=reverse, delta_softplus=1)
    tables = {}
    if quantized:
        attrs.update(delta_bits=4, delta_bits_outlier=8, b_bits=4, b_bits_outlier=8, c_bits=4, c_bits_outlier=8,
                     n_refresh=5, threshold_policy=0, delta_k_sigma=4.0, bc_k_sigma=3.0)
        for op, k in (("delta", "delta"), ("b", "Bm"), ("c", "Cm")):
            t = feeds[k].astype(np.float32)
            tables[f"{op}_scale"] = inlier_scale(t, 4)
            tables[f"{op}_theta"] = (np.abs(t).mean(axis=(0, 2)) * 3).astype(np.float32)
        tables["h_scale"] = tables["h_zero"] = np.zeros(0, np.float32)
    return feeds, inits, tables, attrs


@pytest.mark.native
@pytest.mark.parametrize("case", NO_GATE_SCAN_CASES, ids=lambda c: c[0])
def test_selective_scan_without_gate(native, case):
    """An empty or omitted z means "no gate" (VMamba's and MambaVision's scans): the native op equals the Python
    op with z=None (y = scan + D skip), within the gated cases' tolerances; the gate would change y."""
    name, B, L, D, S, reverse, quantized, fp16, gate = case
    rng = np.random.default_rng(L * D + 1)
    feeds, inits, tables, attrs = no_gate_case(rng, B, L, D, S, reverse, quantized, fp16)
    model = scan_model(B, L, D, S, attrs, {**inits, **tables}, quantized, fp16, gate=gate)
    y = onnxruntime_session(model, ops="native").run(None, feeds)[0]
    f32 = {k: v.astype(np.float32) for k, v in feeds.items()}
    args = (f32["u"], f32["delta"], inits["A"], f32["Bm"], f32["Cm"], inits["Dskip"])
    ref = selective_scan_node_ref(*args, None, *tables.values(), **attrs)
    py = onnxruntime_session(model, ops="python").run(None, feeds)[0]  # the Python op reads the same node
    if fp16:
        assert y.dtype == np.float16
        np.testing.assert_allclose(y.astype(np.float32), ref.half().float().numpy(), rtol=SCAN_FP16_TOL, atol=SCAN_FP16_TOL)
        np.testing.assert_allclose(y.astype(np.float32), py.astype(np.float32), rtol=SCAN_FP16_TOL, atol=SCAN_FP16_TOL)
    else:
        np.testing.assert_allclose(y, ref.numpy(), rtol=SCAN_RTOL, atol=SCAN_ATOL)
        np.testing.assert_allclose(y, py, rtol=SCAN_RTOL, atol=SCAN_ATOL)
    z = rng.standard_normal((B, L, D)).astype(np.float32)
    gated = selective_scan_node_ref(*args, z, *tables.values(), **attrs)
    assert np.abs(gated.numpy() - ref.numpy()).max() > 100 * SCAN_FP16_TOL  # a gate would show


@pytest.mark.native
def test_selective_scan_bad_z_fails_clearly(native):
    """A z that is neither (B, L, D) in u's dtype nor empty is refused, naming the input."""
    B, L, D, S = 2, 5, 8, 4
    rng = np.random.default_rng(3)
    feeds, inits, _, attrs = no_gate_case(rng, B, L, D, S, 0, False, False)
    model = scan_model(B, L, D, S, attrs, inits, False, gate="empty")  # z: the last initializer
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.ones((B, L), np.float32), "z"))
    with pytest.raises(Exception, match=r"SelectiveScan 'scan': input 6 \(z\) has shape \(2, 5\), expected the shape of u"):
        onnxruntime_session(model, ops="native").run(None, feeds)
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.zeros(0, np.int32), "z"))
    with pytest.raises(Exception, match=r"input 6 \(z\) is empty \(no gate\) with type INT32, expected FLOAT or FLOAT16"):
        onnxruntime_session(model, ops="native").run(None, feeds)


@pytest.mark.native
@pytest.mark.parametrize("gemm", ["onnxruntime", "builtin"])
def test_std_correction_attribute(native, gemm):
    """`std_correction` on both custom nodes: absent = 0, 0 or 1 (Bessel), each equal to the reference ops with
    the same attribute (OutlierLinear bit for bit); 0 and 1 give different outlier masks here, so the attribute
    is really read. A value other than 0 or 1 is refused with the node's name."""
    rng = np.random.default_rng(21)
    B, L, K, N, nr = 3, 13, 16, 24, 13  # few channels: the correction moves the threshold by about 1/(2K) of the std
    _, tables, attrs = linear_case(rng, B, L, K, N, 8, 4, 8, 0, nr, k_sigma=2.0)
    x = rng.standard_normal((B, L, K)).astype(np.float32)  # no far outlier channel: many |x| near the threshold
    tables = (tables[0], tables[1], inlier_scale(x, 4), *tables[3:])
    masks = {}
    for sc in (None, 0, 1):
        a = attrs if sc is None else {**attrs, "std_correction": sc}
        y = _native_session(linear_model(K, N, L, 8, a, *tables), gemm).run(None, {"x": x})[0]
        ref, _, _, mask = outlier_linear_node_ref(x, *tables, **a)
        np.testing.assert_array_equal(y, ref.numpy())
        masks[sc] = mask
    assert torch.equal(masks[None], masks[0]) and not torch.equal(masks[0], masks[1])
    with pytest.raises(Exception, match=r"OutlierLinear 'lin': attribute 'std_correction' = 2, expected 0 or 1"):
        _native_session(linear_model(K, N, L, 8, {**attrs, "std_correction": 2}, *tables), gemm)

    D, S = 24, 8
    feeds = dict(u=rng.standard_normal((B, L, D)), delta=rng.standard_normal((B, L, D)) - 2, Bm=activations(rng, B, L, S),
                 Cm=activations(rng, B, L, S), z=rng.standard_normal((B, L, D)))
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    inits = dict(A=-np.exp(rng.uniform(0, 2.5, (D, S))).astype(np.float32), Dskip=rng.uniform(0.5, 1.5, D).astype(np.float32))
    tables = {}
    for op, t in (("delta", feeds["delta"]), ("b", feeds["Bm"]), ("c", feeds["Cm"])):
        tables[f"{op}_scale"] = inlier_scale(t, 4)
        tables[f"{op}_theta"] = np.zeros(L, np.float32)
    tables.update(h_scale=np.ones(1, np.float32), h_zero=np.zeros(1, np.float32))
    qattrs = dict(delta_bits=4, delta_bits_outlier=8, b_bits=4, b_bits_outlier=8, c_bits=4, c_bits_outlier=8, n_refresh=5,
                  threshold_policy=0, delta_k_sigma=1.5, bc_k_sigma=1.5, reverse=0, delta_softplus=1)
    ys = {}
    for sc in (0, 1):
        a = {**qattrs, "std_correction": sc}
        y = onnxruntime_session(scan_model(B, L, D, S, a, {**inits, **tables}, True), ops="native").run(None, feeds)[0]
        ref = selective_scan_node_ref(*(feeds[k] for k in ("u", "delta")), inits["A"], feeds["Bm"], feeds["Cm"],
                                      inits["Dskip"], feeds["z"], *tables.values(), **a)
        np.testing.assert_allclose(y, ref.numpy(), rtol=SCAN_RTOL, atol=SCAN_ATOL)
        ys[sc] = y
    assert not np.array_equal(ys[0], ys[1])


@pytest.mark.native
def test_bad_attributes_and_shapes_fail_clearly(native):
    rng = np.random.default_rng(0)
    x, tables, attrs = linear_case(rng, 1, 5, 16, 4, 8, 8, 8, 0, 1)
    with pytest.raises(Exception, match=r"OutlierLinear 'lin': attribute 'a_bits' = 9, expected 2 \.\.\. 8"):
        _native_session(linear_model(16, 4, 5, 8, {**attrs, "a_bits": 9}, *tables))
    sess = _native_session(linear_model(16, 4, "L", 8, {**attrs, "in_features": 0, "seq_len": 0}, *tables))
    with pytest.raises(Exception, match=r"OutlierLinear 'lin': input 3 \(inlier_scale\) has shape \(5,\), expected 6 values"):
        sess.run(None, {"x": activations(rng, 1, 6, 16)})


# ------------------------------------------------------------------------------------------ whole graphs
def calibrated(which: str, preset: str, depth: int | None = None):
    from ouro.calib.models import build_model
    from ouro.calib.quant import calibrate
    from ouro.recipes import get_preset

    torch.manual_seed(0)
    if which == "demo":
        from ouro.calib import data

        model = data.load_demo_model().eval()
    else:
        model = build_model(which, depth=depth).eval()
    cfg = model.cfg
    images = torch.randn(4, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
    recipe = get_preset(preset)
    return model, calibrate(model, recipe.with_(calib=type(recipe.calib)(steps=0, init_samples=4)), lambda m: m(images), progress=False)


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return m


def _compare_graphs(model, q):
    from ouro.exporter.onnx_export import example_input, export_fp
    from ouro.exporter.quantized import export_quantized

    fp = export_fp(model).model
    plugin = export_quantized(q, "plugin").model
    sc = {a.i for n in plugin.graph.node if n.domain == "ouro" for a in n.attribute if a.name == "std_correction"}
    assert sc == {1}, sc  # the exporter writes the recipe's correction (PyTorch's default, Bessel) on every node
    # the OutlierLinear outputs of block 0 upstream of its scans see identical inputs in both sessions
    early = [n.output[0] for n in plugin.graph.node if n.op_type == "OutlierLinear" and n.name.startswith("layers.0.")
             and not n.name.endswith("out_proj")]
    assert len(early) == 5
    probe = _with_outputs(plugin, early)
    for batch in (1, 3):
        x = {"images": example_input(model, batch).numpy()}
        nat, ref = (onnxruntime_session(probe, ops=ops).run(None, x) for ops in ("native", "python"))
        for a, b in zip(nat[1:], ref[1:]):
            np.testing.assert_array_equal(a, b)
        assert np.abs(nat[0] - ref[0]).max() <= LOGITS_RTOL * np.abs(ref[0]).max()
        fn, fr = (onnxruntime_session(fp, ops=ops).run(None, x)[0] for ops in ("native", "python"))
        assert np.abs(fn - fr).max() <= FP_LOGITS_RTOL * np.abs(fr).max()


@pytest.mark.native
@pytest.mark.parametrize("preset", ["w4a4", "w8a8"])
def test_demo_graphs_native_vs_python_ops(native, preset):
    _compare_graphs(*calibrated("demo", preset))


@pytest.mark.native
@pytest.mark.slow
def test_vim_tiny_graphs_native_vs_python_ops(native):
    """Vim-T width and tokens, 4 of its 24 blocks (random weights amplify single code flips block after block,
    see test_onnx_quant's Vim-T test)."""
    _compare_graphs(*calibrated("vim_tiny", "w4a4", depth=4))


@pytest.mark.native
@pytest.mark.slow
def test_vmamba_demo_graphs_native_vs_python_ops(native):
    """The VMamba demo (every scan without a gate: 6-input FP nodes, empty-z plugin nodes with fp16 activations):
    native vs Python-op sessions, the plugin graph within LOGITS_RTOL and the FP graph within FP_LOGITS_RTOL."""
    from ouro.calib import data
    from ouro.calib.quant import calibrate
    from ouro.exporter.onnx_export import example_input, export_fp
    from ouro.exporter.plugin import ungated_scans
    from ouro.exporter.quantized import export_quantized
    from ouro.recipes import get_preset

    if not all(p.is_file() for p in data.demo_files("vmamba")):
        pytest.skip("the VMamba demo checkpoint is not built yet (tools/train_demo.py --family vmamba)")
    torch.manual_seed(0)
    model = data.load_demo_model("vmamba").eval()
    cfg = model.cfg
    images = torch.randn(4, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
    recipe = get_preset("w4a4")
    q = calibrate(model, recipe.with_(calib=type(recipe.calib)(steps=0, init_samples=4)), lambda m: m(images), progress=False)
    plugin, fp = export_quantized(q, "plugin").model, export_fp(model).model
    n_scans = sum(n.op_type == "SelectiveScan" for n in plugin.graph.node)
    assert n_scans > 0 and len(ungated_scans(plugin)) == n_scans and len(ungated_scans(fp)) == n_scans
    for batch in (1, 3):
        x = {"images": example_input(model, batch).numpy()}
        nat, ref = (onnxruntime_session(plugin, ops=ops).run(None, x)[0] for ops in ("native", "python"))
        assert np.abs(nat - ref).max() <= LOGITS_RTOL * np.abs(ref).max()
        fn, fr = (onnxruntime_session(fp, ops=ops).run(None, x)[0] for ops in ("native", "python"))
        assert np.abs(fn - fr).max() <= FP_LOGITS_RTOL * np.abs(fr).max()


@pytest.mark.native
def test_cpp_runner_prints_top1_on_digits(native, tmp_path):
    """tools/deploy/ouro_ort_run (C++, no Python) runs the demo's W4A4 plugin ONNX through onnxruntime with the
    library and prints the top-1 of a few digits: the same classes as the Python session, the labels mostly."""
    from ouro.calib import data
    from ouro.exporter.quantized import export_quantized

    model, q = calibrated("demo", "w4a4")
    path = tmp_path / "demo_w4a4.onnx"
    onnx.save(export_quantized(q, "plugin").model, str(path))
    images, labels = data.load_digits_split("test")
    images, labels = images[:16].numpy().astype(np.float32), labels[:16].numpy().astype(np.int64)
    np.save(tmp_path / "digits.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    out = _run([native / "ouro_ort_run", path, native / ort_native.LIB_NAME, tmp_path / "digits.npy", "--labels",
                tmp_path / "labels.npy", "--threads", "2", "--logits", tmp_path / "logits.f32"], timeout=300,
               env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}).stdout
    top1 = [int(m) for m in re.findall(r"^image \d+: top-1 (\d+)", out, re.M)]
    assert len(top1) == 16, out
    logits = onnxruntime_session(path, ops="native").run(None, {"images": images})[0]
    assert top1 == logits.argmax(1).tolist()
    np.testing.assert_allclose(np.fromfile(tmp_path / "logits.f32", np.float32).reshape(logits.shape), logits, rtol=1e-6, atol=1e-6)
    assert f"top-1 accuracy {int((logits.argmax(1) == labels).sum())}/16" in out
    assert (logits.argmax(1) == labels).mean() >= 0.9


@pytest.mark.native
@pytest.mark.slow
def test_demo_w4a4_check_runs_on_the_native_library(native, monkeypatch, capsys, tmp_path):
    """`ouro-export --demo --w4a4 -o demo.onnx --check` (the issue's acceptance): the check's onnxruntime session
    takes the native library, and Polygraphy passes."""
    from ouro.calib import data
    from ouro.exporter.cli import main

    if not all(p.is_file() for p in data.demo_files()):
        pytest.skip("the demo checkpoint is not built yet (tools/train_demo.py)")
    monkeypatch.setattr(ort_native, "_announced", set())
    rc = main(["--demo", "--w4a4", "-o", str(tmp_path / "demo.onnx"), "--check"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"onnxruntime custom ops: native library {native / ort_native.LIB_NAME}" in out.err
    assert "Python reference ops" not in out.err
    assert "(plugin): node check PASSED" in out.out


@pytest.mark.native
@pytest.mark.slow
def test_vmamba_demo_w4a4_check_runs_on_the_native_library(native, monkeypatch, capsys, tmp_path):
    """`ouro-export --demo vmamba --w4a4 --calib real:32 -o x.onnx --check`: the plugin graph (ungated scans)
    passes the check with the native library's ops."""
    from ouro.calib import data
    from ouro.exporter.cli import main

    if not all(p.is_file() for p in data.demo_files("vmamba")):
        pytest.skip("the VMamba demo checkpoint is not built yet (tools/train_demo.py --family vmamba)")
    monkeypatch.setattr(ort_native, "_announced", set())
    # real calibration images: the graph and the check are the point here, not OuroMamba-Gen (tested elsewhere)
    rc = main(["--demo", "vmamba", "--w4a4", "--calib", "real:32", "-o", str(tmp_path / "vmamba.onnx"), "--check"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"onnxruntime custom ops: native library {native / ort_native.LIB_NAME}" in out.err
    assert "Python reference ops" not in out.err
    assert "(plugin): node check PASSED" in out.out


# ------------------------------------------------------------------------------------------ session selection
def test_session_falls_back_to_python_ops_and_says_so(monkeypatch, tmp_path, capsys):
    from ouro.exporter.onnx_export import export_fp
    from ouro.calib import data

    monkeypatch.delenv(ort_native.LIB_ENV, raising=False)
    monkeypatch.delenv(ort_native.OPS_ENV, raising=False)
    monkeypatch.setattr(native_libs, "repo_root", lambda: tmp_path)  # no in-tree build here
    monkeypatch.setattr(ort_native, "_announced", set())
    model = export_fp(data.load_demo_model().eval()).model
    onnxruntime_session(model)
    assert "Python reference ops (libouro_ort_ops.so not built; build it with: cmake" in capsys.readouterr().err
    with pytest.raises(ort_native.NativeOpsUnavailable, match="native ouro custom ops requested"):
        onnxruntime_session(model, ops="native")
    monkeypatch.setenv(ort_native.LIB_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(ort_native.NativeOpsUnavailable, match=r"\$OURO_ORT_OPS_LIB=.*missing.so does not exist; build it"):
        onnxruntime_session(model)
    with pytest.raises(ValueError, match="expected one of auto, native, python"):
        onnxruntime_session(model, ops="fast")


@pytest.mark.native
def test_session_takes_the_native_library_when_built(native, monkeypatch, capsys):
    from ouro.exporter.onnx_export import export_fp
    from ouro.calib import data

    monkeypatch.setattr(ort_native, "_announced", set())
    onnxruntime_session(export_fp(data.load_demo_model().eval()).model)
    assert f"native library {native / ort_native.LIB_NAME}" in capsys.readouterr().err
