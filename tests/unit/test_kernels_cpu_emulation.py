"""The CUDA kernels' own source, executed on the CPU by a small emulator, vs the `_ref` numerics.

tests/unit/kernel_emu/ compiles trt_plugins' kernel sources with g++ (fixture `kernel_emu_lib`). Each CUDA thread
runs as a fiber and `__syncthreads` is a real barrier; every test runs with the threads of a block resumed in
forward and in reverse order, so a missing barrier changes a result. Warp shuffles and the tensor-core
`mma.sync` instructions are emulated with the PTX ISA fragment layouts, and `cp.async` lands in shared memory
only when the issuing thread waits for its group. Only the CUTLASS GEMMs of the separate epilogue are replaced,
by integer loops with the same operand layouts. So these tests check what cannot be checked without a GPU:
- the fused path: the one-pass activation prep, the fused GEMM's pipeline, swizzled shared-memory fragments, the
  union of each tile's outlier channels, the K-major W capture from the main loop and the gather of later
  union chunks (the side GEMM fed the same gathered indices), the second accumulator and the one epilogue;
- the separate (five-kernel) variant, the fake quant, the statistics kernels and the warp-parallel scan;
- the host code: path / epilogue / tile choice, workspace layouts, the capacity flag, launch plans.

They do not exercise CUTLASS, the GPU memory model, real warp timing, or the hardware's fp32 accumulation order
inside fp16 MMAs (tests/gpu covers those).
"""
from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ouro.calib.quantizers import ThresholdPolicy, outlier_fake_quant, outlier_quant_ref
from ouro.calib.scan import TemporalGroupQuant, selective_scan_ref
from ouro.exporter import cuda_kernels as ck

REPO = Path(__file__).resolve().parents[2]
SCAN_RTOL = 1e-5
"""Emulated scan vs the reference: same fp32 operations per state; the sum over the d_state states is taken in
four partial sums and a butterfly instead of sequentially, and libm vs torch exp/log1p may differ by an ulp."""
SCAN_FP16_TOL = 2e-3
"""fp16 scan I/O: the output's one fp16 rounding (2**-11 relative) plus margin."""
F16_OUTLIER_TERM_REL = 2.0 ** -16
"""Fused path, fp16 outliers: the outlier term is accumulated on fp16 tensor cores in fp32 (each product of an
fp16 value and a weight code is exact in fp32; at most 64 products per union chunk are summed, each addition
rounding at 2**-24), where the reference sums in float64: |error| <= 64 * 2**-24 = 2**-18 of the term's
absolute sum; 2**-16 leaves a factor 4."""


