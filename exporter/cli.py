"""`ouro-export`: a thin shell that wires the pipeline stages and writes files.

    ouro-export CKPT|--demo [FAMILY] [--w4a4|--w4a8|--w6a6|--w8a8|--recipe R.toml] [--method M]
                [--calib real:N|synthetic:N] [--calib-dir DIR] [--device D] [--dry-run] -o OUT{.onnx,.qdq.onnx,.safetensors,.plan}
    ouro-export gen CKPT|--demo [FAMILY] -n 128 -o synth/ [--device D]
    ouro-export compare CKPT|--demo [FAMILY] [--calib-dir DIR --eval-dir DIR] [--device D]

Stages live in their owner modules (DESIGN.md §1); this file only parses, orders and reports.
Under torchrun every process runs the same command: Gen, evaluation and compare are sharded
(ouro.calib.distributed), and rank 0 alone prints the plan and writes files.
"""
from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PRESET_FLAGS = ("w4a4", "w4a8", "w6a6", "w8a8", "w6a4")


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""


@dataclass
class RunContext:
    """What the stages of one invocation share."""

    args: argparse.Namespace
    timings: dict[str, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    model: object = None  # FP model (torch)
    qmodel: object = None  # calibrated fake-quant model
    recipe: object = None
    device: object = None  # torch.device of the PyTorch stages (--device)
    dist: object = None  # ouro.calib.distributed.DistContext (torchrun)

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def stage(self, name: str):
        return _Timer(self, name)


class _Timer:
    def __init__(self, ctx: RunContext, name: str) -> None:
        self.ctx, self.name = ctx, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.ctx.timings[self.name] = round(time.perf_counter() - self.t0, 3)
        return False


# ------------------------------------------------------------------------------------ parsers
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="model checkpoint (.pth) of a known family (Vim, VMamba): the official "
                   "files ({'model': sd}, training dicts), {'state_dict': sd} or a bare state_dict")
    p.add_argument("--demo", nargs="?", const="vim", default=None, metavar="FAMILY",
                   help="use an embedded demo model trained on scikit-learn digits: the Vim demo, or --demo vmamba")
    p.add_argument("--arch", help="override the architecture inferred from the checkpoint (e.g. vim_small, vmamba_tiny; "
                   "an unknown name lists every known one)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration, generation and sampling (default 0)")
    p.add_argument("--allow-nonfinite", action="store_true", help="load a checkpoint even if some weights are NaN or Inf "
                   "(refused by default, naming the first bad tensor)")
    p.add_argument("--device", default="auto", help="where the PyTorch stages run: auto (a CUDA GPU when torch sees one, "
                   "else the CPU), cpu, cuda, cuda:N (default auto)")


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ouro-export",
        description="Vision Mamba (Vim, VMamba) checkpoint -> calibrated low-bit ONNX / TensorRT engine (OuroMamba and baselines).",
        epilog="Subcommands: `ouro-export gen ...` (synthetic calibration images), `ouro-export compare ...` (methods x bits table).",
    )
    _add_model_args(p)
    p.add_argument("-o", "--output", help="output file; the format follows the extension: .onnx, .qdq.onnx, .safetensors (QuantState), .plan")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--eval", action="store_true", help="print FP (and quantized) top-1 on the demo test split or --eval-dir")
    p.add_argument("--eval-dir", help="ImageNet-style folder (class subfolders) to evaluate on")
    p.add_argument("--fp16", action="store_true", help="FP export in float16 (default float32)")
    q = p.add_argument_group("quantization")
    g = q.add_mutually_exclusive_group()
    for name in PRESET_FLAGS:
        g.add_argument(f"--{name}", dest="preset", action="store_const", const=name, help=f"preset {name.upper()}")
    g.add_argument("--recipe", help="custom recipe (.toml)")
    q.add_argument("--method", default=None, help="ouromamba (default), ptq4vm, qmamba, minmax, percentile")
    q.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    q.add_argument("--calib", default=None, help="calibration data: synthetic:N (OuroMamba-Gen; the default, N=128) or "
                   "real:N (the demo's calibration split)")
    q.add_argument("--gen-config", help="OuroMamba-Gen config (.toml, as `ouro-export gen --config`) for synthetic calibration")
    q.add_argument("--dry-run", action="store_true", help="print the run plan (with its time estimate) and exit, writing nothing")
    q.add_argument("--calib-dir", help="folder of calibration images (ImageNet eval transform), or of synthetic images")
    q.add_argument("--save-calib", help="also write the QuantState (.safetensors)")
    q.add_argument("--load-calib", help="skip calibration: load a QuantState (.safetensors)")
    q.add_argument("--report", help="write a JSON report (accuracy, SQNR per block, outlier rates, compression, timings)")
    e = p.add_argument_group("export")
    e.add_argument("--stage", choices=["fp", "qdq", "plugin", "engine"], help="force the output stage instead of inferring it from -o")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17 for FP, 21 for quantized)")
    e.add_argument("--passes", help="comma-separated graph passes to apply, in order (default: the passes --print-passes lists "
                        "as default; add fp16_linear_io before cleanup for fp16 plugin activations)")
    e.add_argument("--print-passes", action="store_true", help="list the registered graph passes and exit")
    e.add_argument("--check", action="store_true", help="Polygraphy comparison of the exported graph vs PyTorch (and vs FP)")
    t = p.add_argument_group("TensorRT engine")
    t.add_argument("--batch", default="1,32,128", help="optimisation profile min,opt,max batch (default 1,32,128)")
    t.add_argument("--workspace", type=int, default=4096, help="builder workspace in MiB (default 4096)")
    t.add_argument("--timing-cache", help="TensorRT timing cache file (read and updated)")
    t.add_argument("--plugin-lib", help="path to libouro_trt_plugins.so (default: the in-tree build)")
    return p


