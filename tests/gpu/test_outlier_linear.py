"""ouroOutlierLinear vs outlier_linear_ref on a GPU: integer codes, masks and both accumulators bit-exact, y equal
to the reference's fp32 expression rounded once to y's dtype (fp16 outliers on the fused path: a named bound);
every path, epilogue and tactic the device offers; edge cases; bad launches.

Every case has rows without outliers (kernel_cases.make_linear_case: the first token of each window has no spike),
and those rows are asserted bit-equal to the reference's y whatever the outlier arithmetic."""
from __future__ import annotations

import ctypes

import pytest
import torch
from kernel_cases import (BATCHES, L_VIM, VIM_KN, VIM_X_PROJ_KN, LinearCase, linear_ref, make_linear_case)

from ouro.calib.quantizers import ThresholdPolicy
from ouro.exporter import cuda_kernels as ck

F16_OUTLIER_TERM_REL = 2.0 ** -14
"""Fused path with fp16 outliers: the outlier term comes from fp16 tensor cores with fp32 accumulation, whose
internal rounding is not IEEE round-to-nearest on every GPU (products are aligned and truncated inside the MMA),
vs the reference's float64 sum. Each product is exact; 64 products per union chunk: 2**-14 of the term's absolute
sum covers 64 truncations at 2**-22 with margin. (The CPU emulation, which rounds to nearest, uses 2**-16.)"""


def _run(c: LinearCase, **kw) -> ck.OutlierLinearResult:
    return ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=c.w_bits, bias=c.bias, debug=True, **kw)


def _assert_matches(c: LinearCase, res: ck.OutlierLinearResult, ref=None):
    ref = ref or linear_ref(c)
    assert torch.equal(res.outlier_mask, ref.outlier_mask), "outlier masks differ"
    assert torch.equal(res.inlier_codes, ref.inlier_codes), "inlier codes differ"
    assert torch.equal(res.acc_inlier.long(), ref.acc_in), "inlier accumulators differ"
    y = res.y
    clean = ~ref.outlier_mask.any(-1)  # (B, L) rows without outliers
    assert clean.any(), "the case must have rows without outliers"
    assert torch.equal(y[clean], ref.y.to(y.dtype)[clean]), "rows without outliers differ from the reference"
    if c.bits_outlier < 16:
        assert torch.equal(res.acc_outlier.long(), ref.acc_out), "outlier accumulators differ"
        assert torch.equal(y, ref.y.to(y.dtype)), "y differs from the reference"
    elif res.epilogue == "separate":
        assert torch.equal(y, ref.y.to(y.dtype))
    else:
        ulp = 2.0 ** -11 if y.dtype == torch.float16 else 2.0 ** -24
        bound = F16_OUTLIER_TERM_REL * (ref.y - ref.y_inlier).abs() + ulp * ref.y.abs() + 2.0 ** -24
        err = (y.float() - ref.y).abs()
        assert bool((err <= bound).all()), f"fused y off by {float(err.max()):.3g}"
    return ref


def _device_paths() -> list[ck.GemmPath]:
    cc = torch.cuda.get_device_capability()
    paths = [ck.GemmPath.S8_TENSORCORE, ck.GemmPath.SIMT_FALLBACK]
    if cc in ((8, 0), (8, 6), (8, 7), (8, 9)):
        paths.append(ck.GemmPath.SM80_S4_TENSORCORE)
    return paths


def _s4_device() -> bool:
    return torch.cuda.get_device_capability() in ((8, 0), (8, 6), (8, 7), (8, 9))


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("K,N", VIM_KN + VIM_X_PROJ_KN)
def test_vim_shapes_w4a4(B, K, N):
    """The default call (fused epilogue, automatic tile) at every Vim linear shape."""
    c = make_linear_case(B, L_VIM, K, N, seed=K + N + B).to("cuda")
    res = _run(c)
    assert res.epilogue == "fused" and res.tactic in ck.tactic_names()
    ref = _assert_matches(c, res)
    assert ref.outlier_rate > 0 and ref.outlier_mask.any(-1).any()
    expected = "sm80_s4_tensorcore" if _s4_device() else "s8_tensorcore"
    assert res.path == expected == ck.last_gemm_path()


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("K,N", VIM_KN[:2])
def test_separate_epilogue_vim_t(B, K, N):
    c = make_linear_case(B, L_VIM, K, N, seed=K + N + B).to("cuda")
    res = _run(c, epilogue="separate")
    assert res.epilogue == "separate" and res.tactic is None
    _assert_matches(c, res)


