"""`ouro-export`: the only module that knows argparse. It parses the command line once into typed
requests (ouro.exporter.run_config, ouro.calib.gen.cli.GenRequest, ouro.calib.compare.CompareConfig)
and hands them to the runs of ouro.exporter.run.

    ouro-export [export] CKPT|--demo [FAMILY] [--w4a4|--w4a8|--w6a6|--w8a8|--recipe R.toml] [--method M]
                [--calib real:N|synthetic:N] [--calib-dir DIR] [--device D] [--dry-run] -o OUT{.onnx,.qdq.onnx,.safetensors,.plan}
    ouro-export gen CKPT|--demo [FAMILY] -n 128 -o synth/ [--device D]
    ouro-export compare CKPT|--demo [FAMILY] [--calib-dir DIR --eval-dir DIR] [--device D]

Subcommands are argparse sub-parsers; `export` is the default, so a command line that does not
start with a subcommand name is an export (`ouro-export CKPT --w4a4 -o x.onnx`). Defaults of the
flags are the argparse defaults below or, where a flag is left unset (None), the defaults of the
typed objects it feeds (BatchProfile, DEFAULT_WORKSPACE_MIB, DEFAULT_PASSES, GenConfig): nowhere else.
Everything a request can get wrong is checked while it is built, before the model is loaded: flag
values (in the typed objects' __post_init__), flags the request would ignore (here), and every file
it will write (the output plan, ouro.exporter.outputs.plan_outputs).
"""
from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .context import RunContext, UserError

__all__ = ["PRESET_FLAGS", "SUBCOMMANDS", "DEFAULT_SUBCOMMAND", "UserError", "RunContext", "build_parser",
           "build_run_config", "build_gen_request", "build_compare_config", "main", "console_main"]

PRESET_FLAGS = ("w4a4", "w4a8", "w6a6", "w8a8", "w6a4")
SUBCOMMANDS = ("export", "gen", "compare")
DEFAULT_SUBCOMMAND = "export"
DEFAULT_SEED = 0
DEFAULT_DEVICE = "auto"
DEFAULT_DEMO = "vim"  # --demo without a family


# ------------------------------------------------------------------------------------ parsers
def _model_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("checkpoint", nargs="?", help="model checkpoint (.pth) of a known family (Vim, VMamba): the official "
                   "files ({'model': sd}, training dicts), {'state_dict': sd} or a bare state_dict")
    p.add_argument("--demo", nargs="?", const=DEFAULT_DEMO, default=None, metavar="FAMILY",
                   help="use an embedded demo model trained on scikit-learn digits: FAMILY is vim (the default), vmamba or mambavision")
    p.add_argument("--arch", help="override the architecture inferred from the checkpoint (e.g. vim_small, vmamba_tiny; "
                   "an unknown name lists every known one)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed for calibration, generation and sampling (default {DEFAULT_SEED})")
    p.add_argument("--allow-nonfinite", action="store_true", help="load a checkpoint even if some weights are NaN or Inf "
                   "(refused by default, naming the first bad tensor)")
    p.add_argument("--device", default=DEFAULT_DEVICE, help="where the PyTorch stages run: auto (a CUDA GPU when torch sees one, "
                   f"else the CPU), cpu, cuda, cuda:N (default {DEFAULT_DEVICE})")
    return p


def _add_export_args(p: argparse.ArgumentParser) -> None:
    from .engine_config import DEFAULT_WORKSPACE_MIB, BatchProfile
    from .onnx_export import FP_OPSET
    from .quantized import QDQ_OPSET

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
    e.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {FP_OPSET} for FP, {QDQ_OPSET} for quantized)")
    e.add_argument("--passes", help="comma-separated graph passes to apply, in order (default: the passes --print-passes lists "
                        "as default; add fp16_linear_io before cleanup for fp16 plugin activations)")
    e.add_argument("--print-passes", action="store_true", help="list the registered graph passes and exit")
    e.add_argument("--check", action="store_true", help="Polygraphy comparison of the exported graph vs PyTorch (and vs FP)")
    t = p.add_argument_group("TensorRT engine")
    t.add_argument("--batch", default=None, help=f"optimisation profile min,opt,max batch (default {BatchProfile()})")
    t.add_argument("--workspace", type=int, default=None, help=f"builder workspace in MiB (default {DEFAULT_WORKSPACE_MIB})")
    t.add_argument("--timing-cache", help="TensorRT timing cache file (read and updated)")
    t.add_argument("--plugin-lib", help="path to libouro_trt_plugins.so (default: the in-tree build)")


