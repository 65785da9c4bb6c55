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
it); `selective_scan_chunked` must match it to fp32 tolerance.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .quantizers import fake_quant_asym

__all__ = [
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


CHUNK = 8
"""Chunk length of the fast CPU scan (measured best on 2 cores at Vim-S shapes, tools/bench_scan.py)."""
_MAX_LOG_RANGE = 600.0  # float64 exp is finite below ~709


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
    chunk: int = CHUNK,
) -> Tensor:
    """Fast CPU scan: all chunks in parallel through cumulative sums of dt*A, then a short carry pass.

    Inside a chunk with cum_t = sum_{j<=t} dt_j*A (cumsum),
        h_t = exp(cum_t) * (h_start + sum_{s<=t} exp(-cum_s) * dt_s*B_s*u_s).
    The exponentials are taken in float64 relative to the chunk start; a chunk whose log-range
    would overflow float64 falls back to sequential steps (bit-for-bit the reference's recurrence).
    Matches `selective_scan_ref` to fp32 tolerance (tests/unit/test_scan.py)."""
    if reverse:
        out = selective_scan_chunked(
            u.flip(1), delta.flip(1), A, Bm.flip(1), Cm.flip(1), Dskip,
            None if z is None else z.flip(1), delta_softplus=delta_softplus, chunk=chunk,
        )
        return out.flip(1)
    Bsz, L, D = u.shape
    S = A.shape[1]
    T = max(1, min(chunk, L))
    nc = -(-L // T)
    pad = nc * T - L
    dt = _prep(delta, delta_softplus)
    dtp = F.pad(dt, (0, 0, 0, pad))  # padded steps: dt = 0 -> dA = 1, no input
    up = F.pad(u.float(), (0, 0, 0, pad))
    Bp = F.pad(Bm.float(), (0, 0, 0, pad))
    Cp = F.pad(Cm.float(), (0, 0, 0, pad))

    dtA = (dtp.unsqueeze(-1) * A.float()).double().reshape(Bsz, nc, T, D, S)  # <= 0
    cum = dtA.cumsum(dim=2)  # (B, nc, T, D, S)
    x = (dtp.unsqueeze(-1) * Bp.unsqueeze(2) * up.unsqueeze(-1)).double().reshape(Bsz, nc, T, D, S)
    safe = (-cum[:, :, -1]).amax(dim=(0, 2, 3)) < _MAX_LOG_RANGE  # (nc,)
    local = torch.exp(cum) * torch.cumsum(torch.exp(-cum) * x, dim=2)  # h_t with h_start = 0
    decay = torch.exp(cum)  # multiplier of h_start
    if not bool(safe.all()):
        for c in torch.nonzero(~safe).flatten().tolist():
            dA_c = torch.exp(dtA[:, c])
            h = torch.zeros_like(x[:, c, 0])
            loc, dec = [], []
            prod = torch.ones_like(h)
            for t in range(T):
                h = dA_c[:, t] * h + x[:, c, t]
                prod = prod * dA_c[:, t]
                loc.append(h)
                dec.append(prod)
            local[:, c] = torch.stack(loc, 1)
            decay[:, c] = torch.stack(dec, 1)
    # carry pass over chunks
    h_start = torch.zeros(Bsz, D, S, dtype=torch.float64, device=u.device)
    starts = []
    for c in range(nc):
        starts.append(h_start)
        h_start = decay[:, c, -1] * h_start + local[:, c, -1]
    hs = local + decay * torch.stack(starts, dim=1).unsqueeze(2)  # (B, nc, T, D, S)
    y = torch.einsum("bctds,bcts->bctd", hs.float(), Cp.reshape(Bsz, nc, T, S))
    y = y.reshape(Bsz, nc * T, D)[:, :L]
    return _finish(y, u, Dskip, z)


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
) -> Tensor:
    """Dispatch: mamba-ssm's CUDA kernel for CUDA tensors when it imports, the chunked scan on CPU
    (or wherever it is faster), the reference otherwise. Returns (B, L, D) in fp32."""
    if u.is_cuda and mamba_ssm_available():
        return _selective_scan_mamba(u, delta, A, Bm, Cm, Dskip, z, delta_softplus, reverse).float()
    if u.shape[1] >= 2 * CHUNK:
        return selective_scan_chunked(u, delta, A, Bm, Cm, Dskip, z, delta_softplus=delta_softplus, reverse=reverse)
    return selective_scan_ref(u, delta, A, Bm, Cm, Dskip, z, delta_softplus=delta_softplus, reverse=reverse)