# ----------------------------------------------------------------------------------- stages
def setup(ctx: RunContext) -> None:
    """Resolve --device and join torchrun's process group (when there is one)."""
    from ouro.calib.device import resolve_device
    from ouro.calib.distributed import env_local_rank, init_distributed

    ctx.device = resolve_device(getattr(ctx.args, "device", "auto"), env_local_rank())
    ctx.dist = init_distributed(ctx.device)


def load_model(ctx: RunContext):
    a = ctx.args
    if ctx.device is None:
        setup(ctx)
    with ctx.stage("load"):
        if a.demo:
            if a.checkpoint:
                raise UserError("give either a checkpoint or --demo, not both")
            from ouro.calib.data import load_demo_model

            try:
                ctx.model = load_demo_model(a.demo, device=ctx.device)
            except ValueError as e:  # an unknown family, or one without a demo
                raise UserError(f"--demo {a.demo}: {e}") from None
        elif a.checkpoint:
            from ouro.calib.checkpoint import load_checkpoint

            ctx.model = load_checkpoint(a.checkpoint, arch=a.arch, device=ctx.device, allow_nonfinite=a.allow_nonfinite)
        else:
            raise UserError("no model: give a checkpoint path, or --demo for the embedded demo model")
        ctx.model.eval()
    return ctx.model


def _model_label(ctx: RunContext) -> str:
    a, cfg = ctx.args, ctx.model.cfg
    n = sum(p.numel() for p in ctx.model.parameters())
    src = "embedded demo" if a.demo else str(a.checkpoint)
    return f"{cfg.name} ({n / 1e6:.3g}M params, {src})"


