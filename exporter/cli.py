"""`ouro-export`: the only module that knows argparse. It parses the command line once into typed
requests (ouro.exporter.run_config, ouro.calib.gen.cli.GenRequest, ouro.calib.compare.CompareConfig)
and hands them to the runs of ouro.exporter.run.

    ouro-export [export] CKPT|--demo [--w4a4|--w4a8|--w6a6|--w8a8|--recipe R.toml] [--method M]
                [--calib real:N|synthetic:N] [--calib-dir DIR] [--device D] [--dry-run] -o OUT{.onnx,.qdq.onnx,.safetensors,.plan}
    ouro-export gen CKPT|--demo -n 128 -o synth/ [--device D]
    ouro-export compare CKPT|--demo [--calib-dir DIR --eval-dir DIR] [--device D]

Subcommands are argparse sub-parsers; `export` is the default, so a command line that does not
start with a subcommand name is an export (`ouro-export CKPT --w4a4 -o x.onnx`). Defaults of the
flags are the argparse defaults below or, where a flag is left unset (None), the defaults of the
typed objects it feeds (BatchProfile, DEFAULT_WORKSPACE_MIB, DEFAULT_PASSES, GenConfig): nowhere else.
Everything a request can get wrong is checked while it is built, before the model is loaded.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .context import RunContext, UserError

__all__ = ["PRESET_FLAGS", "SUBCOMMANDS", "DEFAULT_SUBCOMMAND", "UserError", "RunContext", "build_parser",
           "build_run_config", "build_gen_request", "build_compare_config", "main"]

PRESET_FLAGS = ("w4a4", "w4a8", "w6a6", "w8a8", "w6a4")
SUBCOMMANDS = ("export", "gen", "compare")
DEFAULT_SUBCOMMAND = "export"
DEFAULT_SEED = 0
DEFAULT_DEVICE = "auto"


# ------------------------------------------------------------------------------------ parsers
def _model_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("checkpoint", nargs="?", help="Vim checkpoint (.pth): {'model': sd}, {'state_dict': sd} or a bare state_dict")
    p.add_argument("--demo", action="store_true", help="use the embedded demo model (Vim on scikit-learn digits)")
    p.add_argument("--arch", help="override the architecture inferred from the checkpoint (vim_tiny, vim_small, vim_base)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed for calibration, generation and sampling (default {DEFAULT_SEED})")
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
    p.add_argument("--methods", help=f"comma-separated subset (default: {','.join(METHOD_ORDER)})")
    p.add_argument("--presets", help=f"comma-separated subset (default: {','.join(COMPARE_PRESETS)}; each method runs those it ships)")


def build_parser() -> argparse.ArgumentParser:
    """The `ouro-export` parser: one sub-parser per subcommand (export, the default; gen; compare)."""
    top = argparse.ArgumentParser(
        prog="ouro-export",
        description="Vision Mamba checkpoint -> calibrated low-bit ONNX / TensorRT engine (OuroMamba and baselines).",
        epilog="Without a subcommand name, the command line is an export: `ouro-export CKPT --w4a4 -o x.onnx` "
               "(see `ouro-export export --help`).",
    )
    sub = top.add_subparsers(dest="command", metavar="{export,gen,compare}", required=True)
    model = _model_args()
    _add_export_args(sub.add_parser(
        "export", parents=[model], prog="ouro-export", help="calibrate and export (the default subcommand)",
        description="Vision Mamba checkpoint -> calibrated low-bit ONNX / TensorRT engine (OuroMamba and baselines).",
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

    return ModelSource(checkpoint=_path(a.checkpoint), demo=a.demo, arch=a.arch)


def build_run_config(a: argparse.Namespace):
    """The RunConfig of an export command line, every part validated (in this order: passes,
    outputs, recipe vs target, calibration source, QuantState vs target, model source, engine
    options). Returns None after --print-recipe (which prints the recipe)."""
    from ouro.calib.gen.cli import gen_config
    from ouro.calib.imagefolder import parse_calib_spec

    from .engine_config import BatchProfile
    from .outputs import EngineOptions, ExportOptions, OutputPlan, plan_outputs
    from .passes import parse_pass_names
    from .run_config import CalibSource, EvalOptions, RunConfig

    quantized = bool(a.preset or a.recipe or a.load_calib)
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
        calib = CalibSource(parse_calib_spec(a.calib, a.calib_dir), calib_dir=_path(a.calib_dir), demo=a.demo, seed=a.seed,
                            gen=gen_config(a.gen_config), explicit=a.calib is not None)
    if a.load_calib and outputs.target is not None:
        from ouro.calib.quant import read_recipe
        from ouro.recipes import check_recipe_target

        check_recipe_target(read_recipe(a.load_calib), outputs.target)
    model = _model_source(a)
    engine = EngineOptions()
    if a.batch is not None or a.workspace is not None or a.timing_cache or a.plugin_lib:
        engine = EngineOptions(batch=BatchProfile.parse(a.batch) if a.batch is not None else engine.batch,
                               workspace_mib=a.workspace if a.workspace is not None else engine.workspace_mib,
                               timing_cache=_path(a.timing_cache), plugin_library=_path(a.plugin_lib))
    return RunConfig(model=model, device=a.device, seed=a.seed, outputs=outputs, recipe=recipe,
                     load_calib=_path(a.load_calib), calib=calib,
                     eval=EvalOptions(eval_dir=_path(a.eval_dir), demo=a.demo, print_fp=a.eval),
                     export=export, engine=engine, check=a.check, dry_run=a.dry_run)


def build_gen_request(a: argparse.Namespace):
    from ouro.calib.gen.cli import GenRequest, gen_config

    return GenRequest(num_images=a.num_images, output=Path(a.output), seed=a.seed, force=a.force, config=gen_config(a.config))


def build_compare_config(a: argparse.Namespace, model_name: str):
    from ouro.calib.compare import COMPARE_PRESETS, METHOD_ORDER, CompareConfig

    return CompareConfig(demo=a.demo, calib=a.calib, calib_dir=_path(a.calib_dir), eval_dir=_path(a.eval_dir), seed=a.seed,
                         methods=CompareConfig.names(a.methods, METHOD_ORDER), presets=CompareConfig.names(a.presets, COMPARE_PRESETS),
                         output=Path(a.output) if a.output else CompareConfig.output, model_name=model_name)


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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ouro.calib.distributed import leave_process_group

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
    except Exception as e:  # errors of our own types carry actionable messages
        if type(e).__module__.startswith("ouro.") and getattr(e, "user_facing", True):
            print(f"ouro-export: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
