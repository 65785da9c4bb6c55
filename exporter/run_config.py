"""The typed request of one `ouro-export` run, built once by `ouro.exporter.cli` before any work.

    ModelSource   which model: a checkpoint (with an optional --arch) or the embedded demo
    CalibSource   the calibration batch source: a CalibSpec (synthetic:N | real:N | folder), seed, Gen config
    EvalOptions   the evaluation set (demo test split or --eval-dir) and whether FP top-1 is printed
    RunConfig     the whole export run: the above, the resolved Recipe, the OutputPlan
                  (ouro.exporter.outputs), export and engine options, --check, --dry-run

Every object is frozen and validated when it is built, so a bad request fails with one line before
the model is loaded. The stages (ouro.exporter.pipeline, outputs, check) take these objects and the
artifacts of earlier stages as arguments; none of them reads command-line flags.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ouro.calib.distributed import SINGLE, DistContext
from ouro.calib.gen.config import GenConfig
from ouro.calib.imagefolder import CalibSpec
from ouro.recipes import Recipe

from .context import UserError
from .outputs import EngineOptions, ExportOptions, OutputPlan

__all__ = ["ModelSource", "CalibSource", "EvalOptions", "RunConfig"]


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint path (arch: override the architecture inferred from it; allow_nonfinite: load
    it even with NaN/Inf weights) or an embedded demo model (demo: its family, e.g. "vim", "vmamba")."""

    checkpoint: Path | None = None
    demo: str | None = None
    arch: str | None = None
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        if self.demo is not None and self.checkpoint is not None:
            raise UserError("give either a checkpoint or --demo, not both")
        if self.demo is None and self.checkpoint is None:
            raise UserError("no model: give a checkpoint path, or --demo for the embedded demo model")
        if self.demo is not None and self.arch is not None:
            raise UserError("--arch does not apply to --demo (the embedded demo model has its own architecture); remove --arch")

    @property
    def is_demo(self) -> bool:
        return self.demo is not None

    @property
    def name(self) -> str:
        """Short name for tables and file names: "<family> demo" or the checkpoint's stem."""
        return f"{self.demo} demo" if self.is_demo else self.checkpoint.stem

    def describe(self) -> str:
        return "embedded demo" if self.is_demo else str(self.checkpoint)

    def load(self, device: torch.device) -> nn.Module:
        """The FP model on `device`, in eval mode."""
        if self.is_demo:
            from ouro.calib.data import load_demo_model

            try:
                model = load_demo_model(self.demo, device=device)
            except ValueError as e:  # an unknown family, or one without a demo
                raise UserError(f"--demo {self.demo}: {e}") from None
        else:
            from ouro.calib.checkpoint import load_checkpoint

            model = load_checkpoint(self.checkpoint, arch=self.arch, device=device, allow_nonfinite=self.allow_nonfinite)
        return model.eval()


@dataclass(frozen=True)
class CalibSource:
    """Where the calibration images come from: `spec` (ouro.calib.imagefolder.parse_calib_spec)
    names the kind and count; calib_dir is the folder of a "dir" spec; demo gives the demo's
    calibration split to a "real" spec; gen configures OuroMamba-Gen for a "synthetic" spec."""

    spec: CalibSpec
    calib_dir: Path | None = None
    demo: bool = False
    seed: int = 0
    gen: GenConfig = field(default_factory=GenConfig)
    explicit: bool = False  # the spec was asked for (--calib), not the default

    def __post_init__(self) -> None:
        if self.spec.kind == "dir" and self.calib_dir is None:
            raise UserError("a calibration folder spec needs --calib-dir")
        if self.calib_dir is not None and not self.calib_dir.is_dir():
            raise UserError(f"--calib-dir {self.calib_dir}: no such folder")

    def images(self, model: nn.Module, dist: DistContext = SINGLE) -> Tensor:
        """(N, C, H, W) normalised calibration images on the CPU (ouro.calib.imagefolder.calibration_images)."""
        from ouro.calib.imagefolder import calibration_images

        return calibration_images(model, self.spec, calib_dir=None if self.calib_dir is None else str(self.calib_dir),
                                  demo=self.demo, seed=self.seed, dist=dist, gen=self.gen)


@dataclass(frozen=True)
class EvalOptions:
    """The evaluation set: --eval-dir (ImageNet-style class folders), else the demo's test split for
    the demo model, else none. print_fp: --eval (print FP top-1 before quantizing)."""

    eval_dir: Path | None = None
    demo: bool = False
    print_fp: bool = False

    def __post_init__(self) -> None:
        if self.eval_dir is not None and not self.eval_dir.is_dir():
            raise UserError(f"--eval-dir {self.eval_dir}: no such folder")

    def source(self, img_size: int):
        """The ouro.calib.evaluation.EvalSource, or None when there is no evaluation set."""
        from ouro.calib.evaluation import EvalSource

        if self.eval_dir is not None:
            return EvalSource.folder(self.eval_dir, img_size)
        if self.demo:
            return EvalSource("demo", img_size=img_size)
        return None


@dataclass(frozen=True)
class RunConfig:
    """One `ouro-export CKPT|--demo ...` run.

    recipe      the resolved Recipe (None: FP export, or everything from the QuantState of load_calib)
    load_calib  a QuantState to load instead of calibrating
    calib       the calibration batch source (None when nothing is calibrated)
    outputs     every file to write, validated (OutputPlan: the place for output-flag checks)
    """

    model: ModelSource
    device: str
    seed: int
    outputs: OutputPlan
    recipe: Recipe | None = None
    load_calib: Path | None = None
    calib: CalibSource | None = None
    eval: EvalOptions = EvalOptions()
    export: ExportOptions = ExportOptions()
    engine: EngineOptions = EngineOptions()
    check: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.quantized and self.load_calib is None and (self.recipe is None or self.calib is None):
            raise UserError("calibration needs a recipe and a calibration source")
        if self.load_calib is not None and (self.recipe is not None or self.calib is not None):
            raise UserError("--load-calib uses the recipe and calibration saved in the QuantState; give no recipe or "
                            "calibration source with it")
        if self.engine != EngineOptions() and not self.outputs.builds_engine:
            raise UserError("TensorRT engine options are used only when building an engine (-o X.plan); remove them")

    @property
    def quantized(self) -> bool:
        return self.recipe is not None or self.load_calib is not None
