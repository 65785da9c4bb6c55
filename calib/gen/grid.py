"""OuroMamba-Gen's contrastive term for any model family: per scan direction, on the 2-D patch grid.

A family says where each scan's tokens sit on the patch grid (`ModelFamily.gen_layout`: the grid
(H, W) and, per position j of the scan's token layout, the row-major grid index pi(j) = h*W + w of
the token there, -1 for a token that is not a patch). With that, for one hook point (a block) and
each of its scan directions d (layout pi_d, reverse flag r_d):

  implicit attention   alpha_d[t, s] (attention.py), t and s positions of d's layout, s at or before t
                       in d's scan order (s <= t; s >= t when r_d), computed from d's own dt, A, B, C.
  neighbourhood        N(g) = the patches of the p x p window centred on grid patch g (cut by the grid
                       borders); it is a 2-D neighbourhood, the same for every direction.
  Delta weights        w_d(k) = mean over channels of d's dt at the position where patch k sits in d's
                       layout (each direction weighs the neighbours by its own Delta).
  enhanced row         alpha_p,d[g, s] = sum_{k in N(g)} w_d(k) alpha^h_d[pi_d^-1(k), s]
                       (the attention of h_p(g) = sum_k w_d(k) h_d(k), read out with C at patch g).
  common axes          rows are grid patches g in grid order; columns are mapped from d's layout to
                       the layout of the point's first scan (`ScanSite` order), so that column i means
                       the same token for every direction. Non-patch tokens (Vim's CLS) must sit at
                       the same layout positions in every direction.
  L^C of the point     InfoNCE (`contrastive_loss`) on feats[g, :] = mean_d alpha_p,d[g, :].

Vim (one layout, CLS in the middle, directions fwd / bwd-reversed) is exactly the original definition
(`generate.layer_contrastive_loss`); VMamba's four cross-scan directions (row-major and column-major,
each forward and reversed) share each stage's grid, and the column-major ones are re-indexed to row-major.
A hook point with an attention matmul (`MatmulSite.attention`, MambaVision's self-attention blocks)
adds the block's explicit attention: its softmax map averaged over heads, rows mapped to grid order and
aggregated over the same p x p neighbourhood with uniform weights (attention has no Delta), columns
mapped to grid order: InfoNCE on those rows. A hook point with neither scans nor attention (an MLP)
adds no term.

Sequences that are windows (MambaVision: batch x windows on the batch axis, windows of one image
consecutive) give one term per window; a point's term is the mean over the windows of each image.
L^C of the model = mean over the terms; L^O = cross-entropy of the logits against the targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..families.base import GenLayout, HookPoint, ScanSite, family_of, override_ops
from ..scan import ScanInputs, selective_scan_chunked
from .attention import contrastive_loss, effective_topk, implicit_attention
from .config import GenConfig
from .features import grid_enhanced_rows, state_attention
from .instrument import ScanRecord

__all__ = ["grid_neighbourhood_mask", "layout_neighbourhood_weights", "point_contrastive_loss", "attention_contrastive_loss",
           "family_gen_losses", "family_gen_losses_ref", "point_contrastive_loss_ref", "min_patches", "column_map",
           "READOUT_CHECKPOINT_BYTES"]


def grid_neighbourhood_mask(grid: tuple[int, int], p: int) -> Tensor:
    """(P, P) bool on an H x W grid (row-major): patch k lies in the p x p window centred on patch g."""
    if p < 1 or p % 2 == 0:
        raise ValueError(f"neighbourhood size must be odd and >= 1, got {p}")
    H, W = grid
    idx = torch.arange(H * W, device="cpu")
    r, c = torch.div(idx, W, rounding_mode="floor"), idx % W
    rad = p // 2
    return ((r[:, None] - r[None, :]).abs() <= rad) & ((c[:, None] - c[None, :]).abs() <= rad)


def layout_neighbourhood_weights(dt: Tensor, layout: GenLayout, p: int) -> Tensor:
    """W (B, P, L): W[b, g, j] = mean_d dt[b, j, d] when position j of the layout holds a patch of the
    window of grid patch g, else 0. Rows in grid order, columns in the layout's order."""
    Bsz, L, _ = dt.shape
    if layout.positions.numel() != L:
        raise ValueError(f"layout has {layout.positions.numel()} positions, the scan {L} tokens")
    tok = layout.patch_positions.to(dt.device)
    P = tok.numel()
    if P != layout.grid[0] * layout.grid[1]:
        raise ValueError(f"layout holds {P} patches, its grid {layout.grid} has {layout.grid[0] * layout.grid[1]}")
    w = dt.float().mean(-1)[:, tok]  # (B, P), grid order
    m = grid_neighbourhood_mask(layout.grid, p).to(dt.device, torch.float32)
    W = dt.new_zeros(Bsz, P, L, dtype=torch.float32)
    return W.index_copy(2, tok, m.unsqueeze(0) * w.unsqueeze(1))


