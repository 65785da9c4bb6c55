"""TensorRT engine build configuration: everything about building an engine that can be decided
and tested without TensorRT (the TensorRT calls themselves live in `ouro.exporter.trt_build`).

    cfg = EngineConfig(onnx_path="vim_s.onnx", plan_path="vim_s.plan", batch=BatchProfile.parse("1,32,128"))
    trtexec_build_command(cfg)   # the exact trtexec command line that builds the same engine
    trtexec_bench_command("vim_s.plan", cfg.input, batch=32, plugin_library=cfg.plugin_library)

Precision comes from the ONNX file (TensorRT >= 11 networks are always strongly typed: FP16 from
fp16 tensors, INT8/INT4 from Q/DQ and the ouro plugins), so an FP16 baseline engine and a W4A4
engine are built by the very same path from their respective ONNX files.
"""
from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .native import LIBRARIES, NativeLibraryError, find_library

__all__ = [
    "PLUGIN_LIBRARY_NAME",
    "PLUGIN_LIBRARY_ENV",
    "DEFAULT_WORKSPACE_MIB",
    "MAX_WORKSPACE_MIB",
    "BatchProfile",
    "InputSpec",
    "EngineConfig",
    "EngineConfigError",
    "TensorRTUnavailableError",
    "input_spec_from_onnx",
    "custom_ops_in_onnx",
    "find_plugin_library",
    "onnx_path_for_plan",
    "trtexec_build_command",
    "trtexec_bench_command",
    "shell_join",
    "tensorrt_missing_message",
]

PLUGIN_LIBRARY_NAME = LIBRARIES["ouro_trt_plugins"].file
PLUGIN_LIBRARY_ENV = LIBRARIES["ouro_trt_plugins"].env
DEFAULT_WORKSPACE_MIB = 4096
MAX_WORKSPACE_MIB = 1 << 20  # 1 TiB: beyond any GPU's memory
# TensorRT 10.x needs --stronglyTyped; from 11 on every network is strongly typed and the flag is gone.
FIRST_ALWAYS_STRONGLY_TYPED_MAJOR = 11
DEFAULT_TENSORRT_MAJOR = 11
TENSORRT_INSTALL_HINT = (
    "install TensorRT: the Python wheel from NVIDIA's index "
    "(pip install --extra-index-url https://pypi.nvidia.com tensorrt), which also needs a CUDA GPU driver, "
    "or the TensorRT SDK tarball from https://developer.nvidia.com/tensorrt (its bin/ has trtexec)"
)


class EngineConfigError(ValueError):
    """A bad engine-build setting (batch profile, workspace, paths, ONNX inputs); the message names it."""

    user_facing = True


class TensorRTUnavailableError(RuntimeError):
    """TensorRT's Python package is not importable. The message names what to install and the
    trtexec command that builds the same engine from the ONNX file with the plugin library."""

    user_facing = True


@dataclass(frozen=True)
class BatchProfile:
    """Optimisation profile for the batch dimension: min <= opt <= max, all >= 1."""

    min: int = 1
    opt: int = 32
    max: int = 128

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) and v >= 1 for v in (self.min, self.opt, self.max)):
            raise EngineConfigError(f"batch profile values must be integers >= 1, got {self.min},{self.opt},{self.max}")
        if not self.min <= self.opt <= self.max:
            raise EngineConfigError(f"batch profile must satisfy min <= opt <= max, got {self.min},{self.opt},{self.max}")

    @classmethod
    def parse(cls, text: str) -> BatchProfile:
        """'1,32,128' -> (1, 32, 128); a single value 'N' means a fixed batch N,N,N."""
        parts = [p.strip() for p in str(text).split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise EngineConfigError(f"--batch expects min,opt,max integers like 1,32,128; got {text!r}") from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise EngineConfigError(f"--batch expects 1 or 3 comma-separated integers (min,opt,max); got {text!r}")
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.min},{self.opt},{self.max}"


@dataclass(frozen=True)
class InputSpec:
    """The network input: its name and its shape without the (dynamic) batch dimension."""

    name: str
    sample_shape: tuple[int, ...]

    def shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.sample_shape)

    def trtexec_shape(self, batch: int) -> str:
        """'images:32x3x224x224' (trtexec --shapes/--minShapes syntax)."""
        return f"{self.name}:" + "x".join(str(d) for d in self.shape(batch))


