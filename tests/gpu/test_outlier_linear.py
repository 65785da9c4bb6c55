"""ouroOutlierLinear vs outlier_linear_ref: integer codes, masks and accumulators bit-exact,
outputs within named tolerances; every GEMM path the device offers; edge cases; bad launches."""
from __future__ import annotations

import ctypes

import pytest
import torch
from kernel_cases import BATCHES, L_VIM, VIM_KN, LinearCase, assert_fused_close, linear_ref, make_linear_case

from ouro.calib.quantizers import ThresholdPolicy
from ouro.exporter import cuda_kernels as ck

Y_FP16_RTOL = 2e-3
"""fp16 output vs the fp32 reference: one fp16 rounding (2**-11 relative) plus margin."""
Y_FP32_RTOL = 1e-6
"""fp32 output: the combine step reproduces the reference's fp32 expression, so ~exact."""


def _run(c: LinearCase, **kw) -> ck.OutlierLinearResult:
    return ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=c.w_bits, bias=c.bias, debug=True, **kw)


def _assert_matches(c: LinearCase, res: ck.OutlierLinearResult, ref=None):
    ref = ref or linear_ref(c)
    assert torch.equal(res.outlier_mask, ref.outlier_mask), "outlier masks differ"
    assert torch.equal(res.inlier_codes, ref.inlier_codes), "inlier codes differ"
    assert torch.equal(res.acc_inlier.long(), ref.acc_in), "inlier accumulators differ"
    if c.bits_outlier < 16:
        assert torch.equal(res.acc_outlier.long(), ref.acc_out), "outlier accumulators differ"
    rtol = Y_FP32_RTOL if res.y.dtype == torch.float32 else Y_FP16_RTOL
    atol = rtol * float(ref.y.abs().max().clamp_min(1e-6))
    torch.testing.assert_close(res.y.float(), ref.y, rtol=rtol, atol=atol)
    return ref


def _device_paths() -> list[ck.GemmPath]:
    major, minor = torch.cuda.get_device_capability()
    paths = [ck.GemmPath.S8_TENSORCORE, ck.GemmPath.SIMT_FALLBACK]
    if (major, minor) in ((8, 0), (8, 6)):
        paths.append(ck.GemmPath.SM80_S4_TENSORCORE)
    return paths


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("K,N", VIM_KN)
def test_vim_shapes_w4a4(B, K, N):
    c = make_linear_case(B, L_VIM, K, N, seed=K + N + B).to("cuda")
    res = _run(c)
    ref = _assert_matches(c, res)
    assert ref.outlier_rate > 0, "the case should contain outliers"
    major, minor = torch.cuda.get_device_capability()
    expected = "sm80_s4_tensorcore" if (major, minor) in ((8, 0), (8, 6)) else "s8_tensorcore"
    assert res.path == expected == ck.last_gemm_path()


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("K,N", VIM_KN)
def test_vim_shapes_fused_epilogue(B, K, N):
    """The default call (no debug buffers) runs the CUTLASS epilogue-visitor GEMM + fused outlier kernel."""
    c = make_linear_case(B, L_VIM, K, N, seed=K + N + B).to("cuda")
    res = ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=c.w_bits, bias=c.bias)
    assert res.epilogue == "fused"
    ref = linear_ref(c)
    assert_fused_close(res.y, ref)
    clean = ~ref.outlier_mask.any(-1)  # rows without outliers: half(inlier term + bias), bit for bit
    assert torch.equal(res.y[clean], ref.y_inlier.half()[clean])


@pytest.mark.parametrize("bits_outlier", [8, 16])
def test_fused_epilogue_w8a8_and_capacity(bits_outlier):
    c = make_linear_case(2, L_VIM, 768, 384, w_bits=8, act_bits=8, bits_outlier=bits_outlier, seed=5).to("cuda")
    res = ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=8, bias=c.bias, epilogue="fused")
    assert_fused_close(res.y, linear_ref(c))
    with pytest.raises(ck.KernelError, match="max_outliers=1") as e:
        ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=8, max_outliers=1, epilogue="fused")
    assert e.value.status is ck.Status.OUTLIER_CAPACITY


def test_fused_epilogue_refused_where_it_cannot_run():
    c = make_linear_case(1, 17, 64, 30).to("cuda")  # N % 8 != 0
    with pytest.raises(ck.KernelError, match=r"N % 8 == 0 \(N=30\)") as e:
        ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=4, epilogue="fused")
    assert e.value.status is ck.Status.UNSUPPORTED_SHAPE
    assert ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=4).epilogue == "separate"


@pytest.mark.parametrize("K,N", [(384, 1536), (1536, 768)])
def test_w8a8_and_fp16_outliers(K, N):
    for bo in (8, 16):
        c = make_linear_case(2, L_VIM, K, N, w_bits=8, act_bits=8, bits_outlier=bo, seed=bo).to("cuda")
        _assert_matches(c, _run(c))