def column_map(ref: GenLayout, lay: GenLayout) -> Tensor:
    """colmap (L,): position in `lay` of the token at each position of `ref` (patches by grid index;
    non-patch tokens must be at the same positions in both)."""
    rp, lp = ref.positions, lay.positions
    if not torch.equal(rp < 0, lp < 0):
        raise ValueError("non-patch tokens sit at different layout positions in two scan directions")
    inv = torch.empty_like(lp)
    patch = lp >= 0
    inv[lp[patch]] = torch.nonzero(patch).flatten()
    out = torch.arange(rp.numel(), device=rp.device)
    out[rp >= 0] = inv[rp[rp >= 0]]
    return out


READOUT_CHECKPOINT_BYTES = 1 << 26
"""With `GenConfig.checkpoint` None (auto), a scan's enhanced-attention readout is recomputed in the
backward pass instead of kept once its state attention E (B, S, L, L) exceeds this many bytes (VMamba's
first stage at 224 px: L = 3136, 39 MB an image): then only E is kept, not the readout's copies of it."""


def _direction_rows(dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, tok: Tensor, grid: tuple[int, int], p: int,
                    reverse: bool, block: int, keep_readout: bool) -> Tensor:
    E = state_attention(dt, A, reverse=reverse, block=block)
    if keep_readout:
        return grid_enhanced_rows(E, dt, Bm, Cm, tok, grid, p)
    return checkpoint(grid_enhanced_rows, E, dt, Bm, Cm, tok, grid, p, use_reentrant=False)


def point_contrastive_loss(records: list[ScanRecord], scans: list[ScanSite], layouts: list[GenLayout], cfg: GenConfig) -> Tensor:
    """L^C (B,) of one hook point from its scans' records (module docstring), fast: each direction's
    channel-mean state attention E by the blocked factorisation (`features.state_attention`, O(L^2 D S)
    as GEMMs) and the p x p neighbourhood as a separable box filter over the grid
    (`features.grid_enhanced_rows`), never the dense (P, L) mix. `point_contrastive_loss_ref` is the twin.
    Checkpointing: cfg.checkpoint True recomputes each direction (E and readout) in the backward pass;
    None recomputes only the readout of directions whose E exceeds READOUT_CHECKPOINT_BYTES."""
    feats = None
    ref = layouts[0]
    for r, sc, lay in zip(records, scans, layouts):
        tok = lay.patch_positions.to(r.dt.device)
        if lay.positions.numel() != r.dt.shape[1]:
            raise ValueError(f"layout has {lay.positions.numel()} positions, the scan {r.dt.shape[1]} tokens")
        Bsz, L, _ = r.dt.shape
        big = 4 * Bsz * r.A.shape[1] * L * L > READOUT_CHECKPOINT_BYTES
        args = (r.dt, r.A.detach(), r.Bm, r.Cm, tok, lay.grid, cfg.neighbourhood, sc.reverse, cfg.attn_block)
        if cfg.checkpoint:
            a = checkpoint(_direction_rows, *args, True, use_reentrant=False)
        else:
            a = _direction_rows(*args, not (cfg.checkpoint is None and big))
        a = a[..., column_map(ref, lay).to(a.device)]
        feats = a if feats is None else feats + a
    P = feats.shape[1]
    return contrastive_loss(feats / len(records), effective_topk(cfg.topk, P), cfg.tau)


def point_contrastive_loss_ref(records: list[ScanRecord], scans: list[ScanSite], layouts: list[GenLayout],
                               cfg: GenConfig) -> Tensor:
    """The twin of `point_contrastive_loss`: each direction's enhanced rows by `attention.implicit_attention`
    with the dense neighbourhood mix (B, P, L) of `layout_neighbourhood_weights`."""
    feats = None
    ref = layouts[0]
    for r, sc, lay in zip(records, scans, layouts):
        W = layout_neighbourhood_weights(r.dt, lay, cfg.neighbourhood)
        a = implicit_attention(r.dt, r.A, r.Bm, r.Cm, reverse=sc.reverse, mix=W, rows=lay.patch_positions.to(r.dt.device),
                               chunk_elems=cfg.attn_chunk_elems, use_checkpoint=bool(cfg.checkpoint))
        a = a[..., column_map(ref, lay).to(a.device)]
        feats = a if feats is None else feats + a
    P = feats.shape[1]
    return contrastive_loss(feats / len(records), effective_topk(cfg.topk, P), cfg.tau)


def attention_contrastive_loss(probs: Tensor, layout: GenLayout, cfg: GenConfig) -> Tensor:
    """L^C (B,) of an explicit attention map probs (B, heads, N, N) (module docstring)."""
    tok = layout.patch_positions.to(probs.device)
    a = probs.float().mean(1)[:, tok][:, :, tok]  # (B, P, P), rows and columns in grid order
    m = grid_neighbourhood_mask(layout.grid, cfg.neighbourhood).to(probs.device, torch.float32)
    feats = (m / m.sum(-1, keepdim=True)) @ a
    return contrastive_loss(feats, effective_topk(cfg.topk, tok.numel()), cfg.tau)


