"""What `-o` asks for, and writing it safely.

The format follows the output's extension (or `--stage`):

    x.onnx          FP graph (no quantization flags) or the plugin graph (quantized)
    x.qdq.onnx      QDQ graph (quantized; standard QuantizeLinear/DequantizeLinear)
    x.safetensors   QuantState (quantized)
    x.plan          TensorRT engine; the ONNX it is built from is written beside it first (x.onnx)

Every file is written atomically (temporary file in the same folder + rename), so an error or
Ctrl-C leaves no partial file; an existing file is replaced only with `--force`. Problems that the
user can fix (unknown extension, existing file, unwritable folder) raise `OutputError` before any
work starts.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from typing import TYPE_CHECKING

from torch import nn

from ouro.calib.files import OutputError, WritePlan, atomic_write
from ouro.recipes import Target

from .engine_config import DEFAULT_WORKSPACE_MIB, MAX_WORKSPACE_MIB, BatchProfile, EngineConfigError
from .passes import DEFAULT_PASSES, PASSES, PassError

if TYPE_CHECKING:
    import onnx

    from ouro.calib.quant import QuantizedModel

    from .context import RunContext

__all__ = ["Stage", "OutputError", "Output", "OutputPlan", "ExportOptions", "EngineOptions", "ExportedGraphs", "plan_outputs",
           "atomic_write"]


class Stage(str, Enum):
    FP = "fp"
    QDQ = "qdq"
    PLUGIN = "plugin"
    ENGINE = "engine"
    QUANT_STATE = "quant_state"

    @property
    def target(self) -> Target | None:
        """The quantized export target this output is written for (None: FP graph, QuantState)."""
        return _TARGETS.get(self)


_TARGETS = {Stage.QDQ: Target.QDQ_ONNXRUNTIME, Stage.PLUGIN: Target.PLUGIN, Stage.ENGINE: Target.PLUGIN}


_SUFFIXES: tuple[tuple[str, Callable[[bool], Stage]], ...] = (
    # longest first: ".qdq.onnx" before ".onnx"
    (".qdq.onnx", lambda q: Stage.QDQ),
    (".onnx", lambda q: Stage.PLUGIN if q else Stage.FP),
    (".safetensors", lambda q: Stage.QUANT_STATE),
    (".plan", lambda q: Stage.ENGINE),
)
_NEEDS_QUANT = {Stage.QDQ, Stage.PLUGIN, Stage.QUANT_STATE}


# ------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class ExportOptions:
    """How the ONNX graphs are written: fp16 (FP graph in float16), opset (None: FP_OPSET for the FP
    graph, QDQ_OPSET for quantized ones), passes (graph passes of quantized graphs, in order)."""

    fp16: bool = False
    opset: int | None = None
    passes: tuple[str, ...] = DEFAULT_PASSES

    def __post_init__(self) -> None:
        unknown = [n for n in self.passes if n not in PASSES]
        if unknown or not self.passes:
            raise PassError(f"unknown graph pass(es) or none: {list(self.passes)}; known: {', '.join(PASSES)}")


@dataclass(frozen=True)
class EngineOptions:
    """How a `.plan` is built (ouro.exporter.engine_config.EngineConfig.for_plan): optimisation
    profile, builder workspace (MiB), timing cache, plugin library (None: the in-tree build)."""

    batch: BatchProfile = BatchProfile()
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    timing_cache: Path | None = None
    plugin_library: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.workspace_mib, bool) or not isinstance(self.workspace_mib, int) \
                or not 1 <= self.workspace_mib <= MAX_WORKSPACE_MIB:
            raise EngineConfigError(f"--workspace must be a number of MiB in [1, {MAX_WORKSPACE_MIB}], got {self.workspace_mib}")
        if self.plugin_library is not None and not Path(self.plugin_library).is_file():
            raise EngineConfigError(f"--plugin-lib {self.plugin_library}: no such file "
                                    "(give the path of the built libouro_trt_plugins.so)")


# ------------------------------------------------------------------------------------ artifacts
def _on_cpu(model):
    """ONNX tracing runs on the CPU, whatever --device the PyTorch stages use: a model on another
    device is traced from a CPU copy (the graph's initializers are host arrays either way), and the
    trace runs with the CPU as torch's default device."""
    import copy
    import dataclasses

    from ouro.calib.device import module_device
    from ouro.calib.quant import QuantizedModel

    if isinstance(model, QuantizedModel):
        return model if module_device(model.module).type == "cpu" else dataclasses.replace(model, module=_on_cpu(model.module))
    return model if module_device(model).type == "cpu" else copy.deepcopy(model).to("cpu")


class ExportedGraphs:
    """The ONNX ModelProto of each stage of one run, exported once (timed into `ctx`) and reused by
    every output and by --check."""

    def __init__(self, model: nn.Module, qmodel: QuantizedModel | None, options: ExportOptions, ctx: RunContext) -> None:
        self.model, self.qmodel, self.options, self.ctx = model, qmodel, options, ctx
        self._graphs: dict[Stage, onnx.ModelProto] = {}

    def graph(self, stage: Stage) -> onnx.ModelProto:
        import torch

        if stage in self._graphs:
            return self._graphs[stage]
        if stage is Stage.FP:
            from .onnx_export import FP_OPSET, export_fp

            with self.ctx.stage("export_fp"), torch.device("cpu"):
                model = export_fp(_on_cpu(self.model), fp16=self.options.fp16, opset=self.options.opset or FP_OPSET).model
        elif stage.target is not None:
            from .quantized import QDQ_OPSET, export_quantized

            if self.qmodel is None:
                raise ValueError(f"a {stage.value} graph needs a quantized model")
            with self.ctx.stage(f"export_{stage.value}"), torch.device("cpu"):
                model = export_quantized(_on_cpu(self.qmodel), stage.target, passes=self.options.passes,
                                         opset=self.options.opset or QDQ_OPSET).model
        else:
            raise ValueError(f"stage {stage.value} has no ONNX graph")
        self._graphs[stage] = model
        return model


def _save_onnx(model) -> Callable[[Path], None]:
    import onnx

    def write(tmp: Path) -> None:
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))

    return write