def test_all_paths_agree():
    c = make_linear_case(2, L_VIM, 384, 768, seed=3).to("cuda")
    ref = linear_ref(c)
    for path in _device_paths():
        res = _run(c, path=path)
        assert res.path == path.label
        _assert_matches(c, res, ref)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("M=1", dict(B=1, L=1, K=384, N=384)),
        ("L%n_refresh!=0", dict(B=3, L=13, K=256, N=128, n_refresh=5)),
        ("n_refresh=1", dict(B=2, L=20, K=128, N=64, n_refresh=1)),
        ("n_refresh>L", dict(B=2, L=7, K=128, N=64, n_refresh=50)),
        ("K%tile (48)", dict(B=2, L=33, K=48, N=64)),
        ("K%16!=0 (200): SIMT", dict(B=2, L=33, K=200, N=96)),
        ("dt_proj K=12", dict(B=2, L=L_VIM, K=12, N=384, w_bits=8)),
        ("N%4!=0", dict(B=1, L=17, K=64, N=30)),
        ("fp32 x", dict(B=2, L=19, K=128, N=64, dtype=torch.float32)),
        ("no bias", dict(B=1, L=19, K=128, N=64, bias=False)),
        ("3-bit inliers", dict(B=1, L=19, K=128, N=64, act_bits=3, w_bits=8)),
    ],
)
def test_edge_cases(name, kw):
    args = dict(kw)
    c = make_linear_case(args.pop("B"), args.pop("L"), args.pop("K"), args.pop("N"), seed=7, **args).to("cuda")
    _assert_matches(c, _run(c))


def test_zero_outliers():
    c = make_linear_case(2, L_VIM, 384, 192, scale_mult=100.0).to("cuda")  # nothing ever triggers
    res = _run(c)
    ref = _assert_matches(c, res)
    assert not ref.outlier_mask.any() and not res.acc_outlier.any()


def test_all_channels_outliers():
    c = make_linear_case(2, 23, 128, 64, scale_mult=1e-3).to("cuda")
    c.policy, c.theta = ThresholdPolicy.CALIBRATED, torch.full((23,), -1.0, device="cuda")  # every |x| > theta
    res = _run(c)
    ref = _assert_matches(c, res)
    assert ref.outlier_mask.all() and not res.inlier_codes.any()


def test_calibrated_policy():
    c = make_linear_case(2, L_VIM, 384, 192).to("cuda")
    c.policy, c.theta = ThresholdPolicy.CALIBRATED, (c.x.float().abs().amax(dim=(0, 2)) * 0.5).contiguous()
    _assert_matches(c, _run(c))


def test_outlier_capacity_exceeded_is_an_error():
    c = make_linear_case(2, L_VIM, 384, 192, outlier_frac=0.05).to("cuda")
    with pytest.raises(ck.KernelError, match="max_outliers=1") as e:
        ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=c.w_bits, max_outliers=1)
    assert e.value.status is ck.Status.OUTLIER_CAPACITY


def test_capacity_just_enough():
    c = make_linear_case(2, L_VIM, 384, 192, outlier_frac=0.03).to("cuda")
    ref = linear_ref(c)
    per_window = ref.outlier_mask.reshape(2, -1, 384)  # upper bound: channels flagged anywhere in an image
    cap = int(per_window.any(1).sum(-1).max())
    _assert_matches(c, _run(c, max_outliers=cap), ref)


def test_bad_launches_name_the_sizes():
    c = make_linear_case(1, 17, 64, 32).to("cuda")
    with pytest.raises(ValueError, match=r"x must have shape|aligned"):
        xs = torch.empty(17 * 64 + 1, dtype=torch.float16, device="cuda")[1:].view(1, 17, 64)
        ck.outlier_linear(xs, c.w, c.w_scale, c.act(), w_bits=4)
    with pytest.raises(ck.KernelError, match=r"K=64, N=30") as e:
        c2 = make_linear_case(1, 17, 64, 30).to("cuda")
        ck.outlier_linear(c2.x, c2.w, c2.w_scale, c2.act(), w_bits=4, path="s8_tensorcore")
    assert e.value.status is ck.Status.UNSUPPORTED_SHAPE
    # the C library itself rejects a misaligned pointer (bypassing the Python checks)
    lib = ck.load_library()
    act = c.act().to_c(17, "act")
    ws = torch.empty(ck.workspace_size(17, 17, 64, 32, 4, c.act(), 64), dtype=torch.uint8, device="cuda")
    y = torch.empty(1, 17, 32, dtype=torch.float16, device="cuda")
    p = ck._LinearParamsC(M=17, L=17, K=64, N=32, x=c.x.data_ptr() + 2, w=c.w.data_ptr(), w_bits=4,
                          w_scale=c.w_scale.data_ptr(), act=act, max_outliers=64, y=y.data_ptr(),
                          workspace=ws.data_ptr(), workspace_size=ws.numel())
    ran = ctypes.c_int(0)
    st = lib.ouroOutlierLinearWithPath(ctypes.byref(p), 0, None, ctypes.byref(ran))
    assert st == ck.Status.MISALIGNED


def test_profiled_reports_five_steps():
    c = make_linear_case(2, L_VIM, 384, 768).to("cuda")
    for epilogue in ("fused", "separate"):
        res = ck.outlier_linear_profiled(c.x, c.w, c.w_scale, c.act(), w_bits=4, bias=c.bias, epilogue=epilogue)
        assert res.epilogue == epilogue
        assert len(res.step_ms) == len(ck.STEP_NAMES) and all(t >= 0 for t in res.step_ms)
        assert sum(res.step_ms) > 0
        assert (res.step_ms[4] == 0) == (epilogue == "fused")  # fused: nothing left for step 5
        assert_fused_close(res.y, linear_ref(c))


def test_launcher_matches_checked_call():
    c = make_linear_case(2, L_VIM, 384, 192, seed=11).to("cuda")
    want = ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=4, bias=c.bias).y
    launch, res = ck.outlier_linear_launcher(c.x, c.w, c.w_scale, c.act(), w_bits=4, bias=c.bias)
    launch()
    launch()  # repeated launches on the same workspace give the same result
    torch.cuda.synchronize()
    assert torch.equal(res.y, want)
