"""The CUDA kernels' own source, executed on the CPU by a small emulator, vs the `_ref` numerics.

tests/unit/kernel_emu/ compiles trt_plugins' kernel sources with g++. Each CUDA thread runs as a
fiber, and `__syncthreads` is a real barrier. Only the CUTLASS GEMMs are replaced, by integer loops
with the same operand layouts. So these tests check what cannot be checked without a GPU:
- the indexing, the barriers and the window/slot logic of the detection, extraction, quantization,
  outlier-GEMM, combine, SIMT-GEMM, fake-quant and scan kernels;
- the fused epilogue: the per-element `dequant_inlier` the CUTLASS epilogue visitor calls (the stand-in
  GEMM applies it), and the fused outlier-GEMM + combine kernel;
- the host pipeline: workspace layout, path and epilogue dispatch, the capacity flag.

They do not exercise CUTLASS, the GPU's memory model, or warp-synchronous behaviour beyond the
block-wide barrier. The GPU tests in tests/gpu cover those.
"""
from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ouro.calib.quantizers import ThresholdPolicy, outlier_fake_quant
from ouro.calib.scan import TemporalGroupQuant, selective_scan_ref
from ouro.exporter import cuda_kernels as ck

REPO = Path(__file__).resolve().parents[2]
EMU = Path(__file__).resolve().parent / "kernel_emu"
SOURCES = [
    "trt_plugins/common/ouro_status.cu",
    "trt_plugins/common/outlier_fake_quant.cu",
    "trt_plugins/outlier_linear/outlier_linear.cu",
    "trt_plugins/outlier_linear/gemm_simt.cu",
    "trt_plugins/selective_scan/selective_scan.cu",
]
SCAN_RTOL = 1e-5
"""Emulated scan vs the reference: same fp32 operations; libm vs torch exp/log1p may differ by an ulp."""


