"""ouroOutlierFakeQuant vs outlier_fake_quant (bit-exact) and ouroSelectiveScan vs selective_scan_ref (both
std corrections, B and C with real outliers, fp16 and fp32 I/O)."""
from __future__ import annotations

import pytest
import torch
from kernel_cases import L_VIM, make_linear_case

from ouro.calib.quantizers import DELTA_K_SIGMA, outlier_fake_quant, outlier_quant_ref
from ouro.calib.scan import TemporalGroupQuant, selective_scan_ref
from ouro.exporter import cuda_kernels as ck

SCAN_FP32_RTOL = 1e-4
"""fp32 scan: expf/log1pf may differ from torch by an ulp; errors compound over L = 197 steps."""
SCAN_FP32_ATOL = 1e-5
SCAN_FP16_RTOL = 2e-3
"""fp16 I/O: one fp16 rounding of the output on top of the fp32 differences."""
SCAN_HQ_MISMATCH_FRAC = 0.01
"""TGQ: an ulp of difference can move a state across a rounding boundary (one h step); allow 1 % of outputs."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C, bits_outlier, corr", [(384, 8, 0), (768, 16, 1), (16, 8, 1)])
def test_fake_quant_bit_exact(dtype, C, bits_outlier, corr):
    c = make_linear_case(4, L_VIM, C, 8, bits_outlier=bits_outlier, dtype=dtype, seed=C, std_correction=corr).to("cuda")
    ref = outlier_fake_quant(c.x, c.scale, c.act_bits, bits_outlier, c.n_refresh, std_correction=corr)
    got = ck.outlier_fake_quant(c.x, c.act())
    assert got.dtype == dtype
    assert torch.equal(got, ref.to(dtype))


def _scan_inputs(B=2, L=L_VIM, D=384, S=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, L, D, generator=g)
    delta = torch.randn(B, L, D, generator=g) * 0.5 - 1.0
    A = -torch.exp(torch.rand(D, S, generator=g) * 2)
    Bm = torch.randn(B, L, S, generator=g)
    Cm = torch.randn(B, L, S, generator=g)
    Dskip = torch.randn(D, generator=g)
    z = torch.randn(B, L, D, generator=g)
    cast = lambda t: t.to(dtype).cuda()  # noqa: E731
    return cast(u), cast(delta), A.cuda(), cast(Bm), cast(Cm), Dskip.cuda(), cast(z)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B", [1, 32])
def test_scan_matches_ref(reverse, dtype, B):
    u, delta, A, Bm, Cm, Dskip, z = _scan_inputs(B=B, dtype=dtype)
    ref = selective_scan_ref(u, delta, A, Bm, Cm, Dskip, z, delta_softplus=True, reverse=reverse)
    got = ck.selective_scan(u, delta, A, Bm, Cm, Dskip, z, delta_softplus=True, reverse=reverse)
    rtol = SCAN_FP32_RTOL if dtype == torch.float32 else SCAN_FP16_RTOL
    torch.testing.assert_close(got.float(), ref, rtol=rtol, atol=rtol * float(ref.abs().max()) + SCAN_FP32_ATOL)


def test_scan_without_skip_gate_softplus_small_state():
    u, delta, A, Bm, Cm, _, _ = _scan_inputs(L=31, D=100, S=5)
    ref = selective_scan_ref(u, delta.abs(), A, Bm, Cm, None, None, delta_softplus=False)
    got = ck.selective_scan(u, delta.abs(), A, Bm, Cm, delta_softplus=False)
    torch.testing.assert_close(got, ref, rtol=SCAN_FP32_RTOL, atol=SCAN_FP32_ATOL)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("corr", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scan_with_quantized_operands(reverse, corr, dtype):
    """Delta, B and C fake-quantized inside the scan from the one-pass statistics; B and C (d_state wide) have real
    outliers (two spike channels of 16)."""
    B, L, D, S = 2, L_VIM, 384, 16
    u, _, A, _, _, Dskip, z = _scan_inputs(B=B, L=L, D=D, S=S, dtype=dtype)
    # operands with a clear margin around the outlier thresholds (see make_linear_case)
    delta = (make_linear_case(B, L, D, 1, seed=1, dtype=torch.float32).x * 0.5).to(dtype).cuda()
    Bm = make_linear_case(B, L, S, 1, seed=2, outlier_frac=0.13, dtype=dtype).x.cuda()
    Cm = make_linear_case(B, L, S, 1, seed=3, outlier_frac=0.13, dtype=dtype).x.cuda()

    def q(x, k):
        s = (3.0 * x.float().std(dim=(0, 2)) / 7).contiguous()
        return ck.ActQuant(4, 8, 10, s, k_sigma=k, std_correction=corr)

    dq, bq, cq = q(delta, DELTA_K_SIGMA), q(Bm, 3.0), q(Cm, 3.0)
    fq = lambda x, a: outlier_fake_quant(x, a.scale, a.bits, a.bits_outlier, a.n_refresh, k_sigma=a.k_sigma,  # noqa
                                         std_correction=corr)
    for x, a in ((Bm, bq), (Cm, cq)):
        assert outlier_quant_ref(x, a.scale, 4, 8, 10, k_sigma=a.k_sigma, std_correction=corr).outlier_mask.any()
    ref = selective_scan_ref(u, fq(delta, dq), A, fq(Bm, bq), fq(Cm, cq), Dskip, z, reverse=reverse)
    got = ck.selective_scan(u, delta, A, Bm, Cm, Dskip, z, reverse=reverse, delta_q=dq, b_q=bq, c_q=cq)
    rtol = SCAN_FP32_RTOL if dtype == torch.float32 else SCAN_FP16_RTOL
    torch.testing.assert_close(got.float(), ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


def test_scan_with_tgq_h_quant():
    B, L, D, S = 2, L_VIM, 128, 16
    u, delta, A, Bm, Cm, Dskip, z = _scan_inputs(B=B, L=L, D=D, S=S)
    G = TemporalGroupQuant.num_groups(L, 20)
    hq = TemporalGroupQuant(bits=8, group=20, scale=torch.full((G,), 0.02, device="cuda"),
                            zero=torch.full((G,), 128.0, device="cuda"))
    ref = selective_scan_ref(u, delta, A, Bm, Cm, Dskip, z, h_quant=hq)
    got = ck.selective_scan(u, delta, A, Bm, Cm, Dskip, z, h_quant=hq)
    close = torch.isclose(got, ref, rtol=SCAN_FP32_RTOL, atol=SCAN_FP32_RTOL * float(ref.abs().max()))
    assert float((~close).float().mean()) <= SCAN_HQ_MISMATCH_FRAC


def test_scan_rejects_large_state():
    u, delta, A, Bm, Cm, _, _ = _scan_inputs(L=5, D=32, S=16)
    A32 = torch.cat([A, A], dim=1)
    with pytest.raises(ValueError, match="S=32"):
        ck.selective_scan(u, delta, A32, Bm, Cm)
