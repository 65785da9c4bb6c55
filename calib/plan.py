"""The run plan: one line printed before any long work, with a time estimate from a short warm-up.

    plan = RunPlan(model=..., recipe=..., calibration=..., device=..., outputs=..., estimate=Estimate(...))
    print(plan.line())

Estimates come from timing the real code on a few images (`measure_gen_step`, `measure_calibration_block`,
`measure_forward`) and scaling by the work the run will do; they are rough (mini-batches amortise
better than the warm-up's single images, so they lean high) and are printed as such.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .device import module_device, synchronize

__all__ = ["Estimate", "RunPlan", "format_duration", "measure_gen_step", "measure_calibration_block", "measure_forward",
           "estimate_gen", "estimate_calibration", "estimate_eval"]

WARMUP_IMAGES = 1
"""Images of the warm-up measurements (one Gen step, one calibration block, one forward)."""


def format_duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    h, m = divmod(round(s / 60), 60)
    return f"{h} h {m:02d} min"


@dataclass(frozen=True)
class Estimate:
    """Seconds per stage (only the stages the run has), from a measured warm-up."""

    parts: tuple[tuple[str, float], ...] = ()
    warmup: str = ""

    @property
    def total(self) -> float:
        return sum(s for _, s in self.parts)

    def describe(self) -> str:
        if not self.parts:
            return "a few seconds (no Gen, calibration or evaluation)"
        detail = ", ".join(f"{k} {format_duration(v)}" for k, v in self.parts)
        return f"~{format_duration(self.total)} ({detail}; from {self.warmup})"


@dataclass(frozen=True)
class RunPlan:
    """What a run will do. `line()` is the one line printed before the work starts."""

    model: str
    device: str
    outputs: tuple[str, ...] = ()
    recipe: str | None = None
    calibration: str | None = None
    evaluation: str | None = None
    processes: int = 1
    estimate: Estimate = field(default_factory=Estimate)
    otherwise: str = ""

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")

    def line(self) -> str:
        parts = [f"model {self.model}"]
        parts.append(f"recipe {self.recipe}" if self.recipe else "FP (no quantization)")
        if self.calibration:
            parts.append(f"calibration: {self.calibration}")
        if self.evaluation:
            parts.append(f"evaluation: {self.evaluation}")
        dev = self.device + (f" x {self.processes} processes" if self.processes > 1 else "")
        parts.append(f"device {dev}")
        parts.append("outputs " + (", ".join(self.outputs) if self.outputs else "none (dry run prints this plan only)"))
        parts.append(f"estimate {self.estimate.describe()}")
        if self.otherwise:
            parts.append(f"otherwise: {self.otherwise}")
        return "plan: " + " | ".join(parts)


# ------------------------------------------------------------------------------------ warm-ups
def _timed(fn, dev: torch.device) -> float:
    synchronize(dev)
    t0 = time.perf_counter()
    fn()
    synchronize(dev)
    return time.perf_counter() - t0


def _images(model: nn.Module, n: int) -> torch.Tensor:
    c = model.cfg
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(n, c.in_chans, c.img_size, c.img_size, generator=g, device="cpu").to(module_device(model))


def measure_gen_step(model: nn.Module, cfg, images: int = WARMUP_IMAGES) -> float:
    """Seconds of one OuroMamba-Gen step (forward and backward of both losses) per image, measured on
    `images` images after one untimed step (with Gen's thread policy)."""
    from .families.base import family_of
    from .gen.generate import gen_threads
    from .quant.calibrate import intra_op_threads

    gen_losses = family_of(model).gen_losses
    dev = module_device(model)
    x0 = _images(model, images)
    t = torch.zeros(images, dtype=torch.long, device=dev)
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)

    def step():
        x = x0.clone().requires_grad_(True)
        lc, lo, _ = gen_losses(model, x, t, cfg)
        (lc + lo).sum().backward()

    try:
        with intra_op_threads(gen_threads(model)):
            step()
            return _timed(step, dev) / images
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)


def measure_forward(model: nn.Module, images: int = WARMUP_IMAGES) -> float:
    """Seconds of one no-grad forward per image (with evaluation's thread policy)."""
    from .evaluation import EVAL_BATCH
    from .quant.calibrate import intra_op_threads, small_work_threads

    dev = module_device(model)
    x = _images(model, images)
    with torch.no_grad(), intra_op_threads(small_work_threads(model, EVAL_BATCH) if dev.type == "cpu" else None):
        model(x)
        return _timed(lambda: model(x), dev) / images


def measure_calibration_block(model: nn.Module, recipe, images: int = 2) -> dict[str, float]:
    """Per-image seconds of the pieces of one calibration unit, measured on unit 0 (the model family's
    first block) with a few images: fp (FP unit forward), observe (forward while observing), init
    (static init, per observed image), step (quantized forward + backward)."""
    from .quant.calibrate import intra_op_threads, small_work_threads

    with intra_op_threads(small_work_threads(model)):
        return _measure_calibration_block(model, recipe, images)


def _measure_calibration_block(model: nn.Module, recipe, images: int) -> dict[str, float]:
    from .families.base import family_of
    from .quant.base import QuantMode, iter_quant_points, iter_quantizers, quantize_model, set_quant_mode
    from .quant.calibrate import capture_unit_inputs

    dev = module_device(model)
    fam = family_of(model)
    x = _images(model, images)
    state = capture_unit_inputs(model, lambda m: m(x))
    qmodule = quantize_model(model, recipe).module
    fp_unit, q_unit = fam.units(model)[0], fam.units(qmodule)[0]
    unit_ops = [ops for point, ops in iter_quant_points(qmodule) if point.unit == 0]

    def modes(mode):
        for ops in unit_ops:
            set_quant_mode(ops, mode)

    out: dict[str, float] = {}
    with torch.no_grad():
        fp_unit.run(state)
        out["fp"] = _timed(lambda: fp_unit.run(state), dev) / images
        modes(QuantMode.OBSERVE)
        out["observe"] = _timed(lambda: q_unit.run(state), dev) / images

    def init():
        for ops in unit_ops:
            for _, q in iter_quantizers(ops):
                q.init_from_stats(recipe.calib)
                q.clear_observed()

    out["init"] = _timed(init, dev) / images
    modes(QuantMode.QUANT)

    def step():
        o = fam.unit_target(state, q_unit.run(state))
        if o.requires_grad:  # methods without trainable scales (minmax, percentile) have no backward
            o.float().pow(2).mean().backward()

    step()
    out["step"] = _timed(step, dev) / images
    return out


# ------------------------------------------------------------------------------------ estimates
def estimate_gen(model: nn.Module, n: int, cfg, processes: int = 1) -> tuple[str, float]:
    per = measure_gen_step(model, cfg)
    return "Gen", per * n * cfg.iterations / processes


def estimate_calibration(model: nn.Module, recipe, n: int) -> tuple[str, float]:
    """calibrate(): per block, the FP chain and the quantized chain over all n images, the observed
    init_samples, the static init, and calib.steps tuning steps of calib.batch_size images."""
    c = recipe.calib
    m = measure_calibration_block(model, recipe)
    seen = min(n, c.init_samples)
    per_block = (m["fp"] * 2 * n + m["observe"] * seen + m["init"] * seen
                 + (c.steps * m["step"] * min(n, c.batch_size) if c.steps else 0.0))
    from .families.base import family_of

    return "calibration", per_block * len(family_of(model).units(model))


def estimate_eval(model: nn.Module, n_images: int, passes: int, processes: int = 1) -> tuple[str, float]:
    return "evaluation", measure_forward(model) * n_images * passes / processes
