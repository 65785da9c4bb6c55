"""TensorRT engine build: the thin layer over TensorRT's Python API (all decisions that can be
tested without TensorRT live in `ouro.exporter.engine_config`).

    from ouro.exporter.engine_config import EngineConfig
    from ouro.exporter.trt_build import build_engine
    build_engine(EngineConfig("vim_s.onnx", "vim_s.plan", plugin_library=find_plugin_library()))

It parses the plugin ONNX with TensorRT's ONNX parser (custom nodes -> ouro plugins by name,
version and namespace), loads libouro_trt_plugins.so into the builder's plugin registry, builds a
strongly typed network (precision comes from the ONNX types and Q/DQ), with one optimisation
profile over the batch, a workspace limit and an optional timing cache, and writes the plan
atomically. Without TensorRT it raises TensorRTUnavailableError, whose message says what to install
and gives the equivalent trtexec command.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ouro.calib.files import atomic_write

from .engine_config import (
    FIRST_ALWAYS_STRONGLY_TYPED_MAJOR,
    EngineConfig,
    EngineConfigError,
    TensorRTUnavailableError,
    tensorrt_missing_message,
)

__all__ = ["EngineBuildError", "TensorRTUnavailableError", "import_tensorrt", "build_engine", "compare_with_onnxruntime"]


class EngineBuildError(RuntimeError):
    """TensorRT refused the network (parser or builder error); the message carries TensorRT's own."""

    user_facing = True


def import_tensorrt(cfg: EngineConfig | None = None):
    """`import tensorrt`, or TensorRTUnavailableError naming the install and the trtexec command."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: wheel present but libnvinfer missing
        raise TensorRTUnavailableError(tensorrt_missing_message(cfg, reason=f"`import tensorrt` failed ({e})")) from None
    return trt


def _major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def build_engine(cfg: EngineConfig, *, log: Callable[[str], None] = print) -> Path:
    """Build cfg.plan_path from cfg.onnx_path. Returns the plan path."""
    trt = import_tensorrt(cfg)
    cfg.check_plugins_available()
    import onnx

    from .plugin import refuse_ungated_scans

    refuse_ungated_scans(onnx.load(str(cfg.onnx_path), load_external_data=False), str(cfg.onnx_path))
    spec = cfg.resolved_input()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)

    if cfg.plugin_library is not None:
        if not cfg.plugin_library.is_file():
            raise EngineConfigError(f"plugin library {cfg.plugin_library} does not exist")
        if not builder.get_plugin_registry().load_library(str(cfg.plugin_library)):
            raise EngineBuildError(f"TensorRT could not load the plugin library {cfg.plugin_library}")

    flags = 0
    if _major(trt) < FIRST_ALWAYS_STRONGLY_TYPED_MAJOR:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(cfg.onnx_path)):
        errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {cfg.onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.name, spec.shape(cfg.batch.min), spec.shape(cfg.batch.opt), spec.shape(cfg.batch.max))
    config.add_optimization_profile(profile)
    if cfg.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if cfg.plugin_library is not None:  # embedded; the runtime needs engine_host_code_allowed = True
            config.plugins_to_serialize = [str(cfg.plugin_library)]
    cache = None
    if cfg.timing_cache is not None:
        data = cfg.timing_cache.read_bytes() if cfg.timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {cfg.onnx_path} (see the log above)")
    atomic_write(cfg.plan_path, bytes(serialized))
    if cache is not None:
        atomic_write(cfg.timing_cache, bytes(config.get_timing_cache().serialize()))
    log(f"wrote {cfg.plan_path} ({cfg.plan_path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s; "
        f"batch profile {cfg.batch}")
    return cfg.plan_path


def compare_with_onnxruntime(cfg: EngineConfig, *, batch: int = 1, atol: float = 1e-2, rtol: float = 1e-2) -> bool:
    """Polygraphy comparison of the built engine against the ONNX graph under onnxruntime (ouro custom
    ops registered). Prints Polygraphy's report and returns whether it passed."""
    trt = import_tensorrt(cfg)
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, CompareFunc, DataLoader

    from . import onnxruntime_session

    spec = cfg.resolved_input()
    if cfg.plugin_library is not None:
        trt.get_plugin_registry().load_library(str(cfg.plugin_library))
    runners = [
        TrtRunner(EngineFromBytes(cfg.plan_path.read_bytes())),
        OnnxrtRunner(lambda: onnxruntime_session(str(cfg.onnx_path))),
    ]
    meta = TensorMetadata().add(spec.name, dtype=None, shape=spec.shape(batch))  # dtype from the model
    results = Comparator.run(runners, data_loader=DataLoader(iterations=1, input_metadata=meta))
    return bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol)))