def test_every_tactic_and_path():
    c = make_linear_case(2, L_VIM, 384, 200, seed=3).to("cuda")
    ref = linear_ref(c)
    for t in ck.tactic_names():
        res = _run(c, tactic=t)
        assert res.tactic == t
        _assert_matches(c, res, ref)
    for path in _device_paths():
        for epi in ("auto", "separate"):
            res = _run(c, path=path, epilogue=epi)
            assert res.path == path.label
            _assert_matches(c, res, ref)


@pytest.mark.parametrize("K,N", [(384, 1536), (1536, 768)])
@pytest.mark.parametrize("bo", [8, 16])
def test_w8a8_and_fp16_outliers(K, N, bo):
    c = make_linear_case(2, L_VIM, K, N, w_bits=8, act_bits=8, bits_outlier=bo, seed=bo).to("cuda")
    for epi in ("fused", "separate"):
        _assert_matches(c, _run(c, epilogue=epi))


@pytest.mark.parametrize("corr", [0, 1])
def test_std_correction(corr):
    c = make_linear_case(2, 61, 32, 48, outlier_frac=0.0, n_refresh=4, seed=11, w_bits=8, k_sigma=1.5,
                         scale_mult=0.3, std_correction=corr).to("cuda")
    other = linear_ref(LinearCase(**{**c.__dict__, "std_correction": 1 - corr}))
    ref = linear_ref(c)
    assert not torch.equal(ref.outlier_mask, other.outlier_mask)  # the correction matters on this data
    for epi in ("fused", "separate"):
        res = _run(c, epilogue=epi)
        assert torch.equal(res.outlier_mask, ref.outlier_mask)
        assert torch.equal(res.y, ref.y.to(res.y.dtype))


@pytest.mark.parametrize(
    "name, kw",
    [
        ("M=1", dict(B=1, L=1, K=384, N=384)),
        ("L%n_refresh!=0", dict(B=3, L=13, K=256, N=128, n_refresh=5)),
        ("n_refresh>L", dict(B=2, L=7, K=128, N=64, n_refresh=50)),
        ("K%64 (48), w8", dict(B=2, L=33, K=48, N=64, w_bits=8)),
        ("K%16!=0 (200): SIMT", dict(B=2, L=33, K=200, N=96)),
        ("dt_proj K=12", dict(B=2, L=L_VIM, K=12, N=384, w_bits=8)),
        ("N%8!=0", dict(B=1, L=17, K=64, N=30)),
        ("fp32 x", dict(B=2, L=19, K=128, N=64, dtype=torch.float32)),
        ("no bias", dict(B=1, L=19, K=128, N=64, bias=False)),
        ("3-bit inliers", dict(B=1, L=19, K=128, N=64, act_bits=3, w_bits=8)),
        ("union > 64", dict(B=1, L=40, K=256, N=72, n_refresh=20, outlier_frac=0.45, scale_mult=0.2)),
    ],
)
def test_edge_cases(name, kw):
    args = dict(kw)
    c = make_linear_case(args.pop("B"), args.pop("L"), args.pop("K"), args.pop("N"), seed=7, **args).to("cuda")
    if name == "union > 64":
        c.policy, c.theta = ThresholdPolicy.CALIBRATED, torch.full((c.x.shape[1],), 4.0, device="cuda")
    _assert_matches(c, _run(c))


def test_zero_and_all_outliers():
    c = make_linear_case(2, L_VIM, 384, 192, scale_mult=100.0).to("cuda")  # nothing ever triggers
    ref = linear_ref(c)
    for epi in ("fused", "separate"):
        res = _run(c, epilogue=epi)
        assert not ref.outlier_mask.any() and not res.acc_outlier.any()
        assert torch.equal(res.y, ref.y.half()) and torch.equal(res.acc_inlier.long(), ref.acc_in)
    c = make_linear_case(2, 23, 128, 64, scale_mult=1e-3).to("cuda")
    c.policy, c.theta = ThresholdPolicy.CALIBRATED, torch.full((23,), -1.0, device="cuda")  # every |x| > theta
    ref = linear_ref(c)
    res = _run(c)
    assert ref.outlier_mask.all() and not res.inlier_codes.any()
    assert torch.equal(res.acc_outlier.long(), ref.acc_out) and torch.equal(res.y, ref.y.half())


def test_calibrated_policy():
    c = make_linear_case(2, L_VIM, 384, 192).to("cuda")
    c.policy, c.theta = ThresholdPolicy.CALIBRATED, (c.x.float().abs().amax(dim=(0, 2)) * 0.5).contiguous()
    _assert_matches(c, _run(c))


