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

from ouro.calib.files import OutputError, atomic_write
from ouro.recipes import Target

__all__ = ["Stage", "OutputError", "Output", "plan_outputs", "atomic_write", "exported_graph"]


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


def _check_writable(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputError(f"{path} already exists; pass --force to overwrite it")
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: folder {parent} is not writable")


# ------------------------------------------------------------------------------------ artifacts
def _cache(ctx) -> dict:
    c = getattr(ctx, "_exported", None)
    if c is None:
        c = {}
        ctx._exported = c
    return c


def _opset(ctx, default: int) -> int:
    return getattr(ctx.args, "opset", None) or default


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


def exported_graph(ctx, stage: Stage):
    """The ONNX ModelProto of a stage, exported once per run (and timed in ctx.timings)."""
    import torch

    cache = _cache(ctx)
    if stage in cache:
        return cache[stage]
    if stage is Stage.FP:
        from .onnx_export import FP_OPSET, export_fp

        with ctx.stage("export_fp"), torch.device("cpu"):
            model = export_fp(_on_cpu(ctx.model), fp16=bool(getattr(ctx.args, "fp16", False)), opset=_opset(ctx, FP_OPSET)).model
    elif stage.target is not None:
        from .passes import parse_pass_names
        from .quantized import QDQ_OPSET, export_quantized

        with ctx.stage(f"export_{stage.value}"), torch.device("cpu"):
            model = export_quantized(_on_cpu(ctx.qmodel), stage.target, passes=parse_pass_names(getattr(ctx.args, "passes", None)),
                                     opset=_opset(ctx, QDQ_OPSET)).model
    else:
        raise ValueError(f"stage {stage.value} has no ONNX graph")
    cache[stage] = model
    return model


def _save_onnx(model) -> Callable[[Path], None]:
    import onnx

    def write(tmp: Path) -> None:
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))

    return write


@dataclass
class Output:
    """One file to write. `write(ctx)` produces it from the run context."""

    path: Path
    stage: Stage
    force: bool = False
    onnx_stage: Stage | None = None  # for an engine: the stage of the ONNX written beside it

    @property
    def target(self) -> Target | None:
        """The quantized export target (refuse a recipe it cannot express before calibrating)."""
        return self.stage.target

    def write(self, ctx) -> Path:
        if self.stage is Stage.QUANT_STATE:
            from ouro.calib.quant import save_quant_state

            atomic_write(self.path, lambda tmp: save_quant_state(ctx.qmodel, tmp), force=self.force)
        elif self.stage is Stage.ENGINE:
            self._write_engine(ctx)
        else:
            atomic_write(self.path, _save_onnx(exported_graph(ctx, self.stage)), force=self.force)
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

    def _write_engine(self, ctx) -> None:
        onnx_path = self.onnx_path
        atomic_write(onnx_path, _save_onnx(exported_graph(ctx, self.onnx_stage)), force=self.force)
        print(f"wrote {onnx_path}")
        from .engine_config import EngineConfig
        from .trt_build import build_engine

        a = ctx.args
        cfg = EngineConfig.for_plan(
            self.path, onnx_path=onnx_path, batch=getattr(a, "batch", "1,32,128"),
            workspace_mib=getattr(a, "workspace", 4096), timing_cache=getattr(a, "timing_cache", None),
            plugin_library=getattr(a, "plugin_lib", None),
        )
        with ctx.stage("engine"):
            build_engine(cfg)  # raises TensorRTUnavailableError (install hint + trtexec command) without TensorRT


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
                 force: bool = False, passes: str | None = None, opset: int | None = None) -> list[Output]:
    """Validate the `-o` request (and --passes, --opset) before any work starts; returns the outputs
    to write (possibly none)."""
    if passes is not None:
        from .passes import parse_pass_names

        parse_pass_names(passes)
    if output is None:
        if stage is not None:
            raise OutputError(f"--stage {stage} needs an output file (-o)")
        return []
    path = Path(output)
    st = Stage(stage) if stage else _stage_of(path, quantized)
    if st in _NEEDS_QUANT and not quantized:
        raise OutputError(
            f"{path.name}: a {st.value} output needs a quantized model; add a preset (--w4a4, --w8a8, ...), "
            "--recipe or --load-calib"
        )
    if st is Stage.FP and quantized and stage is None:
        st = Stage.PLUGIN
    _check_writable(path, force)
    out = Output(path, st, force)
    if st is Stage.ENGINE:
        out.onnx_stage = Stage.PLUGIN if quantized else Stage.FP
        _check_writable(out.onnx_path, force)
    _check_opset(opset, {out.onnx_stage or st})
    return [out]