@dataclass(frozen=True)
class EngineConfig:
    """How to build one engine from one ONNX file."""

    onnx_path: Path
    plan_path: Path
    batch: BatchProfile = field(default_factory=BatchProfile)
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    timing_cache: Path | None = None
    plugin_library: Path | None = None  # None: plugin-free graph (e.g. an FP16 engine without custom nodes)
    input: InputSpec | None = None      # None: read from the ONNX file (input_spec_from_onnx)
    # Version-compatible plan (--versionCompatible) with the plugin library serialised inside it
    # (--setPluginsToSerialize; TensorRT embeds plugin libraries only in version-compatible plans).
    # Default: a version-specific plan (fastest); the application loads the plugin library itself.
    version_compatible: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "onnx_path", Path(self.onnx_path))
        object.__setattr__(self, "plan_path", Path(self.plan_path))
        for name in ("timing_cache", "plugin_library"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, Path(v))
        if isinstance(self.batch, str):
            object.__setattr__(self, "batch", BatchProfile.parse(self.batch))
        if not isinstance(self.workspace_mib, int) or self.workspace_mib < 1:
            raise EngineConfigError(f"--workspace must be a positive number of MiB, got {self.workspace_mib!r}")
        if self.plan_path.suffix != ".plan":
            raise EngineConfigError(f"engine output must end in .plan, got {self.plan_path}")

    def resolved_input(self) -> InputSpec:
        return self.input if self.input is not None else input_spec_from_onnx(self.onnx_path)

    @classmethod
    def for_plan(cls, plan_path: str | os.PathLike, *, onnx_path: str | os.PathLike | None = None,
                 batch: str | BatchProfile = BatchProfile(), workspace_mib: int = DEFAULT_WORKSPACE_MIB,
                 timing_cache: str | os.PathLike | None = None,
                 plugin_library: str | os.PathLike | None = None, version_compatible: bool = False) -> EngineConfig:
        """The config of a `-o X.plan` request: ONNX beside the plan (X.onnx) unless given, plugin
        library from `plugin_library` / $OURO_TRT_PLUGINS / the in-tree build (find_plugin_library)."""
        return cls(
            onnx_path=Path(onnx_path) if onnx_path is not None else onnx_path_for_plan(plan_path),
            plan_path=Path(plan_path),
            batch=BatchProfile.parse(batch) if isinstance(batch, str) else batch,
            workspace_mib=workspace_mib,
            timing_cache=Path(timing_cache) if timing_cache is not None else None,
            plugin_library=find_plugin_library(plugin_library),
            version_compatible=version_compatible,
        )

    def check_plugins_available(self) -> None:
        """A graph with ouro custom nodes needs the plugin library: fail early, naming the nodes."""
        ops = custom_ops_in_onnx(self.onnx_path)
        if ops and self.plugin_library is None:
            found = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))
            raise EngineConfigError(
                f"{self.onnx_path} has ouro plugin nodes ({found}) but no {PLUGIN_LIBRARY_NAME} was found: build it "
                "(cmake -S trt_plugins -B build/trt -DTensorRT_ROOT=<TensorRT> && cmake --build build/trt), "
                f"or pass --plugin-lib / set ${PLUGIN_LIBRARY_ENV}")


def input_spec_from_onnx(path: str | os.PathLike) -> InputSpec:
    """The single graph input of an exported model: its name and its non-batch dimensions.
    Dimension 0 is the batch (symbolic or not); every other dimension must be static."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise EngineConfigError(f"ONNX file {path} does not exist")
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise EngineConfigError(f"{path}: expected exactly one graph input (the images), found {[i.name for i in inputs]}")
    inp = inputs[0]
    dims = inp.type.tensor_type.shape.dim
    if len(dims) < 2:
        raise EngineConfigError(f"{path}: input {inp.name!r} has rank {len(dims)}, expected (batch, ...)")
    sample = []
    for k, d in enumerate(dims[1:], start=1):
        if not d.HasField("dim_value"):
            raise EngineConfigError(f"{path}: input {inp.name!r} dimension {k} ({d.dim_param or '?'}) is not static; "
                                    "only the batch dimension may be dynamic")
        sample.append(int(d.dim_value))
    return InputSpec(inp.name, tuple(sample))


def custom_ops_in_onnx(path: str | os.PathLike, domain: str = "ouro") -> dict[str, int]:
    """Counts of the custom-domain node types in an ONNX file (e.g. {'OutlierLinear': 96, 'SelectiveScan': 48})."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == domain:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def find_plugin_library(explicit: str | os.PathLike | None = None) -> Path | None:
    """libouro_trt_plugins.so through the one native-library finder (`ouro.exporter.native`):
    `explicit`, else $OURO_TRT_PLUGINS, else the in-tree build; None when none is found."""
    try:
        return find_library("ouro_trt_plugins", explicit)
    except NativeLibraryError as e:
        raise EngineConfigError(f"{e}; build it with `cmake -S trt_plugins -B build/trt -DTensorRT_ROOT=<TensorRT> "
                                "&& cmake --build build/trt`") from None