def _add_gen_args(p: argparse.ArgumentParser) -> None:
    from ouro.calib.imagefolder import DEFAULT_CALIB_IMAGES

    p.add_argument("-n", "--num-images", type=int, default=DEFAULT_CALIB_IMAGES,
                   help=f"images to generate (default {DEFAULT_CALIB_IMAGES}, the paper's calibration count)")
    p.add_argument("-o", "--output", required=True, help="output folder (PNGs + images.npz)")
    p.add_argument("--force", action="store_true", help="start over in a non-empty output folder")
    p.add_argument("--config", help="generation config (.toml) overriding the defaults")
    p.add_argument("--dry-run", action="store_true", help="print the run plan (with its time estimate) and exit, writing nothing")


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    from ouro.calib.compare import COMPARE_PRESETS, METHOD_ORDER, CompareConfig

    p.add_argument("--calib-dir")
    p.add_argument("--eval-dir")
    p.add_argument("--calib", default=None)
    p.add_argument("-o", "--output", default=None, help=f"output prefix for .json, .md and .png (default {CompareConfig.output})")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--methods", help=f"comma-separated subset (default: {','.join(METHOD_ORDER)})")
    p.add_argument("--presets", help=f"comma-separated subset (default: {','.join(COMPARE_PRESETS)}; each method runs those it ships)")


