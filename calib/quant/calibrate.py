"""`calibrate(model, recipe, forward_loop)`: static init, then block-wise sequential scale tuning.

The calibration data never enters this module: `forward_loop(model)` runs the calibration images
through the model it is given (ModelOpt style), and the inputs of the first block are captured.

Per block l, in order (ALGORITHMS.md §1.2, "Block-wise scale tuning"):
    target   = mixer output of FP block l on the FP input (the FP chain)
    q input  = output of the already-quantized blocks 0..l-1 (the quantized chain, residual included)
    1. observe: the block runs in FP on the q input, every quantizer records its input;
       init_from_stats: static initialisation (per-time-step L_p grid search, p = calib.lp_norm)
    2. tune: AdamW on the quantizers' learnable tensors, `calib.steps` steps, one random minibatch
       of `calib.batch_size` images per step, loss on the mixer output only (not the residual)
    3. freeze, then run the quantized block to produce the next block's q input.
Deterministic under `seed` (minibatches are drawn from a seeded generator; CPU arithmetic).
"""
from __future__ import annotations

import math

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ouro.recipes import Recipe

from ..models.vim import VisionMamba
from .base import LOSSES, QuantizedModel, QuantMode, get_method, iter_quantizers, quantize_model, set_quant_mode

__all__ = ["calibrate", "capture_block_inputs", "ForwardLoop", "intra_op_threads", "small_work_threads"]

ForwardLoop = Callable[[nn.Module], None]
CHUNK = 64  # images per no-grad forward chunk (memory bound, not numerics)


def capture_block_inputs(model: VisionMamba, forward_loop: ForwardLoop) -> Tensor:
    """Run `forward_loop(model)` and return the inputs of the first block, (N, L, d_model)."""
    got: list[Tensor] = []

    def hook(_mod, args):
        got.append(args[0].detach().float())

    h = model.layers[0].register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        h.remove()
    if not got:
        raise ValueError("forward_loop(model) ran no images through the model; it must call model(images) at least once")
    return torch.cat(got, 0)


def _run_block(blk: nn.Module, h: Tensor, r: Tensor | None) -> tuple[Tensor, Tensor]:
    outs, ress = [], []
    with torch.no_grad():
        for i in range(0, h.shape[0], CHUNK):
            o, res = blk(h[i : i + CHUNK], None if r is None else r[i : i + CHUNK])
            outs.append(o.float())
            ress.append(res)
    return torch.cat(outs), torch.cat(ress)


SMALL_WORK_NUMEL = 1 << 22
"""Below this many activation elements per chunk the calibration runs with one intra-op thread:
its many small ops lose more to thread hand-offs than they gain (measured 10x on a loaded 2-core
host with the demo model). The choice depends only on the model and CHUNK, so a run stays
deterministic; different thread counts may differ in the last bits of fp32 reductions."""


def small_work_threads(model: VisionMamba, batch: int = CHUNK) -> int | None:
    """1 for a model whose per-chunk activations are small (see SMALL_WORK_NUMEL), else None (keep)."""
    cfg = model.cfg
    return 1 if batch * cfg.seq_len * cfg.embed_dim * cfg.expand < SMALL_WORK_NUMEL else None


@contextmanager
def intra_op_threads(n: int | None):
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def calibrate(
    model: VisionMamba,
    recipe: Recipe,
    forward_loop: ForwardLoop,
    *,
    seed: int = 0,
    progress: bool = True,
) -> QuantizedModel:
    """Calibrate a quantized copy of `model` under `recipe`; `model` itself is left untouched.

    Returns the `QuantizedModel` (quantizers frozen, mode QUANT, eval()): the fake-quant module, its
    recipe, the block losses and the method's info. Save it with `ouro.calib.quant.save_quant_state`."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be an ouro.recipes.Recipe, got {type(recipe).__name__}")
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)  # minibatch draws: on the CPU, the same on every device
    model.eval()
    spec = get_method(recipe.method)
    loss_fn = LOSSES[spec.loss or recipe.calib.loss]
    x0 = capture_block_inputs(model, forward_loop)
    with intra_op_threads(small_work_threads(model)):
        return _calibrate(model, recipe, x0, gen, loss_fn, spec, progress)


def _calibrate(model, recipe, x0, gen, loss_fn, spec, progress) -> QuantizedModel:
    c = recipe.calib
    qm = quantize_model(model, recipe)
    qmodel = qm.module
    qmodel.eval()
    n = x0.shape[0]
    fp_h, fp_r = x0, None
    q_h, q_r = x0, None
    bar = tqdm(range(len(model.layers)), desc=f"calibrate {recipe.name}", unit="block", disable=not progress)
    losses: list[float] = []
    for i in bar:
        fblk, qblk = model.layers[i], qmodel.layers[i]
        ops = qblk.mixer.quant
        fp_out, fp_res = _run_block(fblk, fp_h, fp_r)
        # 1. static init
        m = min(n, c.init_samples)
        set_quant_mode(ops, QuantMode.OBSERVE)
        _run_block(qblk, q_h[:m], None if q_r is None else q_r[:m])
        for _, q in iter_quantizers(ops):
            q.init_from_stats(c)
            q.clear_observed()
        set_quant_mode(ops, QuantMode.QUANT)
        # 2. block-wise tuning
        groups: dict[str, list[nn.Parameter]] = {}
        for _, q in iter_quantizers(ops):
            for g, ps in q.param_groups().items():
                groups.setdefault(g, []).extend(ps)
        last = float("nan")
        if c.steps > 0 and groups:
            opt = torch.optim.AdamW(
                [{"params": ps, "lr": spec.lr(g, c)} for g, ps in groups.items()], weight_decay=c.weight_decay
            )
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.steps) if spec.cosine_lr else None
            params = [p for ps in groups.values() for p in ps]
            for _step in range(c.steps):
                idx = torch.randperm(n, generator=gen, device="cpu")[: c.batch_size].to(q_h.device)
                out, _ = qblk(q_h[idx], None if q_r is None else q_r[idx])
                loss = loss_fn(fp_out[idx], out)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
                opt.step()
                if sched is not None:
                    sched.step()
                for _, q in iter_quantizers(ops):
                    q.project_()
                last = float(loss.detach())
        for _, q in iter_quantizers(ops):
            q.freeze()
        # 3. the quantized chain
        q_h, q_r = _run_block(qblk, q_h, q_r)
        fp_h, fp_r = fp_out, fp_res
        losses.append(last)
        bar.set_postfix(block=i, loss=f"{last:.4g}" if math.isfinite(last) else "n/a (no tuning)")
    set_quant_mode(qmodel, QuantMode.QUANT)
    info = spec.info(qmodel, recipe) if spec.info is not None else {}
    return QuantizedModel(qmodel, recipe, tuple(losses), info)