def run_plan(ctx: RunContext, outputs, quantized: bool):
    """The RunPlan of the main job (ouro.calib.plan), its estimate measured by a short warm-up."""
    from ouro.calib.device import describe_device
    from ouro.calib.gen.cli import gen_config
    from ouro.calib.imagefolder import parse_calib_spec
    from ouro.calib.plan import Estimate, RunPlan, estimate_calibration, estimate_eval, estimate_gen

    a, procs = ctx.args, ctx.dist.world_size
    parts, calib, evaluation, warm = [], None, None, []
    if quantized and a.load_calib:
        calib = f"QuantState {a.load_calib} (no calibration)"
    elif quantized:
        spec = parse_calib_spec(a.calib, a.calib_dir)
        n = spec.n
        if spec.kind == "synthetic":
            calib = f"OuroMamba-Gen, {n} synthetic images, seed {a.seed}"
            parts.append(estimate_gen(ctx.model, n, gen_config(a.gen_config), procs))
            warm.append("1 Gen step")
        elif spec.kind == "real":
            calib = f"demo calibration split, {n} real images, seed {a.seed}"
        else:
            from pathlib import Path

            n = n or _folder_count(a.calib_dir)
            kind = "synthetic images" if (Path(a.calib_dir) / "images.npz").is_file() else "images"
            calib = f"folder {a.calib_dir} ({n} {kind})"
        parts.append(estimate_calibration(ctx.model, ctx.recipe, n or 128))
        warm.append("1 block of calibration")
    eval_n = _eval_count(ctx)
    if eval_n and (a.eval or quantized):
        evaluation = f"{eval_n} images ({'--eval-dir ' + a.eval_dir if a.eval_dir else 'demo test split'})"
        parts.append(estimate_eval(ctx.model, eval_n, 1 + 2 * int(quantized), procs))
        warm.append("1 forward")
    other = []
    if quantized and not a.load_calib:
        if not a.calib_dir:
            other.append("--calib-dir DIR (real images)")
        if a.calib is None or not a.calib.startswith("synthetic"):
            other.append("--calib synthetic:N")
        if a.demo and (a.calib is None or not a.calib.startswith("real")):
            other.append("--calib real:N (the demo's split)")
    if ctx.device.type == "cpu":
        other.append("--device cuda (a GPU)")
    return RunPlan(model=_model_label(ctx), recipe=(f"{ctx.recipe.name} ({ctx.recipe.method.value})" if quantized and ctx.recipe else
                                                     ("from the QuantState" if quantized else None)),
                   calibration=calib, evaluation=evaluation, device=describe_device(ctx.device), processes=procs,
                   outputs=tuple(str(o.path) for o in outputs), estimate=Estimate(tuple(parts), " + ".join(warm)),
                   otherwise=", ".join(other))


def _folder_count(d) -> int:
    from ouro.calib.imagefolder import count_image_files

    try:
        return count_image_files(d)
    except ValueError:
        return 0


def _eval_count(ctx: RunContext) -> int:
    a = ctx.args
    if a.eval_dir:
        return _folder_count(a.eval_dir)
    if a.demo:
        from ouro.calib.data import SPLIT_SIZES

        return SPLIT_SIZES["test"]
    return 0


def run_export(ctx: RunContext) -> int:
    """The main job. Each step is owned by a module; see DESIGN.md §1."""
    a = ctx.args
    if a.print_passes:
        from ouro.exporter.passes import describe_passes

        print(describe_passes())
        return 0
    quantized = bool(a.preset or a.recipe or a.load_calib)
    if not a.print_recipe:
        from ouro.exporter.preflight import preflight

        preflight(a, quantized)  # every output and flag checked before any work (issue 18)
    from ouro.exporter.outputs import plan_outputs

    outputs = [] if a.print_recipe else plan_outputs(
        a.output, stage=a.stage, quantized=quantized, force=a.force, passes=a.passes, opset=a.opset)
    target = outputs[0].target if outputs else None  # known from -o: refuse what it cannot express now
    if a.preset or a.recipe or a.print_recipe or (quantized and not a.load_calib):
        from ouro.recipes import resolve_recipe

        ctx.recipe = resolve_recipe(preset=a.preset, recipe_file=a.recipe, method=a.method,
                                    target=None if a.print_recipe else target)
        if a.print_recipe:
            print(ctx.recipe.to_toml())
            return 0
    if quantized and not a.load_calib:
        from ouro.calib.imagefolder import parse_calib_spec

        parse_calib_spec(a.calib, a.calib_dir)  # a bad --calib fails before any work
    if a.load_calib and target is not None:
        from ouro.calib.quant import read_recipe
        from ouro.recipes import check_recipe_target

        check_recipe_target(read_recipe(a.load_calib), target)
    load_model(ctx)
    plan = run_plan(ctx, outputs, quantized)
    if ctx.is_main:
        print(plan.line(), flush=True)
    if a.dry_run:
        return 0
    if a.eval:
        from ouro.exporter.pipeline import evaluate_fp

        evaluate_fp(ctx)
    if quantized:
        from ouro.exporter.pipeline import quantize

        quantize(ctx)
    if not ctx.is_main:  # rank 0 writes, checks and reports
        return 0
    for out in outputs:
        out.write(ctx)
    if a.check:
        from ouro.exporter.check import run_check

        run_check(ctx, outputs)
    if a.report:
        from ouro.exporter.pipeline import write_report

        write_report(ctx, a.report)
    return 0


