"""`calibrate(model, recipe, forward_loop)`: static init, then block-wise sequential scale tuning.

The calibration data never enters this module: `forward_loop(model)` runs the calibration images
through the model it is given (ModelOpt style), and the inputs of the first calibration unit are
captured. The units (blocks), their loss target and the FP glue between them come from the model's
family (ouro.calib.families: Vim's blocks, VMamba's VSSBlocks with the downsampling between stages).

Per unit l, in order (ALGORITHMS.md §1.2, "Block-wise scale tuning"):
    target   = the family's unit target of FP unit l on the FP input (the FP chain): Vim's mixer
               output, VMamba's residual branches (block output - input)
    q input  = output of the already-quantized units 0..l-1 (the quantized chain, residual included)
    1. observe: the unit runs in FP on the q input, every quantizer of its hook points records its
       input; init_from_stats: static initialisation (per-time-step L_p grid search, p = calib.lp_norm)
    2. tune: AdamW on the quantizers' learnable tensors, `calib.steps` steps, one random minibatch
       of `calib.batch_size` images per step, loss on the unit target (not the residual stream)
    3. freeze, then run the quantized unit (and the glue after it) to produce the next unit's q input.
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

from ..families.base import Unit, family_of
from .base import LOSSES, QuantizedModel, QuantMode, get_method, iter_quant_points, iter_quantizers, quantize_model, set_quant_mode

__all__ = ["calibrate", "capture_block_inputs", "capture_unit_inputs", "run_unit", "ForwardLoop", "intra_op_threads",
           "small_work_threads"]

ForwardLoop = Callable[[nn.Module], None]
CHUNK = 64  # images per no-grad forward chunk (memory bound, not numerics)
State = tuple


def capture_unit_inputs(model: nn.Module, forward_loop: ForwardLoop) -> State:
    """Run `forward_loop(model)` and return the input state of the first calibration unit (the
    positional inputs of the family's `entry` module, concatenated over the calls; None stays None)."""
    got: list[tuple] = []

    def hook(_mod, args):
        got.append(tuple(a.detach().float() if isinstance(a, Tensor) else a for a in args))

    h = family_of(model).entry(model).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        h.remove()
    if not got:
        raise ValueError("forward_loop(model) ran no images through the model; it must call model(images) at least once")
    return tuple(torch.cat([g[i] for g in got], 0) if isinstance(got[0][i], Tensor) else None for i in range(len(got[0])))


def capture_block_inputs(model: nn.Module, forward_loop: ForwardLoop) -> Tensor:
    """Run `forward_loop(model)` and return the first unit's input tensor, (N, ...) (Vim: (N, L, d_model))."""
    return capture_unit_inputs(model, forward_loop)[0]


def _take(state: State, idx) -> State:
    return tuple(None if s is None else s[idx] for s in state)


def run_unit(unit: Unit, state: State, *, target=None) -> tuple[State, Tensor | None]:
    """The unit's output state on `state`, in no-grad chunks of CHUNK images, and (given `target`,
    the family's unit_target) the loss target of each chunk, concatenated."""
    outs, targets = [], []
    n = next(s for s in state if s is not None).shape[0]
    with torch.no_grad():
        for i in range(0, n, CHUNK):
            inp = _take(state, slice(i, i + CHUNK))
            out = unit.run(inp)
            outs.append(out)
            if target is not None:
                targets.append(target(inp, out).float())
    cat = tuple(None if outs[0][k] is None else torch.cat([o[k] for o in outs]) for k in range(len(outs[0])))
    return cat, (torch.cat(targets) if target is not None else None)


SMALL_WORK_NUMEL = 1 << 22
"""Below this many activation elements per chunk the calibration runs with one intra-op thread:
its many small ops lose more to thread hand-offs than they gain (measured 10x on a loaded 2-core
host with the demo model). The choice depends only on the model and CHUNK, so a run stays
deterministic; different thread counts may differ in the last bits of fp32 reductions."""


def small_work_threads(model: nn.Module, batch: int = CHUNK) -> int | None:
    """1 for a model whose per-chunk activations are small (see SMALL_WORK_NUMEL), else None (keep)."""
    return 1 if batch * family_of(model).work_numel(model.cfg) < SMALL_WORK_NUMEL else None


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
    model: nn.Module,
    recipe: Recipe,
    forward_loop: ForwardLoop,
    *,
    seed: int = 0,
    progress: bool = True,
) -> QuantizedModel:
    """Calibrate a quantized copy of `model` (any registered family) under `recipe`; `model` itself is
    left untouched.

    Returns the `QuantizedModel` (quantizers frozen, mode QUANT, eval()): the fake-quant module, its
    recipe, the unit losses and the method's info. Save it with `ouro.calib.quant.save_quant_state`."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be an ouro.recipes.Recipe, got {type(recipe).__name__}")
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)  # minibatch draws: on the CPU, the same on every device
    model.eval()
    spec = get_method(recipe.method)
    loss_fn = LOSSES[spec.loss or recipe.calib.loss]
    x0 = capture_unit_inputs(model, forward_loop)
    with intra_op_threads(small_work_threads(model)):
        return _calibrate(model, recipe, x0, gen, loss_fn, spec, progress)


def _calibrate(model, recipe, x0, gen, loss_fn, spec, progress) -> QuantizedModel:
    c = recipe.calib
    fam = family_of(model)
    qm = quantize_model(model, recipe)
    qmodel = qm.module
    qmodel.eval()
    fp_units, q_units = fam.units(model), fam.units(qmodel)
    by_unit: dict[int, list] = {}
    for point, ops in iter_quant_points(qmodel):
        by_unit.setdefault(point.unit, []).append(ops)
    n = x0[0].shape[0]
    fp_state = q_state = x0
    bar = tqdm(range(len(fp_units)), desc=f"calibrate {recipe.name}", disable=not progress, leave=False)
    losses: list[float] = []
    for i in bar:
        fu, qu = fp_units[i], q_units[i]
        unit_ops = by_unit.get(i, [])
        quantizers = [q for ops in unit_ops for _, q in iter_quantizers(ops)]
        fp_out, fp_target = run_unit(fu, fp_state, target=fam.unit_target)
        # 1. static init
        m = min(n, c.init_samples)
        for ops in unit_ops:
            set_quant_mode(ops, QuantMode.OBSERVE)
        run_unit(qu, _take(q_state, slice(0, m)))
        for q in quantizers:
            q.init_from_stats(c)
            q.clear_observed()
        for ops in unit_ops:
            set_quant_mode(ops, QuantMode.QUANT)
        # 2. block-wise tuning
        groups: dict[str, list[nn.Parameter]] = {}
        for q in quantizers:
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
                idx = torch.randperm(n, generator=gen, device="cpu")[: c.batch_size].to(fp_target.device)
                inp = _take(q_state, idx)
                loss = loss_fn(fp_target[idx], fam.unit_target(inp, qu.run(inp)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
                opt.step()
                if sched is not None:
                    sched.step()
                for q in quantizers:
                    q.project_()
                last = float(loss.detach())
        for q in quantizers:
            q.freeze()
        # 3. the quantized chain
        q_out, _ = run_unit(qu, q_state)
        fp_state, q_state = fu.next_input(fp_out), qu.next_input(q_out)
        losses.append(last)
        bar.set_postfix(unit=i, loss=f"{last:.4g}" if math.isfinite(last) else "n/a (no tuning)")
    set_quant_mode(qmodel, QuantMode.QUANT)
    info = spec.info(qmodel, recipe) if spec.info is not None else {}
    return QuantizedModel(qmodel, recipe, tuple(losses), info)
