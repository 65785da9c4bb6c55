"""OuroMamba-Gen's losses: per image L^C (contrastive, on the enhanced implicit attention) and L^O.

    lc, lo, logits = gen_losses(model, x, targets, cfg)        # the fast path
    lc, lo, logits = gen_losses_ref(model, x, targets, cfg)    # the previous implementation (the twin)

Both mirror VisionMamba.forward_features block by block (tests check the logits equal model(x)) and
give the same values to fp32 rounding (tests/unit/test_gen.py, tools/gen_cost.py):

    L^C = mean over layers l and patches t of the InfoNCE on the rows (t, :) of the enhanced attention,
          averaged over the channels and the two scan directions
    L^O = cross-entropy(logits, targets)

`gen_losses_ref` forms each layer's rows with `attention.implicit_attention` (the whole L x L
per-channel-chunk GEMM, with the dense neighbour mix), and checkpoints each block together with its
L^C. `gen_losses` forms them with `features.enhanced_attention` (blocked causal GEMM with the factored
backward, neighbour mix as one GEMM) and, when memory asks for it, checkpoints only the model's block
and the cheap readout: the state attention E (B, S, L, L) is kept, so its forward runs once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import contrastive_loss, effective_topk, implicit_attention, neighbourhood_weights, patch_token_index
from .config import CHECKPOINT_AUTO_BYTES, GenConfig
from .features import enhanced_rows, state_attention
from .instrument import ScanRecord, hook_mixer

__all__ = ["Checkpointing", "checkpointing", "gen_losses", "gen_losses_ref", "layer_contrastive_loss", "layer_contrastive_loss_ref",
           "use_checkpoint", "activation_bytes", "activation_bytes_ref"]


# --------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class Checkpointing:
    """What `gen_losses` recomputes in the backward pass instead of keeping: the model's blocks
    (their activations, ~16 fp32 tensors of B*L*d_inner a layer) and/or the L^C readout (~2 tensors
    of B*S*L*L a direction; the state attention E itself is always kept: its forward is the costly part)."""

    block: bool = False
    rows: bool = False


def _block_bytes(model: nn.Module, batch: int) -> int:
    m = model.cfg
    return 4 * m.depth * batch * 16 * m.seq_len * m.d_inner


def _attention_bytes(model: nn.Module, batch: int, per_direction: int) -> int:
    m = model.cfg
    return 4 * m.depth * batch * 2 * per_direction * m.d_state * m.seq_len**2


def activation_bytes(model: nn.Module, batch: int) -> int:
    """Estimated activation memory of `gen_losses` on one mini-batch without checkpointing."""
    return _block_bytes(model, batch) + _attention_bytes(model, batch, 3)


def activation_bytes_ref(model: nn.Module, batch: int) -> int:
    """The same for `gen_losses_ref`: about 12 fp32 tensors of B*L*d_inner*d_state per layer and
    direction (measured on the demo model)."""
    m = model.cfg
    return 12 * 2 * m.depth * batch * m.seq_len * m.d_inner * m.d_state * 4


def checkpointing(model: nn.Module, batch: int, cfg: GenConfig) -> Checkpointing:
    """cfg.checkpoint True / False: recompute both / neither; None: the least recomputation whose
    estimated activation memory stays under CHECKPOINT_AUTO_BYTES (readout first, it is cheap)."""
    if cfg.checkpoint is not None:
        return Checkpointing(cfg.checkpoint, cfg.checkpoint)
    if activation_bytes(model, batch) <= CHECKPOINT_AUTO_BYTES:
        return Checkpointing(False, False)
    if _block_bytes(model, batch) + _attention_bytes(model, batch, 1) <= CHECKPOINT_AUTO_BYTES:
        return Checkpointing(False, True)
    return Checkpointing(True, True)


def use_checkpoint(model: nn.Module, batch: int, cfg: GenConfig, *, ref: bool = False) -> bool:
    """Whether any checkpointing is on (for the `_ref` path: its single switch)."""
    if ref:
        if cfg.checkpoint is not None:
            return cfg.checkpoint
        return activation_bytes_ref(model, batch) > CHECKPOINT_AUTO_BYTES
    c = checkpointing(model, batch, cfg)
    return c.block or c.rows


# ------------------------------------------------------------------------------------- fast path
def _rows(E: Tensor, dt: Tensor, Bm: Tensor, Cm: Tensor, grid: int, cls: int, p: int) -> Tensor:
    return enhanced_rows(E, dt, Bm, Cm, grid, cls, p)


def layer_contrastive_loss(records: list[ScanRecord], grid: int, cls_position: int, cfg: GenConfig, *,
                           recompute: bool = False) -> Tensor:
    """L^C of one layer (B,): InfoNCE on the enhanced attention rows of the patches, averaged over the
    channels and the two scan directions (each direction's neighbour weights from its own Delta).
    recompute: checkpoint the readout (E is kept; the readout is cheap to redo)."""
    feats = None
    for r in records:
        E = state_attention(r.dt, r.A.detach(), reverse=r.direction == "bwd", block=cfg.attn_block)
        args = (E, r.dt, r.Bm, r.Cm, grid, cls_position, cfg.neighbourhood)
        a = checkpoint(_rows, *args, use_reentrant=False) if recompute and torch.is_grad_enabled() else _rows(*args)
        feats = a if feats is None else feats + a
    return contrastive_loss(feats / len(records), effective_topk(cfg.topk, grid * grid), cfg.tau)


def _block_records(blk: nn.Module, layer: int, hidden: Tensor, residual: Tensor | None):
    """The block's outputs and, per scan direction, (dt, A, Bm, Cm) as flat tensors (checkpointable)."""
    records: list[ScanRecord] = []
    with hook_mixer(blk.mixer, layer, records):
        hidden, residual = blk(hidden, residual)
    flat = [t for r in records for t in (r.dt, r.A, r.Bm, r.Cm)]
    return (hidden, residual, *flat)


def gen_losses(model: nn.Module, x: Tensor, targets: Tensor, cfg: GenConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (L^C, L^O) (each (B,)) and the logits (module docstring)."""
    mcfg = model.cfg
    want_c = cfg.w_contrastive > 0
    ck = checkpointing(model, x.shape[0], cfg) if torch.is_grad_enabled() else Checkpointing()
    hidden, residual = model.embed(x), None
    lcs = []
    for i, blk in enumerate(model.layers):
        if ck.block:
            out = checkpoint(_block_records, blk, i, hidden, residual, use_reentrant=False)
        else:
            out = _block_records(blk, i, hidden, residual)
        hidden, residual, flat = out[0], out[1], out[2:]
        if want_c:
            recs = [ScanRecord(i, d, None, *flat[4 * j:4 * j + 4], None) for j, d in enumerate(("fwd", "bwd"))]
            lcs.append(layer_contrastive_loss(recs, mcfg.grid, mcfg.cls_position, cfg, recompute=ck.rows))
        else:
            lcs.append(hidden.new_zeros(hidden.shape[0]))
    residual = residual + hidden.float()
    logits = model.head(model.norm_f(residual)[:, mcfg.cls_position])
    lo = F.cross_entropy(logits, targets, reduction="none")
    return torch.stack(lcs).mean(0), lo, logits


# ------------------------------------------------------------------------------- reference twin
def layer_contrastive_loss_ref(records: list[ScanRecord], grid: int, cls_position: int, cfg: GenConfig) -> Tensor:
    """`layer_contrastive_loss` by `implicit_attention` with the dense neighbour mix (the previous code)."""
    feats = None
    rows = patch_token_index(grid, cls_position, records[0].dt.device)
    for r in records:
        W = neighbourhood_weights(r.dt, grid, cls_position, cfg.neighbourhood)
        a = implicit_attention(
            r.dt, r.A, r.Bm, r.Cm, reverse=r.direction == "bwd", mix=W, rows=rows,
            chunk_elems=cfg.attn_chunk_elems, use_checkpoint=cfg.checkpoint,
        )
        feats = a if feats is None else feats + a
    P = grid * grid
    return contrastive_loss(feats / len(records), effective_topk(cfg.topk, P), cfg.tau)


def _block_step_ref(blk: nn.Module, layer: int, hidden: Tensor, residual: Tensor | None, grid: int, cls: int, cfg: GenConfig,
                    want_c: bool):
    records: list[ScanRecord] = []
    with hook_mixer(blk.mixer, layer, records):
        hidden, residual = blk(hidden, residual)
    lc = layer_contrastive_loss_ref(records, grid, cls, cfg) if want_c else hidden.new_zeros(hidden.shape[0])
    return hidden, residual, lc


def gen_losses_ref(model: nn.Module, x: Tensor, targets: Tensor, cfg: GenConfig) -> tuple[Tensor, Tensor, Tensor]:
    """`gen_losses` as it was before the fast path: each block and its L^C checkpointed together."""
    mcfg = model.cfg
    want_c = cfg.w_contrastive > 0
    ck = use_checkpoint(model, x.shape[0], cfg, ref=True)
    cfg = cfg.replace(checkpoint=ck)
    hidden, residual = model.embed(x), None
    lcs = []
    for i, blk in enumerate(model.layers):
        args = (blk, i, hidden, residual, mcfg.grid, mcfg.cls_position, cfg, want_c)
        if ck and torch.is_grad_enabled():
            hidden, residual, lc = checkpoint(_block_step_ref, *args, use_reentrant=False)
        else:
            hidden, residual, lc = _block_step_ref(*args)
        lcs.append(lc)
    residual = residual + hidden.float()
    logits = model.head(model.norm_f(residual)[:, mcfg.cls_position])
    lo = F.cross_entropy(logits, targets, reduction="none")
    return torch.stack(lcs).mean(0), lo, logits
