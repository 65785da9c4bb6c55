"""Static initialisation helpers: the L_p clip grid search (ALGORITHMS.md §1.2).

For each group g (a token position, an output channel, or the whole tensor) with values x_g:
    clip_i = (1 - i/G) * max|x_g|,  i = 0 .. G-1
    s_i    = clip_i / qmax(bits)
    err_i  = sum |fq(x_g, s_i) - x_g|^p          (fq = restricted symmetric fake quant)
    s_g    = s_i with the smallest err_i (first one on ties); groups with max|x_g| = 0 get s = 1.
Search order (cost): every `coarse`-th candidate first, then every candidate within `coarse` of
each group's best coarse one. This equals the exhaustive search whenever err_i is unimodal in i
(the usual case); `coarse=1` is the exhaustive search of the official code.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..quantizers import qmax

__all__ = ["lp_scale_search", "SCALE_EPS", "COARSE_STRIDE"]

SCALE_EPS = 1e-8
"""Smallest scale a learned scale is projected to (scales must stay > 0)."""
COARSE_STRIDE = 5
"""Stride of the first pass of the clip search (see module docstring)."""


def _errors(xg: Tensor, amax: Tensor, idx: Tensor, grid: int, q: int, p: float) -> tuple[Tensor, Tensor]:
    """L_p error and scale of candidate idx[g, j] for every group g: (G, J) each."""
    clip = (1 - idx.float() / grid) * amax.unsqueeze(1)
    s = torch.where(clip > 0, clip / q, torch.ones_like(clip))
    err = torch.empty_like(s)
    for j in range(idx.shape[1]):
        sj = s[:, j : j + 1]
        err[:, j] = (torch.clamp(torch.round(xg / sj), -q, q) * sj - xg).abs().pow(p).sum(1)
    return err, s


def lp_scale_search(xg: Tensor, bits: int, p: float = 2.4, grid: int = 100, coarse: int = COARSE_STRIDE) -> Tensor:
    """Best symmetric scale per row of `xg` (G, M) under the L_p error; returns (G,) fp32."""
    xg = xg.float()
    G = xg.shape[0]
    q = qmax(bits)
    amax = xg.abs().amax(1)
    coarse = max(1, min(coarse, grid))
    idx = torch.arange(0, grid, coarse, device=xg.device).expand(G, -1)
    err, s = _errors(xg, amax, idx, grid, q, p)
    best_i = idx.gather(1, err.argmin(1, keepdim=True))  # (G, 1), first minimum
    if coarse > 1:
        off = torch.arange(-coarse + 1, coarse, device=xg.device)
        fine = (best_i + off).clamp(0, grid - 1)  # duplicates at the edges are harmless
        err, s = _errors(xg, amax, fine, grid, q, p)
        # first minimum in candidate order i (ties -> smaller i, i.e. larger clip, as exhaustive)
        key = err * 0 + fine.float()
        m = err.min(1, keepdim=True).values
        best = torch.where(err == m, key, torch.full_like(key, float("inf"))).argmin(1, keepdim=True)
        sel = s.gather(1, best)[:, 0]
    else:
        sel = s.gather(1, err.argmin(1, keepdim=True))[:, 0]
    return torch.where(amax > 0, sel, torch.ones_like(sel))