@dataclass(frozen=True)
class Output:
    """One file to write. `write(...)` produces it from the run's artifacts."""

    path: Path
    stage: Stage
    force: bool = False
    onnx_stage: Stage | None = None  # for an engine: the stage of the ONNX written beside it

    @property
    def target(self) -> Target | None:
        """The quantized export target (refuse a recipe it cannot express before calibrating)."""
        return self.stage.target

    @property
    def graph_stage(self) -> Stage | None:
        """The stage of the ONNX graph this output writes (the one beside a .plan); None for a QuantState."""
        return self.onnx_stage if self.stage is Stage.ENGINE else (None if self.stage is Stage.QUANT_STATE else self.stage)

    def write(self, graphs: ExportedGraphs, engine: EngineOptions, ctx: RunContext) -> Path:
        if self.stage is Stage.QUANT_STATE:
            from ouro.calib.quant import save_quant_state

            atomic_write(self.path, lambda tmp: save_quant_state(graphs.qmodel, tmp), force=self.force)
        elif self.stage is Stage.ENGINE:
            self._write_engine(graphs, engine, ctx)
        else:
            atomic_write(self.path, _save_onnx(graphs.graph(self.stage)), force=self.force)
        print(f"wrote {self.path}")
        ctx.report.setdefault("outputs", {})[str(self.path)] = self.stage.value
        return self.path

    @property
    def onnx_path(self) -> Path:
        """The ONNX file of this output (the file itself, or the one beside a .plan)."""
        if self.stage is Stage.ENGINE:
            from .engine_config import onnx_path_for_plan

            return onnx_path_for_plan(self.path)
        return self.path

    def _write_engine(self, graphs: ExportedGraphs, engine: EngineOptions, ctx: RunContext) -> None:
        onnx_path = self.onnx_path
        atomic_write(onnx_path, _save_onnx(graphs.graph(self.onnx_stage)), force=self.force)
        print(f"wrote {onnx_path}")
        from .engine_config import EngineConfig
        from .trt_build import build_engine

        cfg = EngineConfig.for_plan(self.path, onnx_path=onnx_path, batch=engine.batch, workspace_mib=engine.workspace_mib,
                                    timing_cache=engine.timing_cache, plugin_library=engine.plugin_library)
        with ctx.stage("engine"):
            build_engine(cfg)  # raises TensorRTUnavailableError (install hint + trtexec command) without TensorRT


