"""Selective scan (Mamba-1 S6): the sequential reference, a chunked fast CPU path, mamba-ssm on GPU.

Shape notation (token-major, as everywhere in ouro):
    u, delta, z : (B, L, D)      D = d_inner
    A           : (D, S)         S = d_state, A = -exp(A_log) < 0
    Bm, Cm      : (B, L, S)
    Dskip       : (D,)
Recurrence (t in scan order; reverse=True runs t = L-1 .. 0 without flipped copies):
    dt_t  = softplus(delta_t) if delta_softplus else delta_t
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * Bm_t * u_t          (fp32 state, h_{-1} = 0)
    y_t   = Cm_t . h_t + Dskip * u_t
    out_t = y_t * silu(z_t)
`selective_scan_ref` is the numerical specification (the CUDA kernel and the onnxruntime op follow
it); `selective_scan_chunked` (the fast CPU path, with its own fast backward) must match it to fp32
tolerance.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .quantizers import fake_quant_asym

__all__ = [
    "ScanInputs",
    "TemporalGroupQuant",
    "ScanStates",
    "selective_scan_ref",
    "selective_scan_chunked",
    "selective_scan",
    "mamba_ssm_available",
]

HQuantFn = Callable[[Tensor, int], Tensor]
"""h-quantizer hook: (h_t of shape (B, D, S), step index i in scan order) -> fake-quantized h_t."""


@dataclass
class TemporalGroupQuant:
    """TGQ (QMamba): asymmetric fake quantization of h with one (scale, zero) per group of `group`
    consecutive scan steps; step i uses group i // group (the last group may be shorter).

        h_hat = s_g * (clamp(round(h / s_g) + z_g, 0, 2**bits - 1) - z_g)
    """

    bits: int
    group: int
    scale: Tensor  # (G,)
    zero: Tensor  # (G,)

    def __post_init__(self) -> None:
        if self.group < 1:
            raise ValueError(f"TGQ group length must be >= 1, got {self.group}")
        if self.scale.shape != self.zero.shape or self.scale.dim() != 1:
            raise ValueError("TGQ scale and zero must be 1-D tensors of the same length (one per group)")

    @staticmethod
    def num_groups(L: int, group: int) -> int:
        return -(-L // group)

    def __call__(self, h: Tensor, step: int) -> Tensor:
        g = step // self.group
        return fake_quant_asym(h, self.scale[g], self.zero[g], self.bits)


class ScanInputs(NamedTuple):
    """The operands of one selective scan, token-major (shape legend above). `delta` is
    pre-softplus with any dt bias already added; the field order is `selective_scan`'s argument
    order, so `selective_scan(*inputs, reverse=...)` runs it. Replace operands with `_replace`."""

    u: Tensor
    delta: Tensor
    A: Tensor
    Bm: Tensor
    Cm: Tensor
    Dskip: Tensor | None = None
    z: Tensor | None = None


@dataclass
class ScanStates:
    """Per-step internals exposed for OuroMamba-Gen: h (B, L, D, S) and dt (B, L, D), in token order."""

    h: Tensor
    dt: Tensor


def _prep(delta: Tensor, delta_softplus: bool) -> Tensor:
    d = delta.float()
    return F.softplus(d) if delta_softplus else d


def _finish(y: Tensor, u: Tensor, Dskip: Tensor | None, z: Tensor | None) -> Tensor:
    if Dskip is not None:
        y = y + u.float() * Dskip.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    Dskip: Tensor | None = None,
    z: Tensor | None = None,
    *,
    delta_softplus: bool = True,
    reverse: bool = False,
    h_quant: HQuantFn | None = None,
    abar_quant: Callable[[Tensor], Tensor] | None = None,
    return_states: bool = False,
) -> Tensor | tuple[Tensor, ScanStates]:
    """Plain sequential recurrence (module docstring). fp32 throughout; returns fp32 (B, L, D).

    h_quant: fake-quantizes the state after each step, inside the recurrence (QMamba TGQ).
    abar_quant: fake-quantizes exp(dt * A) (QMamba LtSQ), shape (B, L, D, S).
    return_states: also return ScanStates (h for every step, differentiable), for OuroMamba-Gen."""
    Bsz, L, D = u.shape
    uf = u.float()
    dt = _prep(delta, delta_softplus)
    Af = A.float()
    dA = torch.exp(dt.unsqueeze(-1) * Af)  # (B, L, D, S)
    if abar_quant is not None:
        dA = abar_quant(dA)
    dBu = dt.unsqueeze(-1) * Bm.float().unsqueeze(2) * uf.unsqueeze(-1)  # (B, L, D, S)
    Cf = Cm.float()
    h = uf.new_zeros(Bsz, D, A.shape[1])
    ys: list[Tensor] = [None] * L  # type: ignore[list-item]
    hs: list[Tensor] = [None] * L  # type: ignore[list-item]
    order = range(L - 1, -1, -1) if reverse else range(L)
    for i, t in enumerate(order):
        h = dA[:, t] * h + dBu[:, t]
        if h_quant is not None:
            h = h_quant(h, i)
        ys[t] = torch.einsum("bds,bs->bd", h, Cf[:, t])
        if return_states:
            hs[t] = h
    y = _finish(torch.stack(ys, dim=1), u, Dskip, z)
    if return_states:
        return y, ScanStates(h=torch.stack(hs, dim=1), dt=dt)
    return y


CHUNK_ELEMS = 1 << 20
"""Elements of one (B, T, D, S) chunk table of the fast CPU scan (4 MiB in fp32, so a chunk's
tables stay in cache): T = CHUNK_ELEMS // (B*D*S), clamped to [1, MAX_CHUNK]. tools/bench_scan.py
measures it; T between 4 and 32 is within noise at Vim-S shapes on 2 cores."""
MAX_CHUNK = 16


def _chunk_len(Bsz: int, L: int, D: int, S: int, chunk: int | None) -> int:
    T = chunk if chunk is not None else min(MAX_CHUNK, CHUNK_ELEMS // max(1, Bsz * D * S))
    return max(1, min(T, L))


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, Dskip: Tensor | None, z: Tensor | None) -> None:
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"selective scan expects u (B, L, D) and A (D, S); got u {tuple(u.shape)}, A {tuple(A.shape)}")
    Bsz, L, D = u.shape
    S = A.shape[1]
    want = {"delta": (Bsz, L, D), "A": (D, S), "Bm": (Bsz, L, S), "Cm": (Bsz, L, S), "Dskip": (D,), "z": (Bsz, L, D)}
    got = {"delta": delta, "A": A, "Bm": Bm, "Cm": Cm, "Dskip": Dskip, "z": z}
    bad = [f"{k} {tuple(t.shape)} (expected {want[k]})" for k, t in got.items() if t is not None and tuple(t.shape) != want[k]]
    if bad:
        raise ValueError(f"selective scan shape mismatch for u {tuple(u.shape)}: " + ", ".join(bad))


def _tables(dt: Tensor, dtu: Tensor, u: Tensor, A: Tensor, Bm: Tensor, c0: int, c1: int, dA: Tensor, x: Tensor, exact: bool) -> None:
    """Fill the chunk tables dA = exp(dt*A) and x = dt*B*u, each (B, c1-c0, D, S), in place.
    exact: the reference's rounding order (dt*B)*u, so that h matches it bit for bit."""
    torch.mul(dt[:, c0:c1, :, None], A, out=dA).exp_()
    if exact:
        torch.mul(dt[:, c0:c1, :, None], Bm[:, c0:c1, None, :], out=x).mul_(u[:, c0:c1, :, None])
    else:
        torch.mul(dtu[:, c0:c1, :, None], Bm[:, c0:c1, None, :], out=x)