def run_gen(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="ouro-export gen", description="OuroMamba-Gen: synthetic calibration images from noise.")
    _add_model_args(p)
    p.add_argument("-n", "--num-images", type=int, default=128)
    p.add_argument("-o", "--output", required=True, help="output folder (PNGs + images.npz)")
    p.add_argument("--force", action="store_true", help="start over in a non-empty output folder")
    p.add_argument("--config", help="generation config (.toml) overriding the defaults")
    p.add_argument("--dry-run", action="store_true", help="print the run plan (with its time estimate) and exit, writing nothing")
    a = p.parse_args(argv)
    from ouro.calib.device import describe_device
    from ouro.calib.gen.cli import gen_config, gen_main
    from ouro.calib.plan import Estimate, RunPlan, estimate_gen

    cfg = gen_config(a.config)  # a bad config fails before the model is loaded
    ctx = RunContext(args=a)
    load_model(ctx)
    plan = RunPlan(model=_model_label(ctx), device=describe_device(ctx.device), processes=ctx.dist.world_size,
                   calibration=f"OuroMamba-Gen, {a.num_images} synthetic images, seed {a.seed}, G={cfg.iterations}",
                   outputs=(f"{a.output}/",), estimate=Estimate((estimate_gen(ctx.model, max(a.num_images, 1), cfg, ctx.dist.world_size),),
                                                              "1 Gen step"),
                   otherwise="rerun the same command to resume an interrupted folder; torchrun --nproc-per-node K to share it out")
    if ctx.is_main:
        print(plan.line(), flush=True)
    if a.dry_run:
        return 0
    return gen_main(ctx.model, a, dist=ctx.dist)


def run_compare(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="ouro-export compare", description="Every method x every preset on one model: top-1 table.")
    _add_model_args(p)
    p.add_argument("--calib-dir")
    p.add_argument("--eval-dir")
    p.add_argument("--calib", default=None)
    p.add_argument("-o", "--output", default="compare", help="output prefix for .json, .md and .png")
    p.add_argument("--methods", help="comma-separated subset (default: ouromamba,ptq4vm,qmamba,percentile,minmax)")
    p.add_argument("--presets", help="comma-separated subset (default: w8a8,w6a6,w4a8,w4a4,w6a4; each method runs those it ships)")
    a = p.parse_args(argv)
    from ouro.calib.compare import check_selection, compare_main

    check_selection(a.methods, a.presets)  # before any work
    ctx = RunContext(args=a)
    load_model(ctx)
    return compare_main(ctx.model, a, dist=ctx.dist)


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"gen": run_gen, "compare": run_compare}


class _StderrHandler(logging.Handler):
    """The project's log lines (logger `ouro`, e.g. skipped images) as one `ouro-export: warning: ...` line on
    the current sys.stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"ouro-export: {record.levelname.lower()}: {record.getMessage()}\n")
        except Exception:
            self.handleError(record)


def _setup_logging() -> None:
    log = logging.getLogger("ouro")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler(logging.INFO))
        log.setLevel(logging.INFO)


# OS errors that are the environment's or the user's to fix (a full disk, a read-only folder, a name too
# long): one line, like any other user error, instead of a traceback
USER_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                         errno.EISDIR, errno.ENOTDIR})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ouro.calib.distributed import leave_process_group

    _setup_logging()
    try:
        try:
            if argv and argv[0] in SUBCOMMANDS:
                rc = SUBCOMMANDS[argv[0]](argv[1:])
            else:
                rc = run_export(RunContext(args=build_export_parser().parse_args(argv)))
        except BaseException:
            leave_process_group(wait=False)  # no barrier: another rank may be inside a collective
            raise
        leave_process_group(wait=True)
        return rc
    except KeyboardInterrupt:
        print("ouro-export: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"ouro-export: error: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"ouro-export: not implemented: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        where = f": {str(e.filename)[:120]}" if e.filename else ""
        print(f"ouro-export: error: {e.strerror}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # errors of our own types carry actionable messages
        if type(e).__module__.startswith("ouro.") and getattr(e, "user_facing", True):
            print(f"ouro-export: error: {e}", file=sys.stderr)
            return 2
        raise


def console_main() -> None:
    """The `ouro-export` program: main(), then exit without letting a late Ctrl-C (after the work is
    done and written, while the interpreter joins its threads) print a traceback over a finished run."""
    rc = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    raise SystemExit(rc)


if __name__ == "__main__":
    console_main()