@dataclass(frozen=True)
class OutputPlan:
    """Every file a run will write, declared and validated before any work starts.

    outputs     the `-o` request (an Output each; a .plan also declares the ONNX beside it)
    save_calib  --save-calib: the QuantState written after calibration (None: not written)
    report      --report: the JSON report (plots beside it)

    Built once by `ouro.exporter.cli` (via `plan_outputs`) from the flags, before the model is
    loaded; this is the one place where output flags are checked (extension, existing file and
    --force, writable folder, name length, two outputs on one file, --opset, --stage; OutputPlan.check
    declares them all in one ouro.calib.files.WritePlan). Checks of further output flags belong in
    `plan_outputs` / `__post_init__` here, so that a bad request fails before any work."""

    outputs: tuple[Output, ...] = ()
    save_calib: Path | None = None
    report: Path | None = None
    force: bool = False

    @property
    def target(self) -> Target | None:
        """The quantized export target that -o asks for (None: none)."""
        return self.outputs[0].target if self.outputs else None

    @property
    def builds_engine(self) -> bool:
        """-o asks for a TensorRT engine (.plan or --stage engine)."""
        return any(o.stage is Stage.ENGINE for o in self.outputs)

    def write_plan(self) -> WritePlan:
        """Every file of the plan (-o, the ONNX beside a .plan, --save-calib, --report and its plots) in
        one ouro.calib.files.WritePlan, unchecked."""
        from .pipeline import report_files

        plan = WritePlan(force=self.force)
        for o in self.outputs:
            plan.add("-o", o.path)
            if o.stage is Stage.ENGINE:
                plan.add("-o (the ONNX written beside the .plan)", o.onnx_path)
        plan.add("--save-calib", self.save_calib)
        plan.add("--report", self.report, siblings=report_files(self.report) if self.report is not None else ())
        return plan

    def check(self) -> OutputPlan:
        """No two outputs on one file, no existing file without --force, writable existing folders, names
        and paths the file system holds (OutputError, one line); returns self."""
        try:
            self.write_plan().check()
        except OSError as e:  # a path the OS refuses to even look at
            raise OutputError(f"cannot use output path {str(e.filename)[:60]}...: {e.strerror}") from None
        return self


def _stage_of(path: Path, quantized: bool) -> Stage:
    name = path.name.lower()
    for suffix, pick in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return pick(quantized)
    raise OutputError(
        f"cannot tell the output format of {path.name!r} from its extension; use one of "
        + ", ".join(s for s, _ in _SUFFIXES)
    )


def _check_opset(opset: int | None, stages: set[Stage]) -> None:
    if opset is None:
        return
    import onnx

    hi = onnx.defs.onnx_opset_version()
    lo = 21 if stages & {Stage.QDQ, Stage.PLUGIN} else 15  # INT4 Q/DQ; CastLike for the ORT reference ops
    if not lo <= opset <= hi:
        raise OutputError(f"unsupported --opset {opset} for this export: use {lo}..{hi}")
    if stages & {Stage.FP} and opset > 20:
        raise OutputError(f"unsupported --opset {opset} for an FP export: the TorchScript exporter stops at 20 (use 15..20)")


def plan_outputs(output: str | os.PathLike | None, *, stage: str | None = None, quantized: bool = False,
                 force: bool = False, opset: int | None = None, save_calib: str | os.PathLike | None = None,
                 report: str | os.PathLike | None = None) -> OutputPlan:
    """Validate the `-o` request (and --opset), then every file the run will write together (OutputPlan.check),
    before any work starts; returns the checked plan (possibly with no output)."""
    extra = {"save_calib": None if save_calib is None else Path(save_calib), "report": None if report is None else Path(report),
             "force": force}
    if output is None:
        if stage is not None:
            raise OutputError(f"--stage {stage} needs an output file (-o)")
        return OutputPlan(**extra).check()
    path = Path(output)
    st = Stage(stage) if stage else _stage_of(path, quantized)
    if st in _NEEDS_QUANT and not quantized:
        raise OutputError(
            f"{path.name}: a {st.value} output needs a quantized model; add a preset (--w4a4, --w8a8, ...), "
            "--recipe or --load-calib"
        )
    if st is Stage.FP and quantized and stage is None:
        st = Stage.PLUGIN
    out = Output(path, st, force, onnx_stage=(Stage.PLUGIN if quantized else Stage.FP) if st is Stage.ENGINE else None)
    _check_opset(opset, {out.onnx_stage or st})
    return OutputPlan((out,), **extra).check()