def _steps(dA: Tensor, x: Tensor, hb: Tensor, h: Tensor, c0: int, h_quant: HQuantFn | None, exact: bool) -> Tensor:
    """The recurrence h_t = dA_t * h_{t-1} + x_t over one chunk, writing every h_t into hb."""
    for i in range(hb.shape[1]):
        hi = hb[:, i]
        if exact:
            torch.mul(dA[:, i], h, out=hi).add_(x[:, i])
        else:
            torch.addcmul(x[:, i], dA[:, i], h, out=hi)
        if h_quant is not None:
            hi.copy_(h_quant(hi, c0 + i))
        h = hi
    return h


def _scan_fwd(dt: Tensor, dtu: Tensor, u: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, T: int,
              h_quant: HQuantFn | None = None, keep_starts: bool = False) -> tuple[Tensor, list[Tensor]]:
    """yc_t = C_t . h_t for every t (forward scan order), and the state entering each chunk."""
    Bsz, L, D = dt.shape
    S = A.shape[1]
    exact = h_quant is not None
    yc = dt.new_empty(Bsz, L, D)
    dA_b, x_b, h_b = (dt.new_empty(Bsz, T, D, S) for _ in range(3))
    h = dt.new_zeros(Bsz, D, S)
    starts: list[Tensor] = []
    for c0 in range(0, L, T):
        c1 = min(L, c0 + T)
        n = c1 - c0
        if keep_starts:
            starts.append(h.clone())
        _tables(dt, dtu, u, A, Bm, c0, c1, dA_b[:, :n], x_b[:, :n], exact)
        h = _steps(dA_b[:, :n], x_b[:, :n], h_b[:, :n], h, c0, h_quant, exact)
        yc[:, c0:c1] = torch.matmul(h_b[:, :n], Cm[:, c0:c1, :, None]).squeeze(-1)
    return yc, starts


