"""Static initialisation helpers: the L_p clip grid search (ALGORITHMS.md §1.2).

For each group g (a token position, an output channel, or the whole tensor) with values x_g:
    clip_i = (1 - i/G) * max|x_g|,  i = 0 .. G-1
    s_i    = clip_i / qmax(bits)
    err_i  = sum |fq(x_g, s_i) - x_g|^p          (fq = restricted symmetric fake quant)
    s_g    = s_i with the smallest err_i (first one on ties); groups with max|x_g| = 0 get s = 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..quantizers import qmax

__all__ = ["lp_scale_search", "SCALE_EPS"]

SCALE_EPS = 1e-8
"""Smallest scale a learned scale is projected to (scales must stay > 0)."""


def lp_scale_search(xg: Tensor, bits: int, p: float = 2.4, grid: int = 100, chunk: int = 1 << 22) -> Tensor:
    """Best symmetric scale per row of `xg` (G, M) under the L_p error; returns (G,) fp32."""
    xg = xg.float()
    G, M = xg.shape
    q = qmax(bits)
    amax = xg.abs().amax(1)
    best_err = torch.full((G,), float("inf"))
    best = torch.where(amax > 0, amax / q, torch.ones_like(amax))
    for i in range(grid):
        clip = (1 - i / grid) * amax
        s = torch.where(clip > 0, clip / q, torch.ones_like(clip)).unsqueeze(1)
        err = torch.zeros(G)
        step = max(1, chunk // max(G, 1))
        for j in range(0, M, step):
            xs = xg[:, j : j + step]
            err += (torch.clamp(torch.round(xs / s), -q, q) * s - xs).abs().pow(p).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better & (amax > 0), s[:, 0], best)
    return best