def _per_image(loss: Tensor, batch: int) -> Tensor:
    """(B * windows,) -> (B,): the mean over each image's consecutive windows."""
    if loss.shape[0] == batch:
        return loss
    if loss.shape[0] % batch:
        raise ValueError(f"{loss.shape[0]} sequences are not windows of {batch} images")
    return loss.reshape(batch, -1).mean(1)


class _MatmulRecorder:
    """A hook point's matmul (the installed one, else torch.matmul), recording the attention operand."""

    def __init__(self, point: HookPoint, sink: list[Tensor]) -> None:
        self.inner, self.sink = point.module.ops.matmul, sink
        self.attention = {m.name for m in point.matmuls if m.attention}

    def __call__(self, name: str, a: Tensor, b: Tensor) -> Tensor:
        if name in self.attention:
            self.sink.append(a)
        return torch.matmul(a, b) if self.inner is None else self.inner(name, a, b)


class _Recorder:
    """A hook point's scan, run as the chunked scan with the site's reverse flag, recording its inputs."""

    def __init__(self, point: HookPoint, sink: list[ScanRecord]) -> None:
        self.point, self.sink = point, sink
        self.reverse = {s.direction: s.reverse for s in point.scans}

    def __call__(self, direction: str, inputs: ScanInputs) -> Tensor:
        y = selective_scan_chunked(*inputs, delta_softplus=True, reverse=self.reverse[direction])
        self.sink.append(ScanRecord(self.point.index, direction, inputs.u, F.softplus(inputs.delta.float()), inputs.A,
                                    inputs.Bm, inputs.Cm, None))
        return y


def min_patches(model: nn.Module) -> int:
    """The fewest patches any scan of the model sees (L^C needs at least 4)."""
    fam = family_of(model)
    return min(int(fam.gen_layout(model, p, s).patch_positions.numel()) for p in fam.hook_points(model)
               for s in (*p.scans, *(m for m in p.matmuls if m.attention)))


def family_gen_losses(model: nn.Module, x: Tensor, targets: Tensor, cfg: GenConfig, *,
                      point_loss=point_contrastive_loss) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (L^C, L^O) (each (B,)) and the logits, for a model of any family (module docstring).
    The model's forward is the family's `gen_forward`; L^C of each hook point is computed right after
    that point has run, from what its scans recorded (`point_loss`: the fast form by default)."""
    fam = family_of(model)
    want_c = cfg.w_contrastive > 0
    points = fam.hook_points(model)
    layouts = {p.index: [fam.gen_layout(model, p, s) for s in p.scans] for p in points}
    att_sites = {p.index: [m for m in p.matmuls if m.attention] for p in points}
    att_layouts = {p.index: [fam.gen_layout(model, p, m) for m in att_sites[p.index]] for p in points}
    sinks: dict[int, list[ScanRecord]] = {p.index: [] for p in points}
    att_sinks: dict[int, list[Tensor]] = {p.index: [] for p in points}
    lcs: list[Tensor] = []
    batch = x.shape[0]

    def after(point: HookPoint) -> None:
        recs = sinks[point.index]
        if point.scans:
            by_dir = {r.direction: r for r in recs}
            ordered = [by_dir[s.direction] for s in point.scans]
            lcs.append(_per_image(point_loss(ordered, list(point.scans), layouts[point.index], cfg), batch))
        for probs, lay in zip(att_sinks[point.index], att_layouts[point.index]):
            lcs.append(_per_image(attention_contrastive_loss(probs, lay, cfg), batch))
        recs.clear()
        att_sinks[point.index].clear()

    def make(p: HookPoint) -> dict:
        hooks = {"scan": _Recorder(p, sinks[p.index])}
        if att_sites[p.index]:
            hooks["matmul"] = _MatmulRecorder(p, att_sinks[p.index])
        return hooks

    if want_c:
        with override_ops(model, make):
            logits = fam.gen_forward(model, x, after)
        lc = torch.stack(lcs).mean(0)
    else:
        logits = model(x)
        lc = logits.new_zeros(x.shape[0])
    lo = F.cross_entropy(logits, targets, reduction="none")
    return lc, lo, logits


def family_gen_losses_ref(model: nn.Module, x: Tensor, targets: Tensor, cfg: GenConfig) -> tuple[Tensor, Tensor, Tensor]:
    """`family_gen_losses` with the `_ref` twin of each hook point's L^C (tests, tools/gen_cost.py)."""
    return family_gen_losses(model, x, targets, cfg, point_loss=point_contrastive_loss_ref)