def _scan_bwd(gy: Tensor, dt: Tensor, dtu: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, starts: list[Tensor], T: int):
    """Gradients of sum(gy * yc) w.r.t. dtu, dt (through exp(dt*A) only), A, Bm, Cm.

    Chunks are visited last to first; each recomputes its states from the saved chunk start, then
    runs the adjoint recurrence dh_t = gy_t*C_t + dA_{t+1} * dh_{t+1} backwards through it:
        dC_t = sum_d gy_t h_t,  d(dt u)_t = sum_s dh_t B_t,  dB_t = sum_d dh_t (dt u)_t,
        q_t = dA_t * dh_t * h_{t-1}:  d dt_t = sum_s q_t A,  dA = sum_{b,t} q_t dt_t."""
    Bsz, L, D = dt.shape
    S = A.shape[1]
    d_dtu, d_dt = torch.empty_like(dt), torch.empty_like(dt)
    dB, dC = torch.empty_like(Bm), torch.empty_like(Cm)
    gA = torch.zeros_like(A)
    dA_b, x_b, h_b, g_b = (dt.new_empty(Bsz, T, D, S) for _ in range(4))
    carry = dt.new_zeros(Bsz, D, S)  # dA_{t+1} * dh_{t+1}
    for k in range(len(starts) - 1, -1, -1):
        c0, c1 = k * T, min(L, (k + 1) * T)
        n = c1 - c0
        dA, x, hb, dh = dA_b[:, :n], x_b[:, :n], h_b[:, :n], g_b[:, :n]
        _tables(dt, dtu, dtu, A, Bm, c0, c1, dA, x, False)
        _steps(dA, x, hb, starts[k], c0, None, False)
        dC[:, c0:c1] = torch.matmul(gy[:, c0:c1, None, :], hb).squeeze(-2)
        torch.mul(gy[:, c0:c1, :, None], Cm[:, c0:c1, None, :], out=dh)
        for i in range(n - 1, -1, -1):
            dh[:, i].add_(carry)
            carry = torch.mul(dA[:, i], dh[:, i], out=x[:, i])  # x is free once the states exist
        carry = carry.clone()
        q = x  # q_t = dA_t * dh_t * h_{t-1}
        q[:, 1:].mul_(hb[:, : n - 1])
        q[:, 0].mul_(starts[k])
        d_dtu[:, c0:c1] = torch.matmul(dh, Bm[:, c0:c1, :, None]).squeeze(-1)
        dB[:, c0:c1] = torch.matmul(dtu[:, c0:c1, None, :], dh).squeeze(-2)
        d_dt[:, c0:c1] = torch.mul(q, A, out=dh).sum(-1)
        gA += torch.mul(q, dt[:, c0:c1, :, None], out=dh).sum((0, 1))
    return d_dtu, d_dt, gA, dB, dC


