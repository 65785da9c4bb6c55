"""OuroMamba-Gen's L^C features, fast: the enhanced implicit-attention rows without the per-channel L x L.

Shape notation as in attention.py: B batch, L tokens, D = d_inner channels, S = d_state, P patches
(a G x G grid), T tokens per block, nb = ceil(L / T) blocks; dt (B, L, D) = softplus(delta) >= 0,
A (D, S) <= 0, c_k = sum_{j <= k} dt_j (scan order, fp64).

What L^C reads (attention.py's `implicit_attention(..., mix=W, rows=patches)`, channel mean) is
    feat[b, t, s] = sum_k W[t, k] sum_n C_t[n] B_s[n] E[b, n, s, k]                  (B, P, L)
    E[b, n, s, k] = (1/D) sum_d [s before-or-at k] exp(A[d, n] (c_k - c_s)) dt_s[d]  (B, S, L, L)
with W the p x p neighbour matrix (W[t, k] = mean_d dt_k on the window of patch t). E is one
channel-mean "state attention" per state index n; the sum over d is the only O(L^2 D S) work, and it
is a GEMM once the decay is factored. Nothing of size (L, L, D) is ever formed.

Blocked factorisation (every factor in (0, 1], so fp32 never overflows): tokens are cut into nb
blocks of T (the last one padded with dt = 0, which changes no real entry). For k in block I
(first token i0) and s in an earlier block J (last token j1):
    exp(A (c_k - c_s)) = P[k] * M_IJ * Qn[s],    P[k] = exp(A (c_k - c_i0)),
    M_IJ = exp(A (c_i0 - c_j1)),                 Qn[s] = exp(A (c_j1 - c_s)),
so E's block (J, I) is the GEMM over d of (Qn * dt / D * M_IJ)[s, d] and P[k, d], per (b, n).
Inside a diagonal block (s, k both in I) the pair is factored around the block start,
exp(A (c_k - c_s)) = P[k] / P[s], which stays finite while |A| (c_last - c_i0) <= DIAG_LIMIT; the
(block, channel) pairs beyond that limit (very long decays) are summed directly, one exp per pair.
Qn comes from P the same way (Qn[s] = P[j1] / P[s]) on the (block, channel) pairs within the limit.
The backward pass recomputes P and Qn (one exp per element) and runs two more GEMMs:
    U[k] = P[k] (Z^T R)[k],  V[s] = R[s] (Z P)[s]   (Z = dE, R = the GEMM's other operand)
    dc_k += sum_n A U[k],  dc_s -= sum_n A V[s],  d dt_s += sum_n V[s] / dt_s,  d dt = revcumsum(dc) + ...
`state_attention_ref` is the definition (one exp per (s, k, d, n): small shapes only); tests compare.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import patch_token_index

__all__ = ["BLOCK", "DIAG_LIMIT", "block_size", "state_attention", "state_attention_ref", "enhanced_rows", "grid_enhanced_rows",
           "enhanced_attention"]

BLOCK = 64
"""Largest block of tokens (the blocks are then evened out: L = 197 -> 4 blocks of 50). Bigger blocks
mean fewer (block, block) decay factors (elementwise work ~ L^2 D S / T) but a larger share of the
GEMM on the diagonal blocks' upper triangles and longer in-block decays; tools/gen_cost.py --block."""
DIAG_LIMIT = 80.0
"""Largest |A| (c_last - c_first) of one block and channel for the factored in-block form in fp32
(exp(+-60) is far from fp32's 3.4e38 / 1.2e-38, and its relative rounding stays ~60 * 2**-24)."""
DIRECT_ELEMS = 1 << 23
"""Element budget of one channel chunk of the direct (one exp per pair) in-block sum."""


