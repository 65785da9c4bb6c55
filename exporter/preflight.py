"""Checks of a whole `ouro-export` request before any work: every file it will write (the output
plan), every flag's type and range, and flags the request would silently ignore.

    plan = preflight(args, quantized)     # raises a one-line user-facing error, or returns the WritePlan

The output plan declares `-o` (and the ONNX written beside a `.plan`), `--save-calib`, `--report`
and its plots, then checks them together (ouro.calib.files.WritePlan): no two on the same file, no
existing file without --force, a writable existing folder, a name and path the file system holds.
The writes themselves are no-clobber and atomic (ouro.calib.files.atomic_write).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ouro.calib.files import OutputError, WritePlan

__all__ = ["FlagError", "MAX_WORKSPACE_MIB", "preflight", "build_output_plan", "check_engine_flags", "check_ignored_flags",
           "check_input_paths"]

MAX_WORKSPACE_MIB = 1 << 20  # 1 TiB: beyond any GPU's memory


class FlagError(ValueError):
    """A flag with a bad value, or one the request would ignore; the message says what to change."""

    user_facing = True


def _writes_engine(a: argparse.Namespace) -> bool:
    return a.stage == "engine" or (a.stage is None and a.output is not None and str(a.output).lower().endswith(".plan"))


def build_output_plan(a: argparse.Namespace) -> WritePlan:
    """Every file the request will write, checked (module docstring)."""
    from .engine_config import onnx_path_for_plan
    from .pipeline import report_files

    plan = WritePlan(force=bool(a.force))
    plan.add("-o", a.output)
    if a.output is not None and _writes_engine(a):
        plan.add("-o (the ONNX written beside the .plan)", onnx_path_for_plan(a.output))
    plan.add("--save-calib", a.save_calib)
    plan.add("--report", a.report, siblings=report_files(a.report) if a.report else ())
    return plan.check()


def check_engine_flags(a: argparse.Namespace) -> None:
    """--batch, --workspace and --plugin-lib of a `.plan` request (used only when building an engine)."""
    from .engine_config import BatchProfile, EngineConfigError, find_plugin_library

    if not _writes_engine(a):
        for flag, v in (("--plugin-lib", a.plugin_lib), ("--timing-cache", a.timing_cache)):
            if v is not None:
                raise FlagError(f"{flag} is used only when building a TensorRT engine (-o X.plan); remove it")
        return
    try:
        BatchProfile.parse(a.batch)
    except EngineConfigError as e:
        raise FlagError(str(e)) from None
    if not 1 <= a.workspace <= MAX_WORKSPACE_MIB:
        raise FlagError(f"--workspace must be a number of MiB in [1, {MAX_WORKSPACE_MIB}], got {a.workspace}")
    if a.plugin_lib is not None and not Path(a.plugin_lib).is_file():
        raise FlagError(f"--plugin-lib {a.plugin_lib}: no such file (give the path of the built libouro_trt_plugins.so)")
    find_plugin_library(a.plugin_lib)


_CALIB_FLAGS = (("calib", "--calib"), ("calib_dir", "--calib-dir"), ("gen_config", "--gen-config"))


def check_ignored_flags(a: argparse.Namespace, quantized: bool) -> None:
    """Refuse flags that this request would not use (instead of silently ignoring them)."""
    if a.demo and a.arch:
        raise FlagError("--arch does not apply to --demo (the embedded demo model has its own architecture); remove --arch")
    if a.demo and a.checkpoint:
        raise FlagError("give either a checkpoint or --demo, not both")
    if a.load_calib:
        given = [f for f, v in (("--" + (a.preset or ""), a.preset), ("--recipe", a.recipe), ("--method", a.method)) if v]
        if given:
            raise FlagError(f"--load-calib uses the recipe and method saved in the QuantState, so {', '.join(given)} "
                            "would be ignored; remove them (or calibrate anew without --load-calib)")
        given = [flag for key, flag in _CALIB_FLAGS if getattr(a, key)]
        if given:
            raise FlagError(f"--load-calib skips calibration, so {', '.join(given)} would be ignored; remove them")
    elif not quantized:
        given = [flag for key, flag in (*_CALIB_FLAGS, ("method", "--method"), ("save_calib", "--save-calib")) if getattr(a, key)]
        if given:
            raise FlagError(f"{', '.join(given)} apply only when quantizing: add a preset (--w4a4, --w4a8, --w6a6, --w8a8) "
                            "or --recipe, or remove them")


def check_input_paths(a: argparse.Namespace, quantized: bool) -> None:
    """Input folders and files exist before any work."""
    for flag, v, used in (("--calib-dir", a.calib_dir, quantized and not a.load_calib), ("--eval-dir", a.eval_dir, True)):
        if v is not None and used and not Path(v).is_dir():
            raise FlagError(f"{flag} {v}: no such folder")
    for flag, v in (("--load-calib", a.load_calib), ("--recipe", a.recipe), ("--gen-config", a.gen_config)):
        if v is not None and not Path(v).is_file():
            raise FlagError(f"{flag} {v}: no such file" + (" (it is a folder)" if Path(v).is_dir() else ""))


def preflight(a: argparse.Namespace, quantized: bool) -> WritePlan:
    """All checks of an export request that need no model (module docstring); the checked output plan."""
    check_ignored_flags(a, quantized)
    try:
        plan = build_output_plan(a)
    except OSError as e:  # a path the OS refuses to even look at
        raise OutputError(f"cannot use output path {str(e.filename)[:60]}...: {e.strerror}") from None
    check_engine_flags(a)
    check_input_paths(a, quantized)
    return plan