class _ChunkedScan(torch.autograd.Function):
    """Forward and backward of the fast CPU scan (forward scan order; reverse is done by flips)."""

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, Dskip, z, delta_softplus: bool, chunk: int | None):
        uf, df, Af, Bf, Cf = (t.float().contiguous() for t in (u, delta, A, Bm, Cm))
        T = _chunk_len(uf.shape[0], uf.shape[1], uf.shape[2], Af.shape[1], chunk)
        dt = F.softplus(df) if delta_softplus else df
        dtu = dt * uf
        yc, starts = _scan_fwd(dt, dtu, uf, Af, Bf, Cf, T, keep_starts=any(ctx.needs_input_grad))
        ctx.delta_softplus, ctx.T = delta_softplus, T
        ctx.save_for_backward(u, delta, A, Bm, Cm, Dskip, z, yc, *starts)
        return _finish(yc, uf, Dskip, z)

    @staticmethod
    def backward(ctx, g):
        u, delta, A, Bm, Cm, Dskip, z, yc, *starts = ctx.saved_tensors
        uf, df, Af, Bf, Cf = (t.float().contiguous() for t in (u, delta, A, Bm, Cm))
        dt = F.softplus(df) if ctx.delta_softplus else df
        dtu = dt * uf
        gy, dz, dD = g.float(), None, None
        if z is not None:
            zf = z.float()
            sz = torch.sigmoid(zf)
            y = yc if Dskip is None else yc + uf * Dskip.float()
            dz = (gy * y * sz * (1 + zf * (1 - sz))).to(z.dtype)
            gy = gy * zf * sz
        d_dtu, d_dt, gA, dB, dC = _scan_bwd(gy.contiguous(), dt, dtu, Af, Bf, Cf, starts, ctx.T)
        du = d_dtu * dt
        if Dskip is not None:
            dD = (gy * uf).sum((0, 1)).to(Dskip.dtype)
            du = du + gy * Dskip.float()
        d_dt = d_dt + d_dtu * uf
        if ctx.delta_softplus:
            d_dt = d_dt * torch.sigmoid(df)
        return (du.to(u.dtype), d_dt.to(delta.dtype), gA.to(A.dtype), dB.to(Bm.dtype), dC.to(Cm.dtype),
                dD, dz, None, None)


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    Dskip: Tensor | None = None,
    z: Tensor | None = None,
    *,
    delta_softplus: bool = True,
    reverse: bool = False,
    h_quant: HQuantFn | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Fast CPU scan, same contract as `selective_scan_ref` (fp32 (B, L, D) out), with a fast backward.

    The sequence is cut into chunks of T tokens (`chunk`, default from CHUNK_ELEMS). For each chunk
    the tables exp(dt*A) and dt*B*u, (B, T, D, S), are built with a few vectorised ops while they
    fit in cache; the recurrence then steps through them with one fused in-place op per token, and
    C is contracted with the chunk's states in one batched matmul. Everything stays float32 and is
    the reference's own recurrence, so it is stable for any dt*A (no exp(-cumsum) rescaling).
    The backward pass (a custom autograd.Function) recomputes each chunk's states from the state
    saved at the chunk start and runs the adjoint recurrence through it.

    h_quant (TGQ hook, inference only): applied after each step exactly as in the reference, with
    the reference's rounding order, so h matches it bit for bit; with gradients required the
    reference itself runs (the hook's own STE defines the gradient).
    Measured against the reference in tools/bench_scan.py; tests/unit/test_scan.py checks it."""
    _check_shapes(u, delta, A, Bm, Cm, Dskip, z)
    if h_quant is not None and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, Bm, Cm, Dskip, z)
    ):
        return selective_scan_ref(u, delta, A, Bm, Cm, Dskip, z, delta_softplus=delta_softplus, reverse=reverse, h_quant=h_quant)
    if reverse:
        u, delta, Bm, Cm = u.flip(1), delta.flip(1), Bm.flip(1), Cm.flip(1)
        z = None if z is None else z.flip(1)
    if h_quant is None:
        out = _ChunkedScan.apply(u, delta, A, Bm, Cm, Dskip, z, delta_softplus, chunk)
    else:
        with torch.no_grad():
            uf = u.float()
            dt = _prep(delta, delta_softplus)
            T = _chunk_len(uf.shape[0], uf.shape[1], uf.shape[2], A.shape[1], chunk)
            yc, _ = _scan_fwd(dt, dt * uf, uf, A.float(), Bm.float().contiguous(), Cm.float().contiguous(), T, h_quant=h_quant)
            out = _finish(yc, u, Dskip, z)
    return out.flip(1) if reverse else out


def mamba_ssm_available() -> bool:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # ImportError, or its CUDA extension failing to load
        return False
    return torch.cuda.is_available()


def _selective_scan_mamba(u, delta, A, Bm, Cm, Dskip, z, delta_softplus, reverse):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    def bdl(t):
        return None if t is None else (t.flip(1) if reverse else t).transpose(1, 2).contiguous()

    out = selective_scan_fn(
        bdl(u), bdl(delta), A.float().contiguous(), bdl(Bm), bdl(Cm),
        None if Dskip is None else Dskip.float(), bdl(z), None, delta_softplus,
    )
    out = out.transpose(1, 2)
    return out.flip(1) if reverse else out


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    Dskip: Tensor | None = None,
    z: Tensor | None = None,
    *,
    delta_softplus: bool = True,
    reverse: bool = False,
    h_quant: HQuantFn | None = None,
) -> Tensor:
    """Dispatch: mamba-ssm's CUDA kernel for CUDA tensors when it imports (no h_quant hook there),
    else the chunked scan, which is faster than the reference at every shape measured (it is plain
    torch ops, so it also runs on any device). Returns (B, L, D) in fp32."""
    if u.is_cuda and h_quant is None and mamba_ssm_available():
        _check_shapes(u, delta, A, Bm, Cm, Dskip, z)
        return _selective_scan_mamba(u, delta, A, Bm, Cm, Dskip, z, delta_softplus, reverse).float()
    return selective_scan_chunked(u, delta, A, Bm, Cm, Dskip, z, delta_softplus=delta_softplus, reverse=reverse, h_quant=h_quant)