@pytest.mark.parametrize("epilogue", ["fused", "separate"])
def test_outlier_capacity_exceeded_is_an_error(epilogue):
    c = make_linear_case(2, L_VIM, 384, 192, outlier_frac=0.05).to("cuda")
    with pytest.raises(ck.KernelError, match="max_outliers=1") as e:
        ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=c.w_bits, max_outliers=1, epilogue=epilogue)
    assert e.value.status is ck.Status.OUTLIER_CAPACITY


def test_capacity_just_enough():
    c = make_linear_case(2, L_VIM, 384, 192, outlier_frac=0.03).to("cuda")
    ref = linear_ref(c)
    cap = int(ref.outlier_mask.reshape(2, -1, 384).any(1).sum(-1).max())  # channels flagged anywhere in an image
    _assert_matches(c, _run(c, max_outliers=cap), ref)


def test_bad_launches_name_the_sizes():
    c = make_linear_case(1, 17, 64, 32).to("cuda")
    with pytest.raises(ValueError, match=r"x must have shape|aligned"):
        xs = torch.empty(17 * 64 + 1, dtype=torch.float16, device="cuda")[1:].view(1, 17, 64)
        ck.outlier_linear(xs, c.w, c.w_scale, c.act(), w_bits=4)
    with pytest.raises(ck.KernelError, match=r"K=40") as e:
        c2 = make_linear_case(1, 17, 40, 32).to("cuda")
        ck.outlier_linear(c2.x, c2.w, c2.w_scale, c2.act(), w_bits=4, epilogue="fused")
    assert e.value.status is ck.Status.UNSUPPORTED_SHAPE
    with pytest.raises(ck.KernelError, match="wgmma") as e:
        ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=4, path="sm90_wgmma")
    assert e.value.status is ck.Status.NOT_IMPLEMENTED
    # the C library itself rejects a misaligned pointer (bypassing the Python checks)
    lib = ck.load_library()
    act = c.act().to_c(17, "act")
    ws = torch.empty(ck.workspace_size(17, 17, 64, 32, 4, c.act(), 64, "separate"), dtype=torch.uint8, device="cuda")
    y = torch.empty(1, 17, 32, dtype=torch.float16, device="cuda")
    p = ck._LinearParamsC(M=17, L=17, K=64, N=32, x=c.x.data_ptr() + 2, w=c.w.data_ptr(), w_bits=4,
                          w_scale=c.w_scale.data_ptr(), act=act, max_outliers=64, y=y.data_ptr(),
                          workspace=ws.data_ptr(), workspace_size=ws.numel())
    ran = ctypes.c_int(0)
    assert lib.ouroOutlierLinearWithPath(ctypes.byref(p), 0, None, ctypes.byref(ran)) == ck.Status.MISALIGNED


def test_profiled_reports_the_kernels_that_ran():
    c = make_linear_case(2, L_VIM, 384, 768).to("cuda")
    ref = linear_ref(c)
    for epilogue in ("fused", "separate"):
        res = ck.outlier_linear_profiled(c.x, c.w, c.w_scale, c.act(), w_bits=4, bias=c.bias, epilogue=epilogue)
        assert res.epilogue == epilogue
        assert len(res.step_ms) == len(ck.STEP_NAMES) and all(t >= 0 for t in res.step_ms)
        ran = [i for i, t in enumerate(res.step_ms) if t > 0]
        assert ran == ([0, 2] if epilogue == "fused" else [0, 1, 2, 3, 4])
        assert torch.equal(res.y, ref.y.half())


def test_launcher_matches_the_reference():
    """The asynchronous launcher (what benchmarks time) against an independent result: the reference, not
    another call of the same kernel; repeated launches on one workspace and a CUDA graph replay agree too."""
    c = make_linear_case(2, L_VIM, 384, 192, seed=11).to("cuda")
    want = linear_ref(c).y.half()
    launch, res = ck.outlier_linear_launcher(c.x, c.w, c.w_scale, c.act(), w_bits=4, bias=c.bias)
    launch()
    torch.cuda.synchronize()
    assert torch.equal(res.y, want)
    res.y.zero_()
    launch()
    launch()
    torch.cuda.synchronize()
    assert torch.equal(res.y, want)
    res.y.zero_()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        launch()  # warm-up on the capture stream
        s.synchronize()
        res.y.zero_()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            launch()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(res.y, want)