def onnx_path_for_plan(plan_path: str | os.PathLike) -> Path:
    """Where the ONNX that feeds a .plan request is written: beside it, same stem (vim_s.plan -> vim_s.onnx)."""
    return Path(plan_path).with_suffix(".onnx")


def _plugin_arg(cfg_plugin: Path | None) -> str:
    return str(cfg_plugin) if cfg_plugin is not None else PLUGIN_LIBRARY_NAME


def trtexec_build_command(cfg: EngineConfig, *, tensorrt_major: int = DEFAULT_TENSORRT_MAJOR,
                          input_spec: InputSpec | None = None, trtexec: str = "trtexec") -> list[str]:
    """The trtexec command line that builds the same engine as `ouro.exporter.trt_build.build_engine(cfg)`."""
    spec = input_spec or cfg.resolved_input()
    cmd = [trtexec, f"--onnx={cfg.onnx_path}", f"--saveEngine={cfg.plan_path}"]
    if tensorrt_major < FIRST_ALWAYS_STRONGLY_TYPED_MAJOR:
        cmd.append("--stronglyTyped")
    lib = _plugin_arg(cfg.plugin_library)
    cmd.append(f"--dynamicPlugins={lib}")
    if cfg.version_compatible:
        cmd += ["--versionCompatible", f"--setPluginsToSerialize={lib}"]
    cmd += [
        f"--minShapes={spec.trtexec_shape(cfg.batch.min)}",
        f"--optShapes={spec.trtexec_shape(cfg.batch.opt)}",
        f"--maxShapes={spec.trtexec_shape(cfg.batch.max)}",
        f"--memPoolSize=workspace:{cfg.workspace_mib}M",
    ]
    if cfg.timing_cache is not None:
        cmd.append(f"--timingCacheFile={cfg.timing_cache}")
    return cmd


def trtexec_bench_command(plan_path: str | os.PathLike, spec: InputSpec, batch: int, *,
                          plugin_library: str | os.PathLike | None = None, iterations: int = 200,
                          warmup_ms: int = 500, trtexec: str = "trtexec",
                          export_times: str | os.PathLike | None = None) -> list[str]:
    """trtexec latency/throughput run of a built engine at one batch size (CUDA graphs, no H2D/D2H copies,
    so the numbers are the engine's own GPU time). export_times: write every inference's timings as
    JSON (trtexec --exportTimes), the machine-readable form of its summary."""
    if batch < 1 or iterations < 1:
        raise EngineConfigError(f"batch and iterations must be >= 1, got batch={batch}, iterations={iterations}")
    cmd = [trtexec, f"--loadEngine={plan_path}", f"--shapes={spec.trtexec_shape(batch)}"]
    if plugin_library is not None:
        cmd.append(f"--dynamicPlugins={plugin_library}")
    cmd += [f"--iterations={iterations}", f"--warmUp={warmup_ms}", "--duration=0",
            "--useCudaGraph", "--noDataTransfers", "--useSpinWait"]
    if export_times is not None:
        cmd.append(f"--exportTimes={export_times}")
    return cmd


def shell_join(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


def tensorrt_missing_message(cfg: EngineConfig | None, *, reason: str = "the tensorrt Python package is not importable") -> str:
    """What to install, what was already written, and the trtexec command that builds the engine."""
    lines = [f"cannot build a TensorRT engine here: {reason}.", f"To build it, {TENSORRT_INSTALL_HINT}."]
    if cfg is not None:
        if cfg.onnx_path.is_file():
            lines.append(f"The ONNX model was written to {cfg.onnx_path}.")
        try:
            spec = cfg.resolved_input()
        except EngineConfigError:
            spec = InputSpec("images", (3, 224, 224))  # the exporter's input name; shape as a placeholder
        lib_note = "" if cfg.plugin_library is not None else (
            f" ({PLUGIN_LIBRARY_NAME} is built by `cmake -S trt_plugins -B build/trt -DTensorRT_ROOT=<TensorRT> "
            "&& cmake --build build/trt`)")
        lines.append("Then build the engine on a GPU machine with TensorRT" + lib_note + ":")
        lines.append("  " + shell_join(trtexec_build_command(cfg, input_spec=spec)))
        if not cfg.version_compatible:
            vc = replace(cfg, version_compatible=True)
            lines.append("or, as a version-compatible plan that carries the plugin library inside it:")
            lines.append("  " + shell_join(trtexec_build_command(vc, input_spec=spec)))
    return "\n".join(lines)