def _load_cases():
    spec = importlib.util.spec_from_file_location("kernel_cases_emu", REPO / "tests" / "gpu" / "kernel_cases.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


kc = _load_cases()


@pytest.fixture
def emu(kernel_emu_lib):
    return kernel_emu_lib


@pytest.fixture(params=["forward", "reverse"])
def cc(monkeypatch, request):
    """Sets the emulated compute capability (and thread resume order: both orders for every test)."""
    monkeypatch.setenv("OURO_EMU_ORDER", request.param)

    def set_cc(value: int):
        monkeypatch.setenv("OURO_EMU_CC", str(value))

    set_cc(90)
    return set_cc


def _act_c(c) -> ck._ActQuantC:
    policy = 0 if c.policy is ThresholdPolicy.DYNAMIC else 1
    return ck._ActQuantC(bits=c.act_bits, bits_outlier=c.bits_outlier, n_refresh=c.n_refresh, policy=policy,
                         k_sigma=c.k_sigma, std_correction=c.std_correction, scale=c.scale.data_ptr(),
                         theta=None if c.theta is None else c.theta.data_ptr())


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


def run_linear(lib, c, *, path=ck.GemmPath.AUTO, epilogue=ck.Epilogue.AUTO, tactic=0, max_outliers=None,
               check=True, debug=True, report=None, expect=ck.Status.OK):
    """ouroOutlierLinearRun on case c; the workspace is exactly the size of the epilogue requested (AUTO: AUTO's;
    the SIMT path runs the separate epilogue)."""
    B, L, K = c.x.shape
    N = c.w_codes.shape[0]
    M = B * L
    mo = K if max_outliers is None else max_outliers
    ws_epi = ck.Epilogue.SEPARATE if path is ck.GemmPath.SIMT_FALLBACK else epilogue  # SIMT: separate only
    ws_size = lib.ouroOutlierLinearWorkspaceSizeFor(M, L, K, N, c.w_bits, c.act_bits, c.bits_outlier, c.n_refresh,
                                                    mo, int(ws_epi))
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
    cfg = ck._LinearConfigC(path=int(path), epilogue=int(epilogue), tactic=tactic, overflow_report=report)
    ran = ck._LinearChoiceC()
    st = lib.ouroOutlierLinearRun(ctypes.byref(p), ctypes.byref(cfg), None, ctypes.byref(ran), None)
    assert st == expect, ck.Status(st)
    if st != ck.Status.OK:
        return None
    cap = ck.Status(lib.ouroOutlierLinearCheck(ctypes.byref(p), None))
    if check:
        assert cap == ck.Status.OK
    for name, b in bufs.items():
        assert b.intact(), f"out-of-bounds write next to {name}"
    return dict(y=y, acc_in=acc_in, acc_out=acc_out, codes=codes, mask=mask.bool(), path=ck.GemmPath(ran.path),
                epilogue=ck.Epilogue(ran.epilogue), tactic=ran.tactic, capacity=cap)


def assert_linear_exact(c, got, ref=None, rows=None):
    """Masks, codes and both integer accumulators bit for bit; y = the reference's fp32 expression rounded once to
    y's dtype. fp16 outliers: acc_out is not an integer, y within F16_OUTLIER_TERM_REL of the outlier term."""
    ref = ref or kc.linear_ref(c)
    sel = (lambda t: t) if rows is None else (lambda t: t[rows])
    assert torch.equal(sel(got["mask"]), sel(ref.outlier_mask)), "outlier masks differ"
    assert torch.equal(sel(got["codes"]), sel(ref.inlier_codes)), "inlier codes differ"
    assert torch.equal(sel(got["acc_in"]).long(), sel(ref.acc_in)), "inlier accumulators differ"
    y = got["y"]
    if c.bits_outlier < 16:
        assert torch.equal(sel(got["acc_out"]).long(), sel(ref.acc_out)), "outlier accumulators differ"
        assert torch.equal(sel(y), sel(ref.y).to(y.dtype)), "y differs from the reference"
    elif got["epilogue"] is ck.Epilogue.SEPARATE:
        assert torch.equal(sel(y), sel(ref.y).to(y.dtype))
    else:
        term = (ref.y - ref.y_inlier).abs()
        ulp = 2.0 ** -11 if y.dtype == torch.float16 else 2.0 ** -24
        bound = F16_OUTLIER_TERM_REL * sel(term) + ulp * sel(ref.y).abs() + 2.0 ** -24
        err = (sel(y).float() - sel(ref.y)).abs()
        assert bool((err <= bound).all()), f"fused y off by {float(err.max()):.3g}"
    clean = ~sel(ref.outlier_mask).any(-1)  # rows without outliers: bit-equal whatever the outlier arithmetic
    assert torch.equal(sel(y)[clean], sel(ref.y).to(y.dtype)[clean])
    return ref


def case(B, L, K, N, seed=0, outlier_frac=0.06, theta=None, **kw):
    """kc.make_linear_case; theta: calibrated thresholds (one value for every token) instead of mu + k sigma."""
    c = kc.make_linear_case(B, L, K, N, outlier_frac=outlier_frac, seed=seed, **kw)
    if theta is not None:
        c.policy, c.theta = ThresholdPolicy.CALIBRATED, torch.full((L,), float(theta))
    return c


WIDE = dict(outlier_frac=0.45, scale_mult=0.2, theta=4.0)
"""45 % spike channels, all detected (calibrated theta 4 < |spike| 8..12, trigger at max > 0.6 sigma): windows
with ~100 outlier channels, so a tile's union spans two chunks of 64 (the second gathered from global memory)."""


# --------------------------------------------------------------------------- the fused path
FUSED_CASES = [
    # (cc, case kwargs, expected path) -- operand kinds, tails, dtypes, policies
    (90, dict(B=2, L=23, K=64, N=48), ck.GemmPath.S8_TENSORCORE),  # s8 x unpacked-in-registers int4 weights
    (80, dict(B=2, L=23, K=64, N=48), ck.GemmPath.SM80_S4_TENSORCORE),  # native int4 mma
    (89, dict(B=1, L=19, K=96, N=40), ck.GemmPath.SM80_S4_TENSORCORE),  # native int4 on Ada
    (86, dict(B=1, L=13, K=96, N=32, w_bits=8, act_bits=8), ck.GemmPath.S8_TENSORCORE),
    (90, dict(B=2, L=9, K=48, N=30, w_bits=8, n_refresh=1), ck.GemmPath.S8_TENSORCORE),  # K % 64 != 0, N % 8 != 0
    (90, dict(B=2, L=7, K=128, N=17, n_refresh=50, bits_outlier=16, act_bits=8), ck.GemmPath.S8_TENSORCORE),
    (89, dict(B=1, L=11, K=32, N=8, dtype=torch.float32, bias=False), ck.GemmPath.SM80_S4_TENSORCORE),  # fp32 I/O
    (80, dict(B=1, L=13, K=64, N=24, act_bits=3, w_bits=8), ck.GemmPath.S8_TENSORCORE),  # 3-bit inliers
    (90, dict(B=1, L=1, K=64, N=16), ck.GemmPath.S8_TENSORCORE),  # M = 1
    (90, dict(B=1, L=40, K=256, N=72, n_refresh=20, **WIDE), ck.GemmPath.S8_TENSORCORE),  # union > 64
    (80, dict(B=1, L=40, K=256, N=40, n_refresh=20, **WIDE), ck.GemmPath.SM80_S4_TENSORCORE),
    (90, dict(B=1, L=30, K=256, N=24, w_bits=8, act_bits=8, bits_outlier=16, n_refresh=15, **WIDE),
     ck.GemmPath.S8_TENSORCORE),  # fp16 outliers over several union chunks
]


@pytest.mark.parametrize("cc_value, kw, expected_path", FUSED_CASES)
def test_fused_path_matches_reference(emu, cc, cc_value, kw, expected_path):
    cc(cc_value)
    kw = dict(kw)
    c = case(kw.pop("B"), kw.pop("L"), kw.pop("K"), kw.pop("N"), seed=cc_value, **kw)
    got = run_linear(emu, c)
    assert (got["path"], got["epilogue"]) == (expected_path, ck.Epilogue.FUSED)
    ref = assert_linear_exact(c, got)
    if c.x.shape[1] > 1:
        assert ref.outlier_rate > 0
    if c.n_refresh > 1:
        assert not ref.outlier_mask.any(-1).all()  # rows without outliers exist (compared bit for bit)


def test_union_beyond_one_chunk_uses_the_global_gather(emu, cc):
    """The precondition of the 'union > 64' cases: some tile's union really spans several 64-channel chunks."""
    c = case(1, 40, 256, 72, n_refresh=20, seed=90, **WIDE)
    ref = kc.linear_ref(c)
    per_window = ref.outlier_mask.reshape(1, 2, 20, 256).any(2).sum(-1)
    assert int(per_window.min()) > 64
    assert_linear_exact(c, run_linear(emu, c), ref)


def test_every_tactic(emu, cc):
    """Every tile shape (plugin tactic) on one shape with M, N and K tails."""
    c = case(2, 29, 96, 100, n_refresh=7, seed=3)
    ref = kc.linear_ref(c)
    names = [emu.ouroOutlierLinearTacticName(i).decode() for i in range(1, emu.ouroOutlierLinearNumTactics() + 1)]
    assert len(names) >= 5 and len(set(names)) == len(names)
    for t in range(1, len(names) + 1):
        got = run_linear(emu, c, tactic=t)
        assert got["tactic"] == t and got["epilogue"] is ck.Epilogue.FUSED
        assert_linear_exact(c, got, ref)


def test_std_correction(emu, cc):
    """Both corrections on both epilogues, on data where they give different outlier lists (a test that the
    kernels ignore the parameter would fail)."""
    c0 = case(2, 31, 32, 24, outlier_frac=0.0, n_refresh=4, seed=11, w_bits=8, k_sigma=1.5, scale_mult=0.3)
    refs = {}
    for corr in (0, 1):
        c0.std_correction = corr
        refs[corr] = kc.linear_ref(c0)
    assert not torch.equal(refs[0].outlier_mask, refs[1].outlier_mask)
    for corr in (0, 1):
        c0.std_correction = corr
        for epi in (ck.Epilogue.FUSED, ck.Epilogue.SEPARATE):
            got = run_linear(emu, c0, epilogue=epi)
            assert got["epilogue"] is epi
            assert_linear_exact(c0, got, refs[corr])


def test_zero_and_all_outliers(emu, cc):
    for epi in (ck.Epilogue.FUSED, ck.Epilogue.SEPARATE):
        c = case(2, 13, 64, 32, scale_mult=100.0)
        got = run_linear(emu, c, epilogue=epi)
        assert not got["mask"].any() and not got["acc_out"].any()
        assert_linear_exact(c, got)
        c = case(2, 13, 64, 32, scale_mult=1e-3)
        c.policy, c.theta = ThresholdPolicy.CALIBRATED, torch.full((13,), -1.0)
        got = run_linear(emu, c, epilogue=epi)
        assert got["mask"].all() and not got["codes"].any()
        assert_linear_exact(c, got)


@pytest.mark.parametrize("epilogue", [ck.Epilogue.FUSED, ck.Epilogue.SEPARATE])
def test_capacity_overflow_gives_nan_rows_status_and_report(emu, cc, epilogue):
    c = case(2, 13, 64, 32, outlier_frac=0.1, n_refresh=5)
    ref = kc.linear_ref(c)
    per_window = torch.nn.functional.pad(ref.outlier_mask, (0, 0, 0, 2)).reshape(2, 3, 5, 64).any(2).sum(-1)  # (B, W)
    cap = int(per_window.min())  # the smallest window fits, the others overflow
    flag = ctypes.c_void_p()
    assert emu.ouroHostFlagAlloc(ctypes.byref(flag)) == ck.Status.OK
    try:
        got = run_linear(emu, c, epilogue=epilogue, max_outliers=cap, check=False, report=flag.value)
        assert got["capacity"] is ck.Status.OUTLIER_CAPACITY
        assert ctypes.c_int32.from_address(flag.value).value == 1  # the caller's flag, set by the kernels
    finally:
        emu.ouroHostFlagFree(flag)
    bad = (per_window > cap).repeat_interleave(5, dim=1)[:, :13]  # (B, L)
    assert bad.any() and not bad.all()
    assert torch.isnan(got["y"].float()[bad]).all()
    assert torch.equal(got["y"][~bad], ref.y.half()[~bad])


def test_fused_and_separate_agree_and_workspace_is_sized_by_epilogue(emu, cc):
    c = case(2, 23, 128, 64, seed=5)
    ref = kc.linear_ref(c)
    fused = run_linear(emu, c, epilogue=ck.Epilogue.FUSED)
    sep = run_linear(emu, c, epilogue=ck.Epilogue.SEPARATE)
    for k in ("y", "acc_in", "acc_out", "codes", "mask"):
        assert torch.equal(fused[k], sep[k]), k
    assert_linear_exact(c, fused, ref)
    args = (46, 23, 128, 64, 4, 4, 8, 10, 128)
    f, s = (emu.ouroOutlierLinearWorkspaceSizeFor(*args, int(e)) for e in (ck.Epilogue.FUSED, ck.Epilogue.SEPARATE))
    assert emu.ouroOutlierLinearWorkspaceSizeFor(*args, int(ck.Epilogue.AUTO)) == f
    assert s - f >= 2 * 46 * 64 * 4  # the separate epilogue's two int32 M x N buffers
    assert emu.ouroOutlierLinearWorkspaceSize(*args) == s  # the v1.0 entry point: enough for every epilogue


@pytest.mark.parametrize(
    "cc_value, kw, request_, expected",
    [
        (90, dict(K=40, N=24), dict(epilogue=ck.Epilogue.FUSED), ck.Status.UNSUPPORTED_SHAPE),  # K % 16 != 0
        (90, dict(K=48, N=24), dict(epilogue=ck.Epilogue.FUSED), ck.Status.UNSUPPORTED_SHAPE),  # w4 needs K % 32
        (90, dict(K=64, N=24), dict(path=ck.GemmPath.SIMT_FALLBACK, epilogue=ck.Epilogue.FUSED),
         ck.Status.UNSUPPORTED_SHAPE),
        (90, dict(K=64, N=24), dict(path=ck.GemmPath.SM90_WGMMA), ck.Status.NOT_IMPLEMENTED),
        (90, dict(K=64, N=24), dict(path=ck.GemmPath.SM80_S4_TENSORCORE), ck.Status.UNSUPPORTED_ARCH),
        (80, dict(K=64, N=24, act_bits=8, bits_outlier=16), dict(path=ck.GemmPath.SM80_S4_TENSORCORE),
         ck.Status.INVALID_ARGUMENT),  # 8-bit activations cannot run int4 MMA
        (90, dict(K=64, N=24), dict(tactic=99), ck.Status.INVALID_ARGUMENT),
        (90, dict(K=64, N=24), dict(epilogue=ck.Epilogue.SEPARATE, tactic=1), ck.Status.INVALID_ARGUMENT),
    ],
)
def test_refusals_are_status_codes(emu, cc, cc_value, kw, request_, expected):
    """A request that cannot run is an error status, never a silent fallback."""
    cc(cc_value)
    kw = dict(kw)
    c = case(1, 13, kw.pop("K"), kw.pop("N"), **kw)
    assert run_linear(emu, c, expect=expected, **request_) is None


def test_auto_falls_back_to_the_separate_epilogue_for_odd_k(emu, cc):
    c = case(2, 13, 40, 20, n_refresh=5)  # K % 16 != 0: SIMT GEMM, separate epilogue
    got = run_linear(emu, c)
    assert (got["path"], got["epilogue"], got["tactic"]) == (ck.GemmPath.SIMT_FALLBACK, ck.Epilogue.SEPARATE, 0)
    assert_linear_exact(c, got)


def test_plan_is_the_launch(emu, cc, monkeypatch):
    """ouroOutlierLinearPlan and the launch share one decision procedure: same path, epilogue and tile for the
    same shape, compute capability and SM count."""
    for cc_value, sms, (B, L, K, N, w_bits) in [(90, 132, (2, 23, 64, 48, 4)), (80, 108, (1, 40, 256, 72, 4)),
                                                (89, 4, (2, 29, 96, 100, 8)), (90, 2, (2, 13, 40, 20, 4))]:
        cc(cc_value)
        monkeypatch.setenv("OURO_EMU_SMS", str(sms))
        c = case(B, L, K, N, w_bits=w_bits, n_refresh=7)
        got = run_linear(emu, c)
        plan = ck.linear_plan(B * L, L, K, N, w_bits=w_bits, act_bits=4, bits_outlier=8, n_refresh=7, cc=cc_value,
                              num_sms=sms, lib=emu)
        tactic = emu.ouroOutlierLinearTacticName(got["tactic"]).decode() if got["tactic"] else None
        assert (plan.path, plan.epilogue, plan.tactic) == (got["path"].label, got["epilogue"].label, tactic)
        assert len(plan.kernels) == (2 if plan.epilogue == "fused" else 5)


@pytest.mark.slow
@pytest.mark.parametrize("B", kc.BATCHES)
@pytest.mark.parametrize("K,N", kc.VIM_KN + kc.VIM_X_PROJ_KN)
def test_vim_shapes_fused(kernel_emu_lib, monkeypatch, B, K, N):
    """Every Vim-T/S/B linear shape at batch 1 and 32 on the default path of an H100 (forward order only: the
    orders are covered by the small cases): integer accumulators bit-exact, y the reference's."""
    monkeypatch.setenv("OURO_EMU_CC", "90")
    c = case(B, kc.L_VIM, K, N, seed=K + N + B, outlier_frac=0.02)
    got = run_linear(kernel_emu_lib, c)
    assert got["epilogue"] is ck.Epilogue.FUSED
    ref = assert_linear_exact(c, got)
    assert ref.outlier_rate > 0


# --------------------------------------------------------------------------- the separate (five-kernel) variant
@pytest.mark.parametrize(
    "cc_value, kw, expected_path",
    [
        (90, dict(B=2, L=23, K=64, N=48), ck.GemmPath.S8_TENSORCORE),
        (80, dict(B=2, L=23, K=64, N=48), ck.GemmPath.SM80_S4_TENSORCORE),
        (89, dict(B=2, L=23, K=64, N=48), ck.GemmPath.SM80_S4_TENSORCORE),
        (86, dict(B=1, L=13, K=96, N=32, w_bits=8, act_bits=8), ck.GemmPath.S8_TENSORCORE),
        (90, dict(B=2, L=13, K=40, N=20, n_refresh=5), ck.GemmPath.SIMT_FALLBACK),
        (90, dict(B=2, L=9, K=64, N=30, n_refresh=1), ck.GemmPath.SIMT_FALLBACK),
        (90, dict(B=2, L=7, K=128, N=16, n_refresh=50, bits_outlier=16), ck.GemmPath.S8_TENSORCORE),
        (89, dict(B=1, L=11, K=32, N=8, dtype=torch.float32, bias=False), ck.GemmPath.SM80_S4_TENSORCORE),
        (90, dict(B=2, L=13, K=12, N=24, w_bits=8), ck.GemmPath.SIMT_FALLBACK),  # Vim-T dt_proj
        (90, dict(B=1, L=13, K=300, N=8, n_refresh=4), ck.GemmPath.SIMT_FALLBACK),  # > 1 channel per thread
    ],
)
def test_separate_pipeline(emu, cc, cc_value, kw, expected_path):
    cc(cc_value)
    kw = dict(kw)
    c = case(kw.pop("B"), kw.pop("L"), kw.pop("K"), kw.pop("N"), seed=cc_value, **kw)
    got = run_linear(emu, c, epilogue=ck.Epilogue.SEPARATE)
    assert (got["path"], got["epilogue"]) == (expected_path, ck.Epilogue.SEPARATE)
    ref = assert_linear_exact(c, got)
    if c.x.shape[1] > 1:
        assert ref.outlier_rate > 0


def test_forced_paths_agree(emu, cc):
    cc(80)
    c = case(2, 13, 64, 32, n_refresh=5)
    ref = kc.linear_ref(c)
    for path in (ck.GemmPath.SM80_S4_TENSORCORE, ck.GemmPath.S8_TENSORCORE, ck.GemmPath.SIMT_FALLBACK):
        for epi in (ck.Epilogue.AUTO, ck.Epilogue.SEPARATE):
            got = run_linear(emu, c, path=path, epilogue=epi)
            assert got["path"] is path
            assert_linear_exact(c, got, ref)


# --------------------------------------------------------------------------- fake quant and scan
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C, bits_outlier, corr", [(64, 8, 0), (40, 16, 1), (16, 4, 1)])
def test_fake_quant(emu, cc, dtype, C, bits_outlier, corr):
    c = case(2, 13, C, 1, bits_outlier=bits_outlier, n_refresh=5, dtype=dtype, std_correction=corr)
    ref = outlier_fake_quant(c.x, c.scale, c.act_bits, bits_outlier, c.n_refresh, std_correction=corr)
    yg = Guarded(tuple(c.x.shape), dtype)
    q = _act_c(c)
    st = emu.ouroOutlierFakeQuant(c.x.data_ptr(), yg.t.data_ptr(), int(dtype == torch.float32), 2, 13, C,
                                  ctypes.byref(q), None)
    assert st == ck.Status.OK and yg.intact()
    assert torch.equal(yg.t, ref.to(dtype))


def _scan(lib, u, delta, A, Bm, Cm, Dskip, z, *, reverse, softplus=True, qs=(None, None, None), hq=None):
    Bsz, L, D = u.shape
    S = A.shape[1]
    og = Guarded(tuple(u.shape), u.dtype)
    wg = Guarded((lib.ouroSelectiveScanWorkspaceSize(Bsz, L, D, S, 1),), torch.uint8)
    out, ws = og.t, wg.t
    p = ck._ScanParamsC(B=Bsz, L=L, D=D, S=S, io_is_fp32=int(u.dtype == torch.float32), reverse=int(reverse),
                        delta_softplus=int(softplus), u=u.data_ptr(), delta=delta.data_ptr(), A=A.data_ptr(),
                        Bm=Bm.data_ptr(), Cm=Cm.data_ptr(), Dskip=None if Dskip is None else Dskip.data_ptr(),
                        z=None if z is None else z.data_ptr(), out=out.data_ptr(),
                        delta_q=qs[0] or ck._NO_QUANT, b_q=qs[1] or ck._NO_QUANT, c_q=qs[2] or ck._NO_QUANT,
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
@pytest.mark.parametrize("B, L, D", [(2, 13, 40), (1, 45, 64)])  # one chunk with a channel tail; two chunks
def test_scan(emu, cc, reverse, B, L, D):
    u, delta, A, Bm, Cm, Dskip, z = _scan_inputs(B=B, L=L, D=D)
    ref = selective_scan_ref(u, delta, A, Bm, Cm, Dskip, z, reverse=reverse)
    got = _scan(emu, u, delta, A, Bm, Cm, Dskip, z, reverse=reverse)
    torch.testing.assert_close(got, ref, rtol=SCAN_RTOL, atol=SCAN_RTOL)
    h = [t.half() for t in (u, delta, Bm, Cm, z)]
    got16 = _scan(emu, h[0], h[1], A, h[2], h[3], Dskip, h[4], reverse=reverse)
    ref16 = selective_scan_ref(h[0], h[1], A, h[2], h[3], Dskip, h[4], reverse=reverse)
    torch.testing.assert_close(got16.float(), ref16, rtol=SCAN_FP16_TOL, atol=SCAN_FP16_TOL)


def test_scan_small_state_no_gate(emu, cc):
    """S = 5 (rows not 16-byte multiples: the plain-load staging), no z, no D, no softplus."""
    u, delta, A, Bm, Cm, _, _ = _scan_inputs(D=33, S=5)
    ref = selective_scan_ref(u, delta.abs(), A, Bm, Cm, delta_softplus=False)
    got = _scan(emu, u, delta.abs(), A, Bm, Cm, None, None, reverse=False, softplus=False)
    torch.testing.assert_close(got, ref, rtol=SCAN_RTOL, atol=SCAN_RTOL)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("corr", [0, 1])
def test_scan_quantized_operands_and_tgq(emu, cc, reverse, corr):
    """Delta, B and C fake-quantized from the statistics kernels (B and C with real outliers), TGQ in the loop."""
    B, L, D, S = 2, 13, 64, 16
    u, _, A, _, _, Dskip, z = _scan_inputs(B=B, L=L, D=D, S=S)
    delta = case(B, L, D, 1, seed=1, n_refresh=5, dtype=torch.float32).x * 0.5
    Bm = case(B, L, S, 1, seed=2, outlier_frac=0.13, n_refresh=5, dtype=torch.float32).x
    Cm = case(B, L, S, 1, seed=3, outlier_frac=0.13, n_refresh=5, dtype=torch.float32).x
    scale = lambda x: (3.0 * x.std(dim=(0, 2)) / 7).contiguous()  # noqa: E731
    sd, sb, sc = scale(delta), scale(Bm), scale(Cm)
    mk = lambda s, k: ck._ActQuantC(bits=4, bits_outlier=8, n_refresh=5, policy=0, k_sigma=k,  # noqa: E731
                                    std_correction=corr, scale=s.data_ptr())
    qs = (mk(sd, 4.0), mk(sb, 3.0), mk(sc, 3.0))
    for x, s, k in ((Bm, sb, 3.0), (Cm, sc, 3.0)):  # B and C really have outliers
        assert outlier_quant_ref(x, s, 4, 8, 5, k_sigma=k, std_correction=corr).outlier_mask.any()
    G = TemporalGroupQuant.num_groups(L, 4)
    hq = TemporalGroupQuant(bits=8, group=4, scale=torch.full((G,), 0.05), zero=torch.full((G,), 128.0))
    fq = lambda x, s, k: outlier_fake_quant(x, s, 4, 8, 5, k_sigma=k, std_correction=corr)  # noqa: E731
    ref = selective_scan_ref(u, fq(delta, sd, 4.0), A, fq(Bm, sb, 3.0), fq(Cm, sc, 3.0), Dskip, z, reverse=reverse,
                             h_quant=hq)
    got = _scan(emu, u, delta, A, Bm, Cm, Dskip, z, reverse=reverse, qs=qs, hq=hq)
    torch.testing.assert_close(got, ref, rtol=SCAN_RTOL, atol=SCAN_RTOL)


def test_scan_operands_with_their_own_windows(emu, cc):
    """Each quantized operand keeps its own n_refresh (window grid), as ouroActQuant_t allows."""
    B, L, D, S = 1, 23, 32, 16
    u, _, A, _, _, Dskip, z = _scan_inputs(B=B, L=L, D=D, S=S)
    delta = case(B, L, D, 1, seed=4, n_refresh=7, dtype=torch.float32).x * 0.5
    Bm = case(B, L, S, 1, seed=5, outlier_frac=0.13, n_refresh=3, dtype=torch.float32).x
    sd, sb = ((3.0 * x.std(dim=(0, 2)) / 7).contiguous() for x in (delta, Bm))
    qs = (ck._ActQuantC(bits=4, bits_outlier=8, n_refresh=7, policy=0, k_sigma=4.0, scale=sd.data_ptr()),
          ck._ActQuantC(bits=4, bits_outlier=16, n_refresh=3, policy=0, k_sigma=3.0, scale=sb.data_ptr()), None)
    ref = selective_scan_ref(u, outlier_fake_quant(delta, sd, 4, 8, 7, k_sigma=4.0), A,
                             outlier_fake_quant(Bm, sb, 4, 16, 3, k_sigma=3.0), Bm, Dskip, z)
    got = _scan(emu, u, delta, A, Bm, Bm, Dskip, z, reverse=False, qs=qs)
    torch.testing.assert_close(got, ref, rtol=SCAN_RTOL, atol=SCAN_RTOL)
