"""The runs of `ouro-export`, wired from typed requests (built by ouro.exporter.cli):

    export   load -> [evaluate FP] -> calibrate | load QuantState -> export -> check -> report
    gen      load -> OuroMamba-Gen into a folder (ouro.calib.gen.cli)
    compare  load -> every method x preset (ouro.calib.compare)

Each stage is a function of its inputs that returns its artifact (ouro.exporter.pipeline, outputs,
check); this module only orders them, prints the run plan first, and lets rank 0 alone write files
under torchrun (Gen, evaluation and compare are sharded over the processes).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ouro.calib.compare import CompareConfig
from ouro.calib.gen.cli import GenRequest

from .context import RunContext
from .run_config import ModelSource, RunConfig

__all__ = ["load_model", "model_label", "run_plan", "run_export", "run_gen", "run_compare"]


def load_model(source: ModelSource, ctx: RunContext) -> nn.Module:
    """The FP model of `source` on ctx.device (timed as "load")."""
    with ctx.stage("load"):
        return source.load(ctx.device)


def model_label(model: nn.Module, source: ModelSource) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{model.cfg.name} ({n / 1e6:.3g}M params, {source.describe()})"


def _folder_count(d) -> int:
    from ouro.calib.imagefolder import count_image_files

    try:
        return count_image_files(d)
    except ValueError:
        return 0


def _eval_count(cfg: RunConfig) -> int:
    if cfg.eval.eval_dir is not None:
        return _folder_count(cfg.eval.eval_dir)
    if cfg.eval.demo:
        from ouro.calib.data import SPLIT_SIZES

        return SPLIT_SIZES["test"]
    return 0


def run_plan(cfg: RunConfig, model: nn.Module, ctx: RunContext):
    """The RunPlan of an export run (ouro.calib.plan), its estimate measured by a short warm-up."""
    from ouro.calib.device import describe_device
    from ouro.calib.plan import Estimate, RunPlan, estimate_calibration, estimate_eval, estimate_gen

    procs, quantized, src = ctx.dist.world_size, cfg.quantized, cfg.calib
    parts, calib, evaluation, warm = [], None, None, []
    if quantized and cfg.load_calib is not None:
        calib = f"QuantState {cfg.load_calib} (no calibration)"
    elif quantized:
        n = src.spec.n
        if src.spec.kind == "synthetic":
            calib = f"OuroMamba-Gen, {n} synthetic images, seed {src.seed}"
            parts.append(estimate_gen(model, n, src.gen, procs))
            warm.append("1 Gen step")
        elif src.spec.kind == "real":
            calib = f"demo calibration split, {n} real images, seed {src.seed}"
        else:
            n = n or _folder_count(src.calib_dir)
            kind = "synthetic images" if (Path(src.calib_dir) / "images.npz").is_file() else "images"
            calib = f"folder {src.calib_dir} ({n} {kind})"
        parts.append(estimate_calibration(model, cfg.recipe, n or 128))
        warm.append("1 block of calibration")
    eval_n = _eval_count(cfg)
    if eval_n and (cfg.eval.print_fp or quantized):
        where = f"--eval-dir {cfg.eval.eval_dir}" if cfg.eval.eval_dir is not None else "demo test split"
        evaluation = f"{eval_n} images ({where})"
        parts.append(estimate_eval(model, eval_n, 1 + 2 * int(quantized), procs))
        warm.append("1 forward")
    other = []
    if quantized and cfg.load_calib is None:
        if src.calib_dir is None:
            other.append("--calib-dir DIR (real images)")
        if not (src.explicit and src.spec.kind == "synthetic"):
            other.append("--calib synthetic:N")
        if cfg.model.is_demo and not (src.explicit and src.spec.kind == "real"):
            other.append("--calib real:N (the demo's split)")
    if ctx.device.type == "cpu":
        other.append("--device cuda (a GPU)")
    recipe = (f"{cfg.recipe.name} ({cfg.recipe.method.value})" if quantized and cfg.recipe else
              ("from the QuantState" if quantized else None))
    return RunPlan(model=model_label(model, cfg.model), recipe=recipe, calibration=calib, evaluation=evaluation,
                   device=describe_device(ctx.device), processes=procs,
                   outputs=tuple(str(o.path) for o in cfg.outputs.outputs), estimate=Estimate(tuple(parts), " + ".join(warm)),
                   otherwise=", ".join(other))


def run_export(cfg: RunConfig) -> int:
    """The main job: every stage in order (DESIGN.md §1)."""
    from .pipeline import evaluate_fp, load_evaluation, quantize, write_report

    ctx = RunContext.start(cfg.device)
    model = load_model(cfg.model, ctx)
    plan = run_plan(cfg, model, ctx)
    if ctx.is_main:
        print(plan.line(), flush=True)
    if cfg.dry_run:
        return 0
    data = None
    if cfg.eval.print_fp or cfg.quantized:
        data = load_evaluation(cfg.eval.source(model.cfg.img_size), ctx.dist)
    fp_pred = evaluate_fp(model, data, ctx) if cfg.eval.print_fp else None
    qmodel = None
    if cfg.quantized:
        qmodel = quantize(model, recipe=cfg.recipe, calib=cfg.calib, load_calib=cfg.load_calib,
                          save_calib=cfg.outputs.save_calib, force=cfg.outputs.force, data=data, fp_pred=fp_pred, ctx=ctx)
    if not ctx.is_main:  # rank 0 writes, checks and reports
        return 0
    from .outputs import ExportedGraphs

    graphs = ExportedGraphs(model, qmodel, cfg.export, ctx)
    for out in cfg.outputs.outputs:
        out.write(graphs, cfg.engine, ctx)
    if cfg.check:
        from .check import CheckFailed, check_images, run_check

        if data is None:  # --check scores the first evaluation images, else --calib-dir's, else noise
            data = load_evaluation(cfg.eval.source(model.cfg.img_size), ctx.dist)
        try:
            images, source = check_images(data, model, cfg.seed, calib_dir=cfg.calib.calib_dir if cfg.calib is not None else None)
            run_check(cfg.outputs.outputs, model, qmodel, images, fp16=cfg.export.fp16, ctx=ctx, images_source=source)
        except CheckFailed:
            if cfg.outputs.report is not None:
                write_report(ctx, cfg.outputs.report, force=cfg.outputs.force)
            raise
    if cfg.outputs.report is not None:
        write_report(ctx, cfg.outputs.report, force=cfg.outputs.force)
    return 0


def run_gen(source: ModelSource, device: str, req: GenRequest, *, dry_run: bool = False) -> int:
    """`ouro-export gen`: the run plan, then OuroMamba-Gen into req.output."""
    from ouro.calib.device import describe_device
    from ouro.calib.gen.cli import gen_main
    from ouro.calib.plan import Estimate, RunPlan, estimate_gen

    req.check_output()  # before any work
    ctx = RunContext.start(device)
    model = load_model(source, ctx)
    procs = ctx.dist.world_size
    plan = RunPlan(model=model_label(model, source), device=describe_device(ctx.device), processes=procs,
                   calibration=f"OuroMamba-Gen, {req.num_images} synthetic images, seed {req.seed}, G={req.config.iterations}",
                   outputs=(f"{req.output}/",), estimate=Estimate((estimate_gen(model, req.num_images, req.config, procs),),
                                                                "1 Gen step"),
                   otherwise="rerun the same command to resume an interrupted folder; torchrun --nproc-per-node K to share it out")
    if ctx.is_main:
        print(plan.line(), flush=True)
    if dry_run:
        return 0
    return gen_main(model, req, dist=ctx.dist)


def run_compare(source: ModelSource, device: str, cfg: CompareConfig) -> int:
    """`ouro-export compare`: every method x preset on the model of `source`."""
    from ouro.calib.compare import compare_main

    cfg.check_outputs()  # before any work
    ctx = RunContext.start(device)
    return compare_main(load_model(source, ctx), cfg, dist=ctx.dist)
