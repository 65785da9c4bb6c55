"""OuroMamba-Gen numerics: neighbourhood-enhanced state h_p, implicit attention, contrastive loss.

Shape notation (token-major, as in ouro.calib.scan):
    B batch, L tokens = P patches (a G x G grid, row-major) + 1 CLS token at `cls_position`,
    D = d_inner, S = d_state, T = rows of an attention matrix.
    dt (B, L, D) = softplus(delta);  A (D, S) < 0;  Bm, Cm (B, L, S);  h (B, L, D, S).

Implicit attention of one scan direction (Ali et al., arXiv 2403.01590), per channel d:
    alpha[d, t, s] = sum_n Cm_t[n] * prod_{j in steps(s, t]} exp(dt_j[d] A[d, n]) * dt_s[d] Bm_s[n]
for s at or before t in scan order (s <= t forward, s >= t for the reverse scan), so that
y_t[d] = sum_s alpha[d, t, s] u_s[d] (without the D skip and the gate). steps(s, t] are the scan
steps after s up to and including t: s+1..t forward, t..s-1 in reverse.

Neighbourhood-enhanced state (OuroMamba): for a patch t,
    h_p(t) = sum_{k in N(t)} w_k h(k),   w_k = mean_d dt_k[d],
N(t) = the patches of the p x p window centred on t that lie on the grid (the CLS token is not a
patch: it is never a neighbour and its own row is left unchanged). The enhanced attention is the
attention of C_t . h_p(t):  alpha_p[d, t, s] = sum_k W[t, k] alpha^h[d, k, s] with the neighbour
matrix W[t, k] = w_k [k in N(t)] and alpha^h the state attention (alpha without C, taken at k).

`implicit_attention_ref` is the O(L^2) loop (the definition); `implicit_attention` is the fast
cumulative form: prod exp(dt_j A) = exp(A (c_k - c_s)) with c the cumulative sum of dt in scan order,
computed for all (k, s) at once per channel chunk.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "patch_token_index",
    "neighbourhood_mask",
    "neighbourhood_weights",
    "neighbourhood_state",
    "implicit_attention_ref",
    "implicit_attention",
    "contrastive_loss",
    "effective_topk",
]


def _check_grid(L: int, grid: int, cls_position: int) -> None:
    if L != grid * grid + 1:
        raise ValueError(f"sequence length {L} does not match a {grid}x{grid} patch grid plus one CLS token ({grid * grid + 1})")
    if not 0 <= cls_position <= grid * grid:
        raise ValueError(f"cls_position {cls_position} outside the {grid * grid + 1} tokens")


def patch_token_index(grid: int, cls_position: int, device: torch.device | str = "cpu") -> Tensor:
    """Token index (P,) of each patch in row-major grid order: patches after the CLS shift by one."""
    idx = torch.arange(grid * grid, device=device)
    return idx + (idx >= cls_position).long()


def neighbourhood_mask(grid: int, p: int, device: torch.device | str = "cpu") -> Tensor:
    """(P, P) bool: patch k lies in the p x p window centred on patch t (grid borders cut the window)."""
    if p < 1 or p % 2 == 0:
        raise ValueError(f"neighbourhood size must be odd and >= 1, got {p}")
    i = torch.arange(grid * grid, device=device)
    r, c = torch.div(i, grid, rounding_mode="floor"), i % grid
    rad = p // 2
    return ((r[:, None] - r[None, :]).abs() <= rad) & ((c[:, None] - c[None, :]).abs() <= rad)


def neighbourhood_weights(dt: Tensor, grid: int, cls_position: int, p: int) -> Tensor:
    """Neighbour matrix W (B, P, L): W[b, t, k] = w_k = mean_d dt[b, k, d] if token k is a patch in the
    window of patch t, else 0 (the CLS column is always 0). Rows are patches in grid order."""
    Bsz, L, _ = dt.shape
    _check_grid(L, grid, cls_position)
    tok = patch_token_index(grid, cls_position, dt.device)
    w = dt.float().mean(-1)[:, tok]  # (B, P)
    m = neighbourhood_mask(grid, p, dt.device).float()
    W = dt.new_zeros(Bsz, grid * grid, L, dtype=torch.float32)
    return W.index_copy(2, tok, m.unsqueeze(0) * w.unsqueeze(1))


def neighbourhood_state(h: Tensor, dt: Tensor, grid: int, cls_position: int, p: int) -> Tensor:
    """h_p (B, L, D, S): Delta-weighted sum of h over the p x p patch window (box filter on the grid);
    the CLS row is returned unchanged."""
    Bsz, L, D, S = h.shape
    _check_grid(L, grid, cls_position)
    if dt.shape != (Bsz, L, D):
        raise ValueError(f"dt has shape {tuple(dt.shape)}, expected {(Bsz, L, D)} to match h {tuple(h.shape)}")
    if p < 1 or p % 2 == 0:
        raise ValueError(f"neighbourhood size must be odd and >= 1, got {p}")
    tok = patch_token_index(grid, cls_position, h.device)
    w = dt.float().mean(-1)[:, tok]  # (B, P)
    wh = (h[:, tok].float() * w[:, :, None, None]).reshape(Bsz, grid, grid, D * S).permute(0, 3, 1, 2)
    # zero padding + ones kernel = sum over the in-grid part of the window
    hp = F.avg_pool2d(wh, p, stride=1, padding=p // 2, count_include_pad=True) * (p * p)
    hp = hp.permute(0, 2, 3, 1).reshape(Bsz, grid * grid, D, S)
    return h.float().index_copy(1, tok, hp)


# ------------------------------------------------------------------------------ implicit attention
def implicit_attention_ref(dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, *, reverse: bool = False) -> Tensor:
    """Per-channel implicit attention (B, D, L, L) by the O(L^2) product loop (module docstring)."""
    Bsz, L, D = dt.shape
    dA = torch.exp(dt.float().unsqueeze(-1) * A.float())  # (B, L, D, S)
    out = dt.new_zeros(Bsz, D, L, L, dtype=torch.float32)
    for t in range(L):
        srcs = range(t, L) if reverse else range(t + 1)
        for s in srcs:
            prod = torch.ones_like(dA[:, 0])
            steps = range(t, s) if reverse else range(s + 1, t + 1)
            for j in steps:
                prod = prod * dA[:, j]
            bbar = dt[:, s].float().unsqueeze(-1) * Bm[:, s].float().unsqueeze(1)  # (B, D, S)
            out[:, :, t, s] = (Cm[:, t].float().unsqueeze(1) * prod * bbar).sum(-1)
    return out


FACTOR_LIMITS = {torch.float32: 80.0, torch.float64: 600.0}
"""Largest |A (c - c_mid)| for the factored form in each dtype (exp overflows at ~88 / ~709)."""


def _direct_chunk(cum: Tensor, dt: Tensor, A: Tensor, k_idx: Tensor, s_idx: Tensor, channel_mean: bool) -> Tensor:
    """State attention without C on the causal pairs (k, s) (s before-or-at k, so c_k - c_s >= 0):
        E[b, pair, (d,) n] = exp(A[d, n] (c_k - c_s)) dt_s[d]
    summed over the chunk's channels when channel_mean (B, M, S), else (B, M, Dc, S).
    One exp per (pair, channel, state): always finite, costs B*M*Dc*S exps."""
    diff = (cum[:, k_idx] - cum[:, s_idx]).float()  # (B, M, Dc), >= 0
    if channel_mean:
        logdt = dt.clamp_min(torch.finfo(torch.float32).tiny).log()[:, s_idx, None, :]  # (B, M, 1, Dc)
        return torch.exp(torch.addcmul(logdt, diff.unsqueeze(2), A.t())).sum(-1)  # (B, M, S)
    return torch.exp(diff.unsqueeze(-1) * A) * dt[:, s_idx].unsqueeze(-1)  # (B, M, Dc, S)


def _factored_chunk(cum: Tensor, dt: Tensor, A: Tensor, k_idx: Tensor, s_idx: Tensor, channel_mean: bool,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """Same as `_direct_chunk`, factored around the mid cumulative value m:
        exp(A (c_k - c_s)) = exp(A (c_k - m)) * exp(-A (c_s - m))
    so the channel sum is one batched GEMM over d ((B*S) matrices L x Dc @ Dc x L) and only
    2*B*L*Dc*S exps are taken. Valid while |A (c - m)| < FACTOR_LIMITS[dtype] (the caller checks,
    per channel)."""
    m = (cum[:, :1] + cum[:, -1:]) / 2
    x = (cum - m).to(dtype).unsqueeze(1) * A.t().to(dtype).unsqueeze(1)  # (B, S, L, Dc)
    P, Q = torch.exp(x), torch.exp(-x) * dt.to(dtype).unsqueeze(1)
    if channel_mean:
        return (P @ Q.transpose(-1, -2))[:, :, k_idx, s_idx].transpose(1, 2).float()  # (B, M, S)
    return (P[:, :, k_idx] * Q[:, :, s_idx]).permute(0, 2, 3, 1).float()  # (B, M, Dc, S)


_METHODS = {"factored": _factored_chunk, "direct": _direct_chunk}


def implicit_attention(
    dt: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    *,
    reverse: bool = False,
    mix: Tensor | None = None,
    rows: Tensor | None = None,
    channel_mean: bool = True,
    method: str = "factored",
    chunk_elems: int = 1 << 25,
    use_checkpoint: bool = False,
) -> Tensor:
    """Fast cumulative form of the implicit attention of one scan direction.

    mix (B, T, L): attention of the mixed state sum_k mix[t, k] h(k) read out with C at `rows`
    (the enhanced attention alpha_p with mix = `neighbourhood_weights`, rows = the patch tokens).
    mix None: the plain implicit attention, T = L rows.
    Returns (B, T, L) averaged over channels when channel_mean, else (B, D, T, L).

    method "factored" (default): channels whose cumulative log-decay range fits FACTOR_LIMITS use the
    factored form (GEMM over channels; float32 when it fits, else float64); the others, and every
    channel under "direct", take one exp per causal pair (k, s). Channels go in chunks of at most `chunk_elems` elements of the
    chunk's largest tensor; use_checkpoint recomputes each chunk in the backward pass."""
    Bsz, L, D = dt.shape
    S = A.shape[1]
    if A.shape != (D, S) or Bm.shape != (Bsz, L, S) or Cm.shape != (Bsz, L, S):
        raise ValueError(
            f"implicit_attention: dt {tuple(dt.shape)} needs A (D={D}, S), Bm and Cm (B={Bsz}, L={L}, S); "
            f"got A {tuple(A.shape)}, Bm {tuple(Bm.shape)}, Cm {tuple(Cm.shape)}"
        )
    if (mix is None) != (rows is None):
        raise ValueError("give both mix and rows (enhanced attention) or neither (plain attention)")
    if method not in _METHODS:
        raise ValueError(f"unknown implicit-attention method {method!r}; choose one of {', '.join(_METHODS)}")
    dtf, Af = dt.float(), A.float()
    cum64 = dtf.double().flip(1).cumsum(1).flip(1) if reverse else dtf.double().cumsum(1)  # c_k in scan order
    pairs = torch.triu_indices(L, L, device=dt.device) if reverse else torch.tril_indices(L, L, device=dt.device)  # (k, s): s before-or-at k
    k_idx, s_idx = pairs[0], pairs[1]
    M = k_idx.numel()
    with torch.no_grad():  # per channel: max |A (c - m)| = half the cumulative range times max |A|
        reach = (cum64.amax(1) - cum64.amin(1)).amax(0) / 2 * Af.abs().amax(-1).double()  # (D,)
        tier = torch.full_like(reach, 2, dtype=torch.long)  # 0: factored fp32, 1: factored fp64, 2: direct
        if method == "factored":
            tier[reach < FACTOR_LIMITS[torch.float64]] = 1
            tier[reach < FACTOR_LIMITS[torch.float32]] = 0
    per_f = Bsz * (L if channel_mean else M) * S
    groups = [(partial(_factored_chunk, dtype=torch.float32), torch.nonzero(tier == 0).flatten(), per_f),
              (partial(_factored_chunk, dtype=torch.float64), torch.nonzero(tier == 1).flatten(), per_f),
              (_direct_chunk, torch.nonzero(tier == 2).flatten(), Bsz * M * S)]
    parts, order = [], []
    for fn, chans, per_channel in groups:
        dc = max(1, chunk_elems // max(1, per_channel))
        for c0 in range(0, chans.numel(), dc):
            ch = chans[c0:c0 + dc]
            args = (cum64[..., ch], dtf[..., ch], Af[ch], k_idx, s_idx, channel_mean)
            if use_checkpoint and torch.is_grad_enabled():
                parts.append(checkpoint(fn, *args, use_reentrant=False))
            else:
                parts.append(fn(*args))
            order.append(ch)
    Cf, Bf = Cm.float(), Bm.float()
    if channel_mean:
        E = dtf.new_zeros(Bsz, L, L, S)  # (B, k, s, S)
        E[:, k_idx, s_idx] = torch.stack(parts).sum(0) / D
        G = E if mix is None else torch.einsum("btk,bksn->btsn", mix.float(), E)
        Ct = Cf if mix is None else Cf[:, rows]
        return (G * Ct.unsqueeze(2) * Bf.unsqueeze(1)).sum(-1)
    E = dtf.new_zeros(Bsz, L, L, D, S)  # (B, k, s, D, S)
    E[:, k_idx, s_idx] = torch.cat(parts, dim=2)[:, :, torch.argsort(torch.cat(order))]
    if mix is None:
        return torch.einsum("btsdn,btn,bsn->bdts", E, Cf, Bf)
    G = torch.einsum("btk,bksdn->btsdn", mix.float(), E)
    return torch.einsum("btsdn,btn,bsn->bdts", G, Cf[:, rows], Bf)


# ---------------------------------------------------------------------------------- contrastive loss
def effective_topk(topk: int, num_patches: int) -> int:
    """Positives per patch: `topk`, capped at a quarter of the other patches (at least 1)."""
    return max(1, min(topk, (num_patches - 1) // 4))


def contrastive_loss(feats: Tensor, topk: int, tau: float) -> Tensor:
    """Patch-level InfoNCE on attention rows feats (B, P, F); returns the per-image mean over patches (B,).

    sim = cosine similarity of the rows; positives of patch t = its `topk` most similar other patches
    (chosen without gradient); the denominator runs over all other patches:
        L_t = -log( sum_{p in Pos(t)} exp(sim_tp / tau) / sum_{s != t} exp(sim_ts / tau) )"""
    Bsz, P, _ = feats.shape
    if not 1 <= topk < P - 1:
        raise ValueError(f"contrastive loss needs 1 <= topk < patches - 1 so that negatives exist; got topk={topk}, patches={P}")
    f = F.normalize(feats.float(), dim=-1, eps=1e-12)
    sim = f @ f.transpose(1, 2)  # (B, P, P)
    eye = torch.eye(P, dtype=torch.bool, device=feats.device)
    logits = (sim / tau).masked_fill(eye, float("-inf"))
    pos_idx = logits.detach().topk(topk, dim=-1).indices
    pos = torch.zeros_like(eye).expand(Bsz, P, P).clone().scatter_(2, pos_idx, True)
    lse_pos = logits.masked_fill(~pos, float("-inf")).logsumexp(-1)
    lse_all = logits.logsumexp(-1)
    return (lse_all - lse_pos).mean(-1)