def build_parser() -> argparse.ArgumentParser:
    """The `ouro-export` parser: one sub-parser per subcommand (export, the default; gen; compare)."""
    top = argparse.ArgumentParser(
        prog="ouro-export",
        description="Vision Mamba (Vim, VMamba) checkpoint -> calibrated low-bit ONNX / TensorRT engine (OuroMamba and baselines).",
        epilog="Without a subcommand name, the command line is an export: `ouro-export CKPT --w4a4 -o x.onnx` "
               "(see `ouro-export export --help`).",
    )
    sub = top.add_subparsers(dest="command", metavar="{export,gen,compare}", required=True)
    model = _model_args()
    _add_export_args(sub.add_parser(
        "export", parents=[model], prog="ouro-export", help="calibrate and export (the default subcommand)",
        description="Vision Mamba (Vim, VMamba) checkpoint -> calibrated low-bit ONNX / TensorRT engine (OuroMamba and baselines).",
        epilog="Subcommands: `ouro-export gen ...` (synthetic calibration images), `ouro-export compare ...` (methods x bits table)."))
    _add_gen_args(sub.add_parser("gen", parents=[model], prog="ouro-export gen", help="synthetic calibration images",
                                 description="OuroMamba-Gen: synthetic calibration images from noise."))
    _add_compare_args(sub.add_parser("compare", parents=[model], prog="ouro-export compare", help="methods x presets top-1 table",
                                     description="Every method x every preset on one model: top-1 table."))
    return top


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line; one that does not start with a subcommand name (or -h) is an export."""
    argv = list(argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = [DEFAULT_SUBCOMMAND, *argv]
    return build_parser().parse_args(argv)


# ------------------------------------------------------------------------ typed requests
def _path(v: str | None) -> Path | None:
    return None if v is None else Path(v)


def _model_source(a: argparse.Namespace):
    from .run_config import ModelSource

    return ModelSource(checkpoint=_path(a.checkpoint), demo=a.demo, arch=a.arch, allow_nonfinite=a.allow_nonfinite)


_CALIB_FLAGS = (("calib", "--calib"), ("calib_dir", "--calib-dir"), ("gen_config", "--gen-config"))
_ENGINE_FLAGS = (("batch", "--batch"), ("workspace", "--workspace"), ("timing_cache", "--timing-cache"),
                 ("plugin_lib", "--plugin-lib"))


def _refuse_ignored_flags(a: argparse.Namespace, quantized: bool, builds_engine: bool) -> None:
    """Flags this request would not use are refused (instead of silently ignored)."""
    if a.load_calib:
        given = [f for f, v in (("--" + (a.preset or ""), a.preset), ("--recipe", a.recipe), ("--method", a.method)) if v]
        if given:
            raise UserError(f"--load-calib uses the recipe and method saved in the QuantState, so {', '.join(given)} "
                            "would be ignored; remove them (or calibrate anew without --load-calib)")
        given = [flag for key, flag in _CALIB_FLAGS if getattr(a, key)]
        if given:
            raise UserError(f"--load-calib skips calibration, so {', '.join(given)} would be ignored; remove them")
    elif not quantized:
        given = [flag for key, flag in (*_CALIB_FLAGS, ("method", "--method"), ("save_calib", "--save-calib")) if getattr(a, key)]
        if given:
            raise UserError(f"{', '.join(given)} apply only when quantizing: add a preset (--w4a4, --w4a8, --w6a6, --w8a8) "
                            "or --recipe, or remove them")
    if not builds_engine:
        given = [flag for key, flag in _ENGINE_FLAGS if getattr(a, key) is not None]
        if given:
            raise UserError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} used only when building a TensorRT "
                            "engine (-o X.plan); remove " + ("it" if len(given) == 1 else "them"))


def _check_input_files(a: argparse.Namespace) -> None:
    """The files the request reads while it is built exist (one line each, before any work)."""
    for flag, v in (("--load-calib", a.load_calib), ("--recipe", a.recipe), ("--gen-config", a.gen_config)):
        if v is not None and not Path(v).is_file():
            raise UserError(f"{flag} {v}: no such file" + (" (it is a folder)" if Path(v).is_dir() else ""))


def _builds_engine(a: argparse.Namespace) -> bool:
    return a.stage == "engine" or (a.stage is None and a.output is not None and str(a.output).lower().endswith(".plan"))


def build_run_config(a: argparse.Namespace):
    """The RunConfig of an export command line, every part validated (in this order: model source,
    flags the request would ignore, input files, passes, outputs, recipe vs target, calibration
    source, QuantState vs target, engine options). Returns None after --print-recipe (which prints
    the recipe)."""
    from ouro.calib.gen.cli import gen_config
    from ouro.calib.imagefolder import parse_calib_spec

    from .engine_config import BatchProfile
    from .outputs import EngineOptions, ExportOptions, OutputPlan, plan_outputs
    from .passes import parse_pass_names
    from .run_config import CalibSource, EvalOptions, RunConfig

    quantized = bool(a.preset or a.recipe or a.load_calib)
    model = None
    if not a.print_recipe:
        model = _model_source(a)
        _refuse_ignored_flags(a, quantized, _builds_engine(a))
        _check_input_files(a)
    export = ExportOptions(fp16=a.fp16, opset=a.opset, passes=parse_pass_names(a.passes))
    outputs = OutputPlan() if a.print_recipe else plan_outputs(
        a.output, stage=a.stage, quantized=quantized, force=a.force, opset=a.opset, save_calib=a.save_calib, report=a.report)
    recipe = None
    if a.preset or a.recipe or a.print_recipe or (quantized and not a.load_calib):
        from ouro.recipes import resolve_recipe

        recipe = resolve_recipe(preset=a.preset, recipe_file=a.recipe, method=a.method,
                                target=None if a.print_recipe else outputs.target)
        if a.print_recipe:
            print(recipe.to_toml())
            return None
    calib = None
    if quantized and not a.load_calib:
        calib = CalibSource(parse_calib_spec(a.calib, a.calib_dir), calib_dir=_path(a.calib_dir), demo=a.demo is not None, seed=a.seed,
                            gen=gen_config(a.gen_config), explicit=a.calib is not None)
    if a.load_calib and outputs.target is not None:
        from ouro.calib.quant import read_recipe
        from ouro.recipes import check_recipe_target

        check_recipe_target(read_recipe(a.load_calib), outputs.target)
    engine = EngineOptions()
    if a.batch is not None or a.workspace is not None or a.timing_cache or a.plugin_lib:
        engine = EngineOptions(batch=BatchProfile.parse(a.batch) if a.batch is not None else engine.batch,
                               workspace_mib=a.workspace if a.workspace is not None else engine.workspace_mib,
                               timing_cache=_path(a.timing_cache), plugin_library=_path(a.plugin_lib))
    return RunConfig(model=model, device=a.device, seed=a.seed, outputs=outputs, recipe=recipe,
                     load_calib=_path(a.load_calib), calib=calib,
                     eval=EvalOptions(eval_dir=_path(a.eval_dir), demo=a.demo is not None, print_fp=a.eval),
                     export=export, engine=engine, check=a.check, dry_run=a.dry_run)


def build_gen_request(a: argparse.Namespace):
    from ouro.calib.gen.cli import GenRequest, gen_config

    return GenRequest(num_images=a.num_images, output=Path(a.output), seed=a.seed, force=a.force, config=gen_config(a.config))


def build_compare_config(a: argparse.Namespace, model_name: str):
    from ouro.calib.compare import COMPARE_PRESETS, METHOD_ORDER, CompareConfig

    return CompareConfig(demo=a.demo is not None, calib=a.calib, calib_dir=_path(a.calib_dir), eval_dir=_path(a.eval_dir), seed=a.seed,
                         methods=CompareConfig.names(a.methods, METHOD_ORDER), presets=CompareConfig.names(a.presets, COMPARE_PRESETS),
                         output=Path(a.output) if a.output else CompareConfig.output, model_name=model_name, force=a.force)


def _dispatch(a: argparse.Namespace) -> int:
    from . import run

    if a.command == "export":
        if a.print_passes:
            from .passes import describe_passes

            print(describe_passes())
            return 0
        cfg = build_run_config(a)
        return 0 if cfg is None else run.run_export(cfg)
    if a.command == "gen":
        req = build_gen_request(a)
        return run.run_gen(_model_source(a), a.device, req, dry_run=a.dry_run)
    source = _model_source(a)
    return run.run_compare(source, a.device, build_compare_config(a, source.name))


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
            rc = _dispatch(parse_args(argv))
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