def block_size(L: int, block: int = BLOCK) -> tuple[int, int]:
    """(T, nb): nb = ceil(L / block) blocks of T = ceil(L / nb) tokens (padding < nb tokens)."""
    if block < 1:
        raise ValueError(f"attention block must be >= 1 token, got {block}")
    nb = -(-L // block)
    return -(-L // nb), nb


# ------------------------------------------------------------------------------------- reference
def state_attention_ref(dt: Tensor, A: Tensor, *, reverse: bool = False) -> Tensor:
    """E (B, S, L_k, L_s) by its definition (module docstring), fp64, one exp per (s, k, d, n)."""
    dt64 = dt.double()
    c = dt64.flip(1).cumsum(1).flip(1) if reverse else dt64.cumsum(1)
    diff = c.unsqueeze(2) - c.unsqueeze(1)  # (B, k, s, D) = c_k - c_s
    L = dt.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=dt.device)
    causal = causal.triu() if reverse else causal.tril()  # [k, s]: s before-or-at k in scan order
    diff = torch.where(causal[None, :, :, None], diff, 0.0)  # non-causal pairs: no exp of a growth
    x = torch.exp(diff.unsqueeze(-1) * A.double()) * dt64.unsqueeze(1).unsqueeze(-1)  # (B, k, s, D, S)
    E = (x * causal[None, :, :, None, None]).mean(3)  # (B, k, s, S)
    return E.permute(0, 3, 1, 2).float()  # (B, S, k, s)


# --------------------------------------------------------------------------------------- tables
DT_FLOOR = 1e-30
"""A source dt below this (softplus(x) for x < -69) enters E as DT_FLOOR (an absolute change < 1e-30)
and gets no gradient as a source (it still gets one through the decays): the backward divides by it."""
SUB_BLOCK = 4
"""In-block pairs past DIAG_LIMIT are computed by the same algorithm on that block alone, with blocks
SUB_BLOCK times shorter (down to one token, where the in-block span is 0)."""


class _Workspace:
    """Reused scratch tensors. The tables are (b, S, L, Dc) fp32, ~10 MB an image at Vim-S; a fresh
    tensor of that size costs more in page faults than the arithmetic done on it (measured ~10x on
    the 2-core build host), so each named buffer is kept and reused while its shape stays the same."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, Tensor] = {}

    def get(self, key: tuple, shape: tuple[int, ...], device: torch.device) -> Tensor:
        t = self._bufs.get(key)
        if t is None or t.shape != shape or t.device != device:
            t = torch.empty(shape, dtype=torch.float32, device=device)
            self._bufs[key] = t
        return t

    def clear(self) -> None:
        self._bufs.clear()


_WS = _Workspace()


def _cumulative(dt: Tensor, T: int, nb: int, D: int) -> tuple[Tensor, Tensor]:
    """c (B, nb, T, Dc) fp64 and dt / D (B, 1, nb, T, Dc) of the sequence padded to nb * T tokens
    (dt = 0 past the end: no decay, no source)."""
    Bsz, L, _ = dt.shape
    dtp = F.pad(dt.float(), (0, 0, 0, T * nb - L))
    c = dtp.double().cumsum(1).view(Bsz, nb, T, -1)
    return c, dtp.clamp_min(DT_FLOOR).div_(D).view(Bsz, 1, nb, T, -1)


class _Chunk:
    """The factors of one chunk of images and channels (Dc of them), forward scan order.

    P (B, S, L', Dc) = exp(A (c - c_first)) per block (the k side, in (0, 1]).
    R (B, S, L', Dc), the s side, kept relative to the first token of the block column being
    computed: `start()` fills it with dt / (D P) = exp(A (c_first - c_s)) dt / D (block by block,
    >= 1 inside the block, 0 on the (block, channel) pairs past DIAG_LIMIT), and `advance(I)`, after
    block column I, multiplies rows < i1 by exp(A (c_first(I+1) - c_first(I))) <= 1 (rows of
    block I past the limit are set by exp instead), so that for column I + 1 every row s < i1 holds
    exp(A (c_first(I+1) - c_s)) dt_s / D."""

    def __init__(self, c: Tensor, dtD: Tensor, A: Tensor, ws_key: tuple) -> None:
        Bsz, nb, T, Dc = c.shape
        S = A.shape[1]
        self.c, self.dtD, self.T, self.nb, self.S = c, dtD, T, nb, S
        self.first = c[:, :, :1]  # (B, nb, 1, Dc)
        self.At = A.float().t().contiguous().view(1, S, 1, 1, Dc)
        span = (c[:, :, -1] - c[:, :, 0]).float().amax(0)  # (nb, Dc): over the chunk's images
        self.safe = span * A.float().abs().amax(1) <= DIAG_LIMIT
        unsafe: dict[int, list[int]] = {}
        for J, d in (~self.safe).nonzero().tolist():
            unsafe.setdefault(J, []).append(d)
        self.unsafe = {J: torch.tensor(ds, dtype=torch.long, device=c.device) for J, ds in unsafe.items()}
        shape = (Bsz, S, nb * T, Dc)
        self.P = _WS.get(ws_key + ("P",), shape, c.device)
        P5 = self.P.view(Bsz, S, nb, T, Dc)
        torch.mul((c - self.first).float().unsqueeze(1), self.At, out=P5).exp_()
        self.R = _WS.get(ws_key + ("R",), shape, c.device)
        # step decays exp(A (c_first(I+1) - c_first(I))) (B, S, nb - 1, 1, Dc)
        self.step = torch.mul((self.first[:, 1:] - self.first[:, :-1]).float().unsqueeze(1), self.At).exp_()

    def start(self) -> Tensor:
        Bsz, S, Lp, Dc = self.R.shape
        R5 = self.R.view(Bsz, S, self.nb, self.T, Dc)
        torch.div(self.dtD, self.P.view_as(R5), out=R5)
        if self.unsafe:
            R5.masked_fill_(~self.safe.view(1, 1, self.nb, 1, Dc), 0.0)
        return self.R

    def advance(self, I: int) -> None:
        T, Bsz, S = self.T, self.R.shape[0], self.S
        i1 = (I + 1) * T
        self.R[:, :, :i1].view(Bsz, S, I + 1, T, -1).mul_(self.step[:, :, I:I + 1])
        chans = self.unsafe.get(I)
        if chans is not None:  # rows of block I past the limit: exp(A (c_first(I+1) - c_s)) dt / D by exp
            y = (self.c[:, I + 1, :1] - self.c[:, I]).float()[..., chans]  # (B, T, U)
            v = torch.exp(y.unsqueeze(1) * self.At[:, :, 0, :, chans]) * self.dtD[:, :, I][..., chans]  # (B, S, T, U)
            self.R[:, :, I * T:i1, chans] = v


def _sub_problem(dtp: Tensor, J: int, T: int, chans: Tensor) -> tuple[Tensor, int, int]:
    """dt of block J's tokens on the given channels, and the shorter blocks it is cut into."""
    T2, nb2 = block_size(T, max(1, T // SUB_BLOCK))
    return dtp[:, J * T:(J + 1) * T][..., chans], T2, nb2


def _forward(dt: Tensor, A: Tensor, T: int, nb: int, D: int, dc: int, depth: int = 0) -> Tensor:
    """E (B, S, L_k, L_s) of dt (B, L, Dc'), summed over its channels, each divided by D."""
    Bsz, L, Dall = dt.shape
    S, Lp = A.shape[1], T * nb
    c_all, dtD_all = _cumulative(dt, T, nb, D)
    dtp = F.pad(dt, (0, 0, 0, Lp - L))
    E = dt.new_zeros(Bsz, S, Lp, Lp, dtype=torch.float32)
    for d0 in range(0, Dall, dc):
        ch = slice(d0, d0 + dc)
        tab = _Chunk(c_all[..., ch], dtD_all[..., ch], A[ch], (depth,))
        P, R = tab.P, tab.start()
        for I in range(nb):
            i0, i1 = I * T, (I + 1) * T
            out = _WS.get((depth, "out", I), (Bsz, S, T, i1), dt.device)
            torch.matmul(P[:, :, i0:i1], R[:, :, :i1].transpose(-1, -2), out=out)  # (B, S, T_k, i1_s)
            out[..., i0:].tril_()  # inside the diagonal block: s <= k
            E[:, :, i0:i1, :i1] += out
            if I + 1 < nb:
                tab.advance(I)
        for J, chans in tab.unsafe.items():  # in-block pairs past the limit: the same algorithm on block J alone
            sub, T2, nb2 = _sub_problem(dtp[..., ch], J, T, chans)
            E[:, :, J * T:(J + 1) * T, J * T:(J + 1) * T] += _forward(sub, A[ch][chans], T2, nb2, D, dc, depth + 1)
    return E[:, :, :L, :L]


def _backward(dt: Tensor, A: Tensor, gE: Tensor, T: int, nb: int, D: int, dc: int, depth: int = 0) -> Tensor:
    """dL/d dt (B, L, Dc') for dL/dE = gE (B, S, L_k, L_s) (module docstring)."""
    Bsz, L, Dall = dt.shape
    S, Lp = A.shape[1], T * nb
    c_all, dtD_all = _cumulative(dt, T, nb, D)
    dtp = F.pad(dt, (0, 0, 0, Lp - L))
    Zp = F.pad(gE.float(), (0, Lp - L, 0, Lp - L))
    Z = []  # per block column I: dL/dE[k in I, s < i1], masked to s <= k inside the diagonal block
    for I in range(nb):
        z = Zp[:, :, I * T:(I + 1) * T, :(I + 1) * T].clone()
        z[..., I * T:].tril_()
        Z.append(z)
    gc = dt.new_empty(Bsz, Lp, Dall, dtype=torch.float32)  # dL/dc
    g_src = torch.empty_like(gc)  # dL/d dt through the source factor dt_s / D
    g_sub = None
    for d0 in range(0, Dall, dc):
        ch = slice(d0, d0 + dc)
        tab = _Chunk(c_all[..., ch], dtD_all[..., ch], A[ch], (depth,))
        P, R = tab.P, tab.start()
        Dc = P.shape[-1]
        gP = _WS.get((depth, "gP"), P.shape, dt.device)  # (Z R)[k]
        V = _WS.get((depth, "V"), P.shape, dt.device).zero_()  # sum_I R_I (Z_I^T P_I)[s] = sum_k Z X (s side)
        for I in range(nb):
            i0, i1 = I * T, (I + 1) * T
            torch.matmul(Z[I], R[:, :, :i1], out=gP[:, :, i0:i1])
            gR = _WS.get((depth, "gR", I), (Bsz, S, i1, Dc), dt.device)
            torch.matmul(Z[I].transpose(-1, -2), P[:, :, i0:i1], out=gR)
            V[:, :, :i1].addcmul_(R[:, :, :i1], gR)
            if I + 1 < nb:
                tab.advance(I)
        X = gP.mul_(P).sub_(V)  # U[t] - V[t]: both enter dL/dc_t with weight A
        gcc = gc[..., ch]
        At = tab.At.view(S, Dc)
        torch.mul(X[:, 0], At[0], out=gcc)
        for n in range(1, S):
            gcc.addcmul_(X[:, n], At[n])
        dtD = dtD_all.view(Bsz, Lp, Dall)[..., ch]
        torch.sum(V, 1, out=g_src[..., ch])
        g_src[..., ch] = g_src[..., ch].div_(dtD * D).masked_fill_(dtD * D <= DT_FLOOR, 0.0)
        for J, chans in tab.unsafe.items():
            sub, T2, nb2 = _sub_problem(dtp[..., ch], J, T, chans)
            gs = _backward(sub, A[ch][chans], Zp[:, :, J * T:(J + 1) * T, J * T:(J + 1) * T], T2, nb2, D, dc, depth + 1)
            if g_sub is None:
                g_sub = torch.zeros_like(gc)
            g_sub[:, J * T:(J + 1) * T, d0 + chans] += gs
    g_dt = g_src.add_(gc.flip(1).cumsum(1).flip(1))  # c_k = sum_{j<=k} dt_j
    if g_sub is not None:
        g_dt += g_sub
    return g_dt[:, :L]


class _StateAttention(torch.autograd.Function):
    """E = state attention (module docstring), forward scan order, with the factored backward."""

    @staticmethod
    def forward(ctx, dt: Tensor, A: Tensor, T: int, nb: int, batch_chunk: int, dc: int) -> Tensor:
        ctx.save_for_backward(dt, A)
        ctx.cfg = (T, nb, dt.shape[-1], dc)
        ctx.chunk = batch_chunk
        return torch.cat([_forward(dt[b:b + batch_chunk], A, *ctx.cfg) for b in range(0, dt.shape[0], batch_chunk)])

    @staticmethod
    def backward(ctx, gE: Tensor):
        dt, A = ctx.saved_tensors
        c = ctx.chunk
        g = torch.cat([_backward(dt[b:b + c], A, gE[b:b + c], *ctx.cfg) for b in range(0, dt.shape[0], c)])
        return g.to(dt.dtype), None, None, None, None, None


CHUNK_ELEMS = 1 << 22
"""Element budget of one (b, S, L, Dc) table: images and channels are processed in chunks (they are
independent, so chunking changes no value): CHANNEL_CHUNK channels at a time, as many images as fit."""
CHANNEL_CHUNK = 768


def _largest_safe_block(x: Tensor, A: Tensor, block: int) -> int:
    """The largest of block, block/2, block/4, ... (down to MIN_BLOCK) whose in-block decays all stay
    within DIAG_LIMIT, so that no block needs the slower sub-block pass; `block` itself if none does."""
    c = x.double().cumsum(1).amax(0) if x.shape[0] == 1 else None  # (L, D) for one image
    amax = A.float().abs().amax(1).double()  # (D,)
    L = x.shape[1]
    cand = block
    while cand >= MIN_BLOCK:
        T, nb = block_size(L, cand)
        idx = torch.arange(nb, device=x.device) * T
        last = torch.clamp(idx + T - 1, max=L - 1)
        cs = x.double().cumsum(1) if c is None else c.unsqueeze(0)
        span = (cs[:, last] - cs[:, idx]).amax(0)  # (nb, D)
        if bool((span * amax <= DIAG_LIMIT).all()):
            return cand
        cand //= 2
    return block


MIN_BLOCK = 8


def state_attention(dt: Tensor, A: Tensor, *, reverse: bool = False, block: int = BLOCK,
                    channel_chunk: int = CHANNEL_CHUNK) -> Tensor:
    """E (B, S, L_k, L_s) = `state_attention_ref` by the blocked factorisation; differentiable in dt
    (A is a constant: the model's parameters are frozen during Gen). The block is the largest of
    block, block/2, ... whose in-block decays all stay within DIAG_LIMIT (same values either way)."""
    if dt.dim() != 3 or A.dim() != 2 or A.shape[0] != dt.shape[2]:
        raise ValueError(f"state_attention: dt must be (B, L, D) and A (D, S); got dt {tuple(dt.shape)}, A {tuple(A.shape)}")
    if A.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("state_attention differentiates dt only; A must not require grad (detach it)")
    if channel_chunk < 1:
        raise ValueError(f"channel_chunk must be >= 1, got {channel_chunk}")
    Bsz, L, D = dt.shape
    x = dt.flip(1) if reverse else dt
    with torch.no_grad():
        T, nb = block_size(L, _largest_safe_block(x.detach(), A, block))
    dc = min(D, channel_chunk)
    chunk = max(1, min(Bsz, CHUNK_ELEMS // max(1, A.shape[1] * T * nb * dc)))
    E = _StateAttention.apply(x, A.detach(), T, nb, chunk, dc)
    return E.flip(2, 3) if reverse else E


# ------------------------------------------------------------------------------------- features
def _band(n: int, p: int, device: torch.device) -> Tensor:
    """(n, n) 0/1 matrix with ones where |i - j| <= p // 2: one axis of the p x p window."""
    i = torch.arange(n, device=device)
    return ((i[:, None] - i[None, :]).abs() <= p // 2).float()


def grid_enhanced_rows(E: Tensor, dt: Tensor, Bm: Tensor, Cm: Tensor, tok: Tensor, grid: tuple[int, int], p: int) -> Tensor:
    """feat (B, P, L_s) from E (B, S, L_k, L_s) for patches on an H x W grid (any layout):
    tok (P,) = the layout position of grid patch g (row-major g = h*W + w). W[g, k] = w_k (mean_d dt_k)
    on the p x p window of patch g, applied as a separable box filter over the grid (two small GEMMs
    with band matrices, along the rows then the columns), then the readout sum_n C_g[n] B_s[n].
    Equals `implicit_attention(dt, A, Bm, Cm, mix=W, rows=tok)` with W the layout's neighbourhood
    weights (`grid.layout_neighbourhood_weights`), without forming the dense (P, L) mix."""
    Bsz, S, L, _ = E.shape
    H, Wd = grid
    if tok.numel() != H * Wd:
        raise ValueError(f"{tok.numel()} patch positions for a {H}x{Wd} grid")
    if p < 1 or p % 2 == 0:
        raise ValueError(f"neighbourhood size must be odd and >= 1, got {p}")
    w = dt.float().mean(-1)[:, tok]  # (B, P), grid order
    Ew = E[:, :, tok] * (w.view(Bsz, 1, -1, 1) * Bm.float().transpose(1, 2).unsqueeze(2))  # (B, S, P_k, L_s) * w_k B_s[n]
    G = torch.matmul(_band(H, p, E.device), Ew.reshape(Bsz, S, H, Wd * L))  # window along the grid rows
    G = torch.matmul(_band(Wd, p, E.device), G.view(Bsz, S, H, Wd, L).transpose(2, 3).reshape(Bsz, S, Wd, H * L))  # and columns
    G = G.view(Bsz, S, Wd, H, L).transpose(2, 3).reshape(Bsz, S, H * Wd, L)  # (B, S, P_t, L_s)
    return (G * Cm.float()[:, tok].transpose(1, 2).unsqueeze(-1)).sum(1)  # sum_n C_t[n] ...


def enhanced_rows(E: Tensor, dt: Tensor, Bm: Tensor, Cm: Tensor, grid: int, cls_position: int, p: int) -> Tensor:
    """feat (B, P, L_s) from E (B, S, L_k, L_s) for Vim's layout (a grid x grid of patches and one CLS
    token, which is not a patch, so never a neighbour): `grid_enhanced_rows` on that layout.
    Equals `neighbourhood_weights(dt, grid, cls, p) @ E` read out with C and B."""
    L = E.shape[2]
    tok = patch_token_index(grid, cls_position, E.device)
    if L != grid * grid + 1:
        raise ValueError(f"sequence length {L} does not match a {grid}x{grid} patch grid plus one CLS token")
    return grid_enhanced_rows(E, dt, Bm, Cm, tok, (grid, grid), p)


def enhanced_attention(dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, *, reverse: bool, grid: int, cls_position: int,
                       p: int, block: int = BLOCK) -> Tensor:
    """The channel-mean enhanced attention rows of the patches (B, P, L): equal to
    `implicit_attention(dt, A, Bm, Cm, reverse=, mix=neighbourhood_weights(dt, grid, cls, p), rows=patches)`."""
    return enhanced_rows(state_attention(dt, A, reverse=reverse, block=block), dt, Bm, Cm, grid, cls_position, p)