def _load_cases():
    spec = importlib.util.spec_from_file_location("kernel_cases_emu", REPO / "tests" / "gpu" / "kernel_cases.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


kc = _load_cases()


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not on PATH (needed to build the kernel emulator)")
    out = tmp_path_factory.mktemp("emu") / "libouro_kernels_emu.so"
    cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-DOURO_CPU_EMULATION",
           f"-I{EMU}", "-include", str(EMU / "emu.h"), f"-I{REPO / 'trt_plugins' / 'common'}",
           f"-I{REPO / 'trt_plugins'}", f"-I{REPO / 'trt_plugins' / 'outlier_linear'}", "-x", "c++",
           *[str(REPO / s) for s in SOURCES], str(EMU / "emu_gemm.cpp"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ctypes.CDLL(str(out))
    for name, (restype, argtypes) in ck._PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


@pytest.fixture(params=["forward", "reverse"])
def cc(monkeypatch, request):
    """Sets the emulated compute capability; every test runs with the threads of a block resumed in
    both orders (a missing __syncthreads would make the two disagree with the reference)."""
    monkeypatch.setenv("OURO_EMU_ORDER", request.param)

    def set_cc(value: int):
        monkeypatch.setenv("OURO_EMU_CC", str(value))

    set_cc(90)
    return set_cc


def _act_c(c) -> ck._ActQuantC:
    policy = 0 if c.policy is ThresholdPolicy.DYNAMIC else 1
    return ck._ActQuantC(c.act_bits, c.bits_outlier, c.n_refresh, policy, c.k_sigma, c.scale.data_ptr(),
                         None if c.theta is None else c.theta.data_ptr())


GUARD = 64
"""Elements of sentinel before and after every output buffer: an out-of-bounds write changes them."""


class Guarded:
    """A contiguous tensor with GUARD sentinel elements on both sides (offsets keep 16-byte alignment)."""

    def __init__(self, shape, dtype):
        n = 1
        for d in shape:
            n *= d
        self.full = torch.zeros(n + 2 * GUARD, dtype=dtype)
        self.full[:GUARD] = 77
        self.full[GUARD + n:] = 77
        self.t = self.full[GUARD:GUARD + n].view(*shape)

    def intact(self) -> bool:
        n = self.t.numel()
        return bool((self.full[:GUARD] == 77).all() and (self.full[GUARD + n:] == 77).all())


def run_linear(lib, c, *, path=ck.GemmPath.AUTO, max_outliers=None, check=True, epilogue=ck.Epilogue.AUTO,
               debug=True, expect=ck.Status.OK):
    """Runs ouroOutlierLinearEx; debug=False passes no debug buffers (so AUTO may pick the fused epilogue)."""
    B, L, K = c.x.shape
    N = c.w_codes.shape[0]
    M = B * L
    mo = K if max_outliers is None else max_outliers
    ws_size = lib.ouroOutlierLinearWorkspaceSize(M, L, K, N, c.w_bits, c.act_bits, c.bits_outlier, c.n_refresh, mo)
    bufs = dict(ws=Guarded((ws_size,), torch.uint8), y=Guarded((B, L, N), c.x.dtype),
                acc_in=Guarded((B, L, N), torch.int32), acc_out=Guarded((B, L, N), torch.int32),
                codes=Guarded((B, L, K), torch.int8), mask=Guarded((B, L, K), torch.uint8))
    ws, y, acc_in, acc_out, codes, mask = (bufs[k].t for k in ("ws", "y", "acc_in", "acc_out", "codes", "mask"))
    dbg = (lambda t: t.data_ptr()) if debug else (lambda t: None)
    p = ck._LinearParamsC(M=M, L=L, K=K, N=N, x=c.x.data_ptr(), x_is_fp32=int(c.x.dtype == torch.float32),
                          w=c.w.data_ptr(), w_bits=c.w_bits, w_scale=c.w_scale.data_ptr(),
                          bias=None if c.bias is None else c.bias.data_ptr(), act=_act_c(c), max_outliers=mo,
                          y=y.data_ptr(), workspace=ws.data_ptr(), workspace_size=ws.numel(),
                          acc_inlier=dbg(acc_in), acc_outlier=dbg(acc_out), inlier_codes=dbg(codes),
                          outlier_mask=dbg(mask))
    ran, epi = ctypes.c_int(0), ctypes.c_int(0)
    st = lib.ouroOutlierLinearEx(ctypes.byref(p), int(path), int(epilogue), None, ctypes.byref(ran), ctypes.byref(epi),
                                 None)
    assert st == expect, ck.Status(st)
    if st != ck.Status.OK:
        return None
    cap = ck.Status(lib.ouroOutlierLinearCheck(ctypes.byref(p), None))
    if check:
        assert cap == ck.Status.OK
    for name, b in bufs.items():
        assert b.intact(), f"out-of-bounds write next to {name}"
    return dict(y=y, acc_in=acc_in, acc_out=acc_out, codes=codes, mask=mask.bool(), path=ck.GemmPath(ran.value),
                epilogue=ck.Epilogue(epi.value), capacity=cap)


def assert_linear_matches(c, got):
    assert got["epilogue"] is ck.Epilogue.SEPARATE  # debug accumulators requested
    ref = kc.linear_ref(c)
    assert torch.equal(got["mask"], ref.outlier_mask)
    assert torch.equal(got["codes"], ref.inlier_codes)
    assert torch.equal(got["acc_in"].long(), ref.acc_in)
    if c.bits_outlier < 16:
        assert torch.equal(got["acc_out"].long(), ref.acc_out)
    # the combine step reproduces the reference's fp32 expression exactly; fp16 output = one rounding of it
    assert torch.equal(got["y"], ref.y.to(got["y"].dtype))
    return ref


@pytest.mark.parametrize(
    "cc_value, kw, expected_path",
    [
        (90, dict(B=2, L=23, K=64, N=48), ck.GemmPath.S8_TENSORCORE),
        (80, dict(B=2, L=23, K=64, N=48), ck.GemmPath.SM80_S4_TENSORCORE),
        (86, dict(B=1, L=13, K=96, N=32, w_bits=8, act_bits=8), ck.GemmPath.S8_TENSORCORE),
        (90, dict(B=2, L=13, K=40, N=20, n_refresh=5), ck.GemmPath.SIMT_FALLBACK),
        (90, dict(B=1, L=1, K=64, N=16), ck.GemmPath.S8_TENSORCORE),
        (90, dict(B=2, L=9, K=64, N=30, n_refresh=1), ck.GemmPath.SIMT_FALLBACK),
        (90, dict(B=2, L=7, K=128, N=16, n_refresh=50, bits_outlier=16), ck.GemmPath.S8_TENSORCORE),
        (89, dict(B=1, L=11, K=32, N=8, dtype=torch.float32, bias=False), ck.GemmPath.S8_TENSORCORE),
        (90, dict(B=2, L=13, K=12, N=24, w_bits=8), ck.GemmPath.SIMT_FALLBACK),  # Vim-T dt_proj
        (90, dict(B=1, L=13, K=300, N=8, n_refresh=4), ck.GemmPath.SIMT_FALLBACK),  # > 1 channel per thread
    ],
)
def test_linear_pipeline(emu, cc, cc_value, kw, expected_path):
    cc(cc_value)
    kw = dict(kw)
    c = kc.make_linear_case(kw.pop("B"), kw.pop("L"), kw.pop("K"), kw.pop("N"), outlier_frac=0.06, seed=cc_value,
                            **kw)
    got = run_linear(emu, c)
    assert got["path"] is expected_path
    ref = assert_linear_matches(c, got)
    if c.x.shape[1] > 1:
        assert ref.outlier_rate > 0


def test_forced_paths_agree(emu, cc):
    cc(80)
    c = kc.make_linear_case(2, 13, 64, 32, outlier_frac=0.06, n_refresh=5)
    for path in (ck.GemmPath.SM80_S4_TENSORCORE, ck.GemmPath.S8_TENSORCORE, ck.GemmPath.SIMT_FALLBACK):
        got = run_linear(emu, c, path=path)
        assert got["path"] is path
        assert_linear_matches(c, got)


def test_zero_and_all_outliers(emu, cc):
    c = kc.make_linear_case(2, 13, 64, 32, scale_mult=100.0)
    got = run_linear(emu, c)
    assert not got["mask"].any() and not got["acc_out"].any()
    assert_linear_matches(c, got)
    c = kc.make_linear_case(2, 13, 64, 32, scale_mult=1e-3)
    c.policy, c.theta = ThresholdPolicy.CALIBRATED, torch.full((13,), -1.0)
    got = run_linear(emu, c)
    assert got["mask"].all() and not got["codes"].any()
    assert_linear_matches(c, got)


def test_capacity_overflow_gives_nan_rows_and_status(emu, cc):
    c = kc.make_linear_case(2, 13, 64, 32, outlier_frac=0.1, n_refresh=5)
    ref = kc.linear_ref(c)
    got = run_linear(emu, c, max_outliers=1, check=False)
    assert got["capacity"] is ck.Status.OUTLIER_CAPACITY
    # windows whose outlier list outgrew the capacity are NaN; the others are exact
    per_window = torch.nn.functional.pad(ref.outlier_mask, (0, 0, 0, 2)).reshape(2, 3, 5, 64).any(2).sum(-1)  # (B, W)
    bad = (per_window > 1).repeat_interleave(5, dim=1)[:, :13]  # (B, L)
    assert bad.any()
    y = got["y"].float()
    assert torch.isnan(y[bad]).all()
    assert torch.equal(y[~bad], ref.y.half().float()[~bad])


FUSED_CASES = [
    (90, dict(B=2, L=23, K=64, N=48), ck.GemmPath.S8_TENSORCORE),
    (80, dict(B=2, L=23, K=64, N=48), ck.GemmPath.SM80_S4_TENSORCORE),
    (89, dict(B=1, L=13, K=96, N=32, w_bits=8, act_bits=8), ck.GemmPath.S8_TENSORCORE),
    (90, dict(B=2, L=7, K=128, N=16, n_refresh=50, bits_outlier=16, bias=False), ck.GemmPath.S8_TENSORCORE),
    (90, dict(B=1, L=1, K=64, N=8), ck.GemmPath.S8_TENSORCORE),
]


@pytest.mark.parametrize("cc_value, kw, expected_path", FUSED_CASES)
def test_fused_epilogue(emu, cc, cc_value, kw, expected_path):
    """AUTO without debug buffers picks the fused epilogue; y within the named fused tolerance of the
    reference, and equal to the separate epilogue's y wherever a row has no outliers (same roundings)."""
    cc(cc_value)
    kw = dict(kw)
    c = kc.make_linear_case(kw.pop("B"), kw.pop("L"), kw.pop("K"), kw.pop("N"), outlier_frac=0.06, seed=cc_value,
                            **kw)
    got = run_linear(emu, c, debug=False)
    assert (got["path"], got["epilogue"]) == (expected_path, ck.Epilogue.FUSED)
    ref = kc.linear_ref(c)
    kc.assert_fused_close(got["y"], ref)
    clean = ~ref.outlier_mask.any(-1)  # (B, L) rows without outliers: y = half(inlier term + bias), exactly
    assert torch.equal(got["y"][clean], ref.y_inlier.half()[clean])
    if c.x.shape[1] > 1:
        assert ref.outlier_rate > 0 and not clean.all()


def test_fused_without_outliers_is_exact(emu, cc):
    c = kc.make_linear_case(2, 13, 64, 32, scale_mult=100.0)
    got = run_linear(emu, c, debug=False, epilogue=ck.Epilogue.FUSED)
    assert got["epilogue"] is ck.Epilogue.FUSED
    assert torch.equal(got["y"], kc.linear_ref(c).y.half())


def test_fused_capacity_overflow_gives_nan_rows(emu, cc):
    c = kc.make_linear_case(2, 13, 64, 32, outlier_frac=0.1, n_refresh=5)
    ref = kc.linear_ref(c)
    per_window = torch.nn.functional.pad(ref.outlier_mask, (0, 0, 0, 2)).reshape(2, 3, 5, 64).any(2).sum(-1)
    cap = int(per_window.min())  # the smallest window fits, the others overflow
    got = run_linear(emu, c, max_outliers=cap, check=False, debug=False)
    assert got["epilogue"] is ck.Epilogue.FUSED and got["capacity"] is ck.Status.OUTLIER_CAPACITY
    bad = (per_window > cap).repeat_interleave(5, dim=1)[:, :13]
    assert bad.any() and not bad.all()
    assert torch.isnan(got["y"].float()[bad]).all()
    kc.assert_fused_close(got["y"], ref, rows=~bad)


@pytest.mark.parametrize(
    "kw, debug, expected",
    [
        (dict(B=1, L=11, K=32, N=8, dtype=torch.float32), False, ck.Status.UNSUPPORTED_SHAPE),  # fp32 y
        (dict(B=2, L=13, K=64, N=20), False, ck.Status.UNSUPPORTED_SHAPE),  # N % 8 != 0
        (dict(B=2, L=13, K=40, N=24), False, ck.Status.UNSUPPORTED_SHAPE),  # SIMT path (K % 16 != 0)
        (dict(B=2, L=13, K=64, N=32), True, ck.Status.INVALID_ARGUMENT),  # debug accumulators requested
    ],
)
def test_fused_refusals_and_auto_fallback(emu, cc, kw, debug, expected):
    """Forcing FUSED where it cannot run is an error status, never a silent fallback; AUTO then runs the
    separate epilogue."""
    kw = dict(kw)
    c = kc.make_linear_case(kw.pop("B"), kw.pop("L"), kw.pop("K"), kw.pop("N"), outlier_frac=0.06, **kw)
    assert run_linear(emu, c, debug=debug, epilogue=ck.Epilogue.FUSED, expect=expected) is None
    got = run_linear(emu, c, debug=debug)
    assert got["epilogue"] is ck.Epilogue.SEPARATE
    assert torch.equal(got["y"], kc.linear_ref(c).y.to(got["y"].dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C, bits_outlier", [(64, 8), (40, 16), (16, 4)])
def test_fake_quant(emu, cc, dtype, C, bits_outlier):
    c = kc.make_linear_case(2, 13, C, 1, outlier_frac=0.06, bits_outlier=bits_outlier, n_refresh=5, dtype=dtype)
    ref = outlier_fake_quant(c.x, c.scale, c.act_bits, bits_outlier, c.n_refresh)
    yg = Guarded(tuple(c.x.shape), dtype)
    y = yg.t
    q = _act_c(c)
    st = emu.ouroOutlierFakeQuant(c.x.data_ptr(), y.data_ptr(), int(dtype == torch.float32), 2, 13, C,
                                  ctypes.byref(q), None)
    assert st == ck.Status.OK and yg.intact()
    assert torch.equal(y, ref.to(dtype))


def _scan(lib, u, delta, A, Bm, Cm, Dskip, z, *, reverse, softplus=True, qs=(None, None, None), hq=None):
    Bsz, L, D = u.shape
    S = A.shape[1]
    og = Guarded(tuple(u.shape), u.dtype)
    wg = Guarded((lib.ouroSelectiveScanWorkspaceSize(Bsz, L, D, S, 1),), torch.uint8)
    out, ws = og.t, wg.t
    no_q = ck._ActQuantC(0, 0, 1, 0, 0.0, None, None)
    p = ck._ScanParamsC(B=Bsz, L=L, D=D, S=S, io_is_fp32=int(u.dtype == torch.float32), reverse=int(reverse),
                        delta_softplus=int(softplus), u=u.data_ptr(), delta=delta.data_ptr(), A=A.data_ptr(),
                        Bm=Bm.data_ptr(), Cm=Cm.data_ptr(), Dskip=None if Dskip is None else Dskip.data_ptr(),
                        z=None if z is None else z.data_ptr(), out=out.data_ptr(),
                        delta_q=qs[0] or no_q, b_q=qs[1] or no_q, c_q=qs[2] or no_q,
                        workspace=ws.data_ptr(), workspace_size=ws.numel())
    if hq is not None:
        p.h_bits, p.h_group, p.h_scale, p.h_zero = hq.bits, hq.group, hq.scale.data_ptr(), hq.zero.data_ptr()
    assert lib.ouroSelectiveScan(ctypes.byref(p), None) == ck.Status.OK
    assert og.intact() and wg.intact(), "out-of-bounds write"
    return out


def _scan_inputs(B=2, L=13, D=40, S=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, L, D, generator=g)
    delta = torch.randn(B, L, D, generator=g) * 0.5 - 1.0
    A = -torch.exp(torch.rand(D, S, generator=g) * 2)
    return (u, delta, A, torch.randn(B, L, S, generator=g), torch.randn(B, L, S, generator=g),
            torch.randn(D, generator=g), torch.randn(B, L, D, generator=g))


@pytest.mark.parametrize("reverse", [False, True])
def test_scan(emu, cc, reverse):
    u, delta, A, Bm, Cm, Dskip, z = _scan_inputs()
    ref = selective_scan_ref(u, delta, A, Bm, Cm, Dskip, z, reverse=reverse)
    got = _scan(emu, u, delta, A, Bm, Cm, Dskip, z, reverse=reverse)
    torch.testing.assert_close(got, ref, rtol=SCAN_RTOL, atol=SCAN_RTOL)
    got16 = _scan(emu, *(t.half() for t in (u, delta)), A, Bm.half(), Cm.half(), Dskip, z.half(), reverse=reverse)
    ref16 = selective_scan_ref(u.half(), delta.half(), A, Bm.half(), Cm.half(), Dskip, z.half(), reverse=reverse)
    torch.testing.assert_close(got16.float(), ref16, rtol=2e-3, atol=2e-3)


def test_scan_small_state_no_gate(emu):
    u, delta, A, Bm, Cm, _, _ = _scan_inputs(D=33, S=5)
    ref = selective_scan_ref(u, delta.abs(), A, Bm, Cm, delta_softplus=False)
    got = _scan(emu, u, delta.abs(), A, Bm, Cm, None, None, reverse=False, softplus=False)
    torch.testing.assert_close(got, ref, rtol=SCAN_RTOL, atol=SCAN_RTOL)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_quantized_operands_and_tgq(emu, cc, reverse):
    B, L, D, S = 2, 13, 64, 16
    u, _, A, _, _, Dskip, z = _scan_inputs(B=B, L=L, D=D, S=S)
    delta = kc.make_linear_case(B, L, D, 1, seed=1, outlier_frac=0.06, n_refresh=5, dtype=torch.float32).x * 0.5
    Bm = kc.make_linear_case(B, L, S, 1, seed=2, outlier_frac=0.0, dtype=torch.float32).x
    Cm = kc.make_linear_case(B, L, S, 1, seed=3, outlier_frac=0.0, dtype=torch.float32).x
    scale = lambda x: (3.0 * x.std(dim=(0, 2)) / 7).contiguous()  # noqa: E731
    sd, sb, sc = scale(delta), scale(Bm), scale(Cm)
    qs = (ck._ActQuantC(4, 8, 5, 0, 4.0, sd.data_ptr(), None), ck._ActQuantC(4, 8, 5, 0, 3.0, sb.data_ptr(), None),
          ck._ActQuantC(4, 8, 5, 0, 3.0, sc.data_ptr(), None))
    G = TemporalGroupQuant.num_groups(L, 4)
    hq = TemporalGroupQuant(bits=8, group=4, scale=torch.full((G,), 0.05), zero=torch.full((G,), 128.0))
    fq = lambda x, s, k: outlier_fake_quant(x, s, 4, 8, 5, k_sigma=k)  # noqa: E731
    ref = selective_scan_ref(u, fq(delta, sd, 4.0), A, fq(Bm, sb, 3.0), fq(Cm, sc, 3.0), Dskip, z, reverse=reverse,
                             h_quant=hq)
    got = _scan(emu, u, delta, A, Bm, Cm, Dskip, z, reverse=reverse, qs=qs, hq=hq)
    close = torch.isclose(got, ref, rtol=SCAN_RTOL, atol=SCAN_RTOL)
    assert float((~close).float().mean()) <= 0.01, f"{int((~close).sum())} of {close.numel()} differ"
