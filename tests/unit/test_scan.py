"""Fast chunked CPU scan vs the sequential reference (the specification), forward and backward."""
from __future__ import annotations

import pytest
import torch

from ouro.calib.scan import (
    TemporalGroupQuant,
    mamba_ssm_available,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
)

FWD_ATOL = 2e-5  # fp32: the two paths round the same recurrence in a different order
FWD_RTOL = 1e-5
GRAD_REL = 1e-4  # max |grad diff| / max |grad|, per input
NAMES = ("u", "delta", "A", "Bm", "Cm", "Dskip", "z")
# (B, L, D, S): L = 1, odd lengths, lengths around the chunk size, one Vim-like row
SHAPES = [(2, 1, 5, 3), (1, 2, 4, 16), (2, 7, 6, 4), (3, 33, 10, 16), (2, 17, 24, 16), (1, 197, 32, 16)]


def make(B: int, L: int, D: int, S: int, *, seed: int = 0, dt_shift: float = -1.0, grad: bool = False, with_d: bool = True,
         with_z: bool = True) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    t = dict(
        u=torch.randn(B, L, D, generator=g),
        delta=torch.randn(B, L, D, generator=g) + dt_shift,
        A=-torch.exp(torch.randn(D, S, generator=g) * 0.5 + 0.5),
        Bm=torch.randn(B, L, S, generator=g),
        Cm=torch.randn(B, L, S, generator=g),
        Dskip=torch.randn(D, generator=g) if with_d else None,
        z=torch.randn(B, L, D, generator=g) if with_z else None,
    )
    return {k: (v.requires_grad_(grad) if v is not None else None) for k, v in t.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_d,with_z", [(True, True), (False, False), (True, False), (False, True)])
def test_forward_matches_ref(shape, reverse, with_d, with_z):
    t = make(*shape, with_d=with_d, with_z=with_z)
    ref = selective_scan_ref(**t, reverse=reverse)
    for chunk in (None, 1, 4):
        out = selective_scan_chunked(**t, reverse=reverse, chunk=chunk)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=FWD_ATOL, rtol=FWD_RTOL)


@pytest.mark.parametrize("delta_softplus", [True, False])
def test_no_softplus(delta_softplus):
    t = make(2, 9, 8, 4)
    t["delta"] = t["delta"].abs()  # raw dt must be >= 0 without softplus
    ref = selective_scan_ref(**t, delta_softplus=delta_softplus)
    out = selective_scan_chunked(**t, delta_softplus=delta_softplus, chunk=4)
    torch.testing.assert_close(out, ref, atol=FWD_ATOL, rtol=FWD_RTOL)


def test_large_decay_is_stable():
    """dt*A far beyond fp32 exp range inside one chunk: no overflow, no NaN (no exp(-cumsum) tricks)."""
    t = make(2, 40, 8, 16, dt_shift=30.0)
    t["A"] = t["A"] * 20
    ref = selective_scan_ref(**t)
    out = selective_scan_chunked(**t, chunk=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=FWD_ATOL, rtol=FWD_RTOL)


def _grads(fn, t, g, **kw):
    y = fn(**t, **kw)
    leaves = [t[k] for k in NAMES if t[k] is not None]
    return y, torch.autograd.grad((y * g).sum(), leaves)


@pytest.mark.parametrize("shape", [(2, 1, 5, 3), (2, 7, 6, 4), (3, 33, 10, 16)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_dz", [True, False])
def test_backward_matches_ref(shape, reverse, with_dz):
    t = make(*shape, grad=True, with_d=with_dz, with_z=with_dz)
    g = torch.randn(shape[:3], generator=torch.Generator().manual_seed(1))
    _, g_ref = _grads(selective_scan_ref, t, g, reverse=reverse)
    for chunk in (None, 1, 4):
        _, g_fast = _grads(selective_scan_chunked, t, g, reverse=reverse, chunk=chunk)
        for name, a, b in zip([k for k in NAMES if t[k] is not None], g_ref, g_fast):
            err = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-6)
            assert err < GRAD_REL, f"grad of {name} (chunk {chunk}): relative error {err:.2e}"


def _tgq(L: int, group: int, bits: int = 4) -> TemporalGroupQuant:
    G = TemporalGroupQuant.num_groups(L, group)
    return TemporalGroupQuant(bits=bits, group=group, scale=torch.linspace(0.2, 0.4, G), zero=torch.full((G,), 8.0))


@pytest.mark.parametrize("reverse", [False, True])
def test_tgq_hook_matches_ref(reverse):
    """The h-quant hook runs inside the recurrence with the reference's step index and rounding order."""
    t = make(2, 21, 16, 16)
    tgq = _tgq(21, group=5)
    ref = selective_scan_ref(**t, reverse=reverse, h_quant=tgq)
    unquant = selective_scan_ref(**t, reverse=reverse)
    assert (ref - unquant).abs().max() > 1e-2  # the hook does change the result
    for chunk in (None, 3):
        out = selective_scan_chunked(**t, reverse=reverse, h_quant=tgq, chunk=chunk)
        torch.testing.assert_close(out, ref, atol=FWD_ATOL, rtol=FWD_RTOL)
    torch.testing.assert_close(selective_scan(**t, reverse=reverse, h_quant=tgq), ref, atol=FWD_ATOL, rtol=FWD_RTOL)


def test_tgq_hook_with_grad_uses_ref():
    t = make(1, 6, 4, 4, grad=True)
    tgq = _tgq(6, group=2, bits=8)
    g = torch.randn(1, 6, 4)
    y_ref, g_ref = _grads(selective_scan_ref, t, g, h_quant=tgq)
    y, g_fast = _grads(selective_scan_chunked, t, g, h_quant=tgq)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    for a, b in zip(g_ref, g_fast):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_dispatch_on_cpu_matches_ref():
    t = make(2, 33, 16, 8)
    for reverse in (False, True):
        torch.testing.assert_close(selective_scan(**t, reverse=reverse), selective_scan_ref(**t, reverse=reverse),
                                   atol=FWD_ATOL, rtol=FWD_RTOL)


def test_half_inputs_give_fp32():
    t = make(1, 5, 8, 4)
    th = {k: v.half() for k, v in t.items()}
    out = selective_scan_chunked(**th)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, selective_scan_ref(**th), atol=FWD_ATOL, rtol=FWD_RTOL)


def test_shape_mismatch_names_tensor():
    t = make(2, 5, 8, 4)
    t["Cm"] = t["Cm"][:, :4]
    with pytest.raises(ValueError, match=r"Cm \(2, 4, 4\) \(expected \(2, 5, 4\)\)"):
        selective_scan_chunked(**t)


@pytest.mark.gpu
@pytest.mark.skipif(not mamba_ssm_available(), reason="needs CUDA and mamba-ssm's selective_scan_cuda")
@pytest.mark.parametrize("reverse", [False, True])
def test_mamba_ssm_path_matches_ref(reverse):
    t = make(2, 197, 64, 16)
    ref = selective_scan_ref(**t, reverse=reverse)
    out = selective_scan(**{k: v.cuda() for k, v in t.items()}, reverse=reverse).cpu()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
