"""`ouro-export ... --check`: Polygraphy comparison of each exported graph under onnxruntime.

For every ONNX file written this run, a Polygraphy `Comparator` runs
    onnxruntime (ouro custom ops registered)  vs  the PyTorch twin of that graph
and prints Polygraphy's pass/fail; then the ONNX outputs are scored against the FP PyTorch model
(cosine similarity, SNR in dB, top-1 agreement). The PyTorch twin of each stage:

    fp      the FP model                                      tolerance FP_TOL (FP16_TOL for --fp16), max error
    plugin  the fake-quant model (dynamic outliers)           tolerance PLUGIN_TOL, mean error
            (+ fp16 rounding of the activations into and out of every OutlierLinear / SelectiveScan
            node the graph feeds fp16, i.e. after the `fp16_io` pass, the default)
    qdq     the model in export mode: every quantizer's       tolerance PLUGIN_TOL
            static Q/DQ numerics (no outliers), i.e. what the QDQ graph computes

Results go to ctx.report["check"][path]. A failed comparison raises CheckFailed (exit code 2); the
run (ouro.exporter.run) writes the report first.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ouro.calib.metrics import logits, logits_vs_fp

from .context import RunContext
from .outputs import Output, Stage

if TYPE_CHECKING:
    from ouro.calib.evaluation import EvalData
    from ouro.calib.quant import QuantizedModel

__all__ = ["FP_TOL", "FP16_TOL", "PLUGIN_TOL", "CHECK_IMAGES", "CheckFailed", "compare_graph", "fp16_io_nodes",
           "check_images", "run_check"]

FP_TOL = (1e-4, 1e-4)
"""(rtol, atol) of an FP32 graph vs the PyTorch model (issue 3: logits within 1e-4)."""
FP16_TOL = (2e-2, 2e-2)
"""(rtol, atol) of an FP16 graph vs the FP32 PyTorch model."""
PLUGIN_TOL = (1e-2, 1e-2)
"""(rtol, atol) of a quantized graph vs its PyTorch twin. Given the same input, every quantizer
produces bit-identical integer codes (same `_ref` functions; tests/unit/test_onnx_quant.py). But the
graph's standard ops (RMSNorm as Pow/ReduceMean/Sqrt/Div, MatMul, Conv) round differently from
torch's in the last bit, and an input that lands within an ulp of a rounding boundary flips one code
by one step downstream. Measured on the logits (max |diff| / max |logit|): demo W4A4 2.6e-7, demo
W8A8 2.4e-3 (the 8-bit grid is 16x finer, so flips are more frequent); a wrong scale or packing
shows up as > 1e-1. Because a flip moves single logits, quantized graphs are judged on Polygraphy's
mean error statistic (check_error_stat "mean"; FP graphs on the max): on random-noise inputs to the
demo W8A8 graph the max |diff| reached 1.1e-2 while the mean was 1.6e-3."""
CHECK_IMAGES = 32
BATCH = 8


class CheckFailed(RuntimeError):
    """The exported graph does not match its PyTorch twin within the named tolerance."""

    user_facing = True


@dataclass
class CheckResult:
    passed: bool
    tolerance: tuple[float, float]
    max_abs_err: float
    metrics_vs_fp: dict
    error_stat: str = "max"

    def to_dict(self) -> dict:
        return {"polygraphy_passed": self.passed, "rtol": self.tolerance[0], "atol": self.tolerance[1], "error_stat": self.error_stat,
                "max_abs_err_vs_torch": self.max_abs_err, "vs_fp": self.metrics_vs_fp}


def fp16_io_nodes(onnx_model) -> set[str]:
    """Names of the ouro OutlierLinear / SelectiveScan nodes whose activation (input 0) arrives
    through a Cast to fp16 (the `fp16_io` pass)."""
    import onnx

    from .onnx_export import DOMAIN
    from .passes import FP16_IO_INPUTS

    m = onnx_model if isinstance(onnx_model, onnx.ModelProto) else onnx.load(str(onnx_model), load_external_data=False)
    fp16_casts = {n.output[0] for n in m.graph.node if n.op_type == "Cast"
                  and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)}
    return {n.name for n in m.graph.node
            if n.domain == DOMAIN and n.op_type in FP16_IO_INPUTS and n.input[0] in fp16_casts}


def _half(t):
    return None if t is None else t.half().float()


def _fp16_io(qmodel, names: set[str]):
    """Twin of the `fp16_io` pass: round the named nodes' activations in and out to fp16 (linears:
    x and y; scans: u, delta, B, C, z and y; A, D and every table stay fp32)."""
    from ouro.calib.families import override_ops

    def make(point) -> dict:
        prefix = point.path
        inner_linear, inner_scan = point.module.ops.linear, point.module.ops.scan

        def linear(name, module, x):
            run = inner_linear or (lambda _n, mod, v: torch.nn.functional.linear(v, mod.weight, mod.bias))
            if f"{prefix}.{name}" not in names:
                return run(name, module, x)
            return run(name, module, _half(x)).half().float()

        def scan(direction, inputs):
            if f"{prefix}.scan_{direction}" not in names:
                return inner_scan(direction, inputs)
            rounded = inputs._replace(u=_half(inputs.u), delta=_half(inputs.delta), Bm=_half(inputs.Bm),
                                      Cm=_half(inputs.Cm), z=_half(inputs.z))
            return inner_scan(direction, rounded).half().float()

        return {"linear": linear, "scan": scan}

    return override_ops(qmodel.module, make)


def _twin(stage: Stage, fp_model, qmodel, onnx_model_or_path=None):
    """(module, context manager) that computes what the graph of `stage` means, in PyTorch."""
    if stage is Stage.FP:
        return fp_model, nullcontext()
    if stage is Stage.PLUGIN:
        names = fp16_io_nodes(onnx_model_or_path) if onnx_model_or_path is not None else set()
        return qmodel.module, (_fp16_io(qmodel, names) if names else nullcontext())
    if stage is Stage.QDQ:
        from .quantized import qdq_twin

        return qmodel.module, qdq_twin(qmodel)
    raise ValueError(f"no PyTorch twin for stage {stage}")


def compare_graph(onnx_model_or_path, stage: Stage, fp_model, qmodel, images: torch.Tensor, *,
                  tol: tuple[float, float], fp16: bool = False, error_stat: str | None = None) -> CheckResult:
    """Polygraphy Comparator: onnxruntime (ouro ops) vs the PyTorch twin; then metrics vs FP."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    from .polygraphy_ext import SessionFromOuroOnnx, TorchRunner

    twin, hooks = _twin(stage, fp_model, qmodel, onnx_model_or_path)
    dtype = np.float16 if fp16 else np.float32
    feeds = [{"images": images[i : i + BATCH].numpy().astype(dtype)} for i in range(0, len(images), BATCH)]
    ort_runner = OnnxrtRunner(SessionFromOuroOnnx(onnx_model_or_path), name="onnxrt-ouro")
    with hooks:
        results = Comparator.run([ort_runner, TorchRunner(twin, name="torch-twin")], data_loader=feeds)
    error_stat = error_stat or ("max" if stage is Stage.FP else "mean")
    cmp = SimpleCompareFunc(rtol=tol[0], atol=tol[1], check_error_stat=error_stat)
    passed = bool(Comparator.compare_accuracy(results, compare_func=cmp))
    ort_out = np.concatenate([it["logits"] for it in results[ort_runner.name]]).astype(np.float32)
    twin_out = np.concatenate([it["logits"] for it in results["torch-twin"]])
    fp_out = logits(fp_model, images, BATCH).numpy()
    return CheckResult(passed, tol, float(np.abs(ort_out - twin_out).max()), logits_vs_fp(ort_out, fp_out), error_stat)


def check_images(data: EvalData | None, model: nn.Module, seed: int) -> torch.Tensor:
    """CHECK_IMAGES inputs for --check: the first evaluation images, else seeded noise of the model's input shape."""
    from .pipeline import evaluation_set

    first = evaluation_set(data, CHECK_IMAGES)
    if first is not None:
        return first[0][:CHECK_IMAGES].float()
    cfg = model.cfg
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(CHECK_IMAGES, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g, device="cpu")


def run_check(outputs: Sequence[Output], model: nn.Module, qmodel: QuantizedModel | None, images: torch.Tensor, *,
              fp16: bool, ctx: RunContext) -> dict:
    """--check: compare every ONNX graph written this run (fp16: the FP graph is float16); print and
    record the results in ctx.report["check"]. Raises CheckFailed when a comparison fails."""
    report = ctx.report.setdefault("check", {})
    failed = []
    for out in outputs:
        stage = out.graph_stage
        if stage is None:
            continue
        tol = (FP16_TOL if fp16 else FP_TOL) if stage is Stage.FP else PLUGIN_TOL
        with ctx.stage(f"check_{stage.value}"):
            res = compare_graph(str(out.onnx_path), stage, model, qmodel, images, tol=tol, fp16=fp16 and stage is Stage.FP)
        report[str(out.onnx_path)] = {"stage": stage.value, "images": int(len(images)), **res.to_dict()}
        m = res.metrics_vs_fp
        print(f"check {out.onnx_path} ({stage.value}): Polygraphy {'PASSED' if res.passed else 'FAILED'} "
              f"({res.error_stat} error, rtol {tol[0]:g}, atol {tol[1]:g}; max |err| {res.max_abs_err:.3g}); vs FP: cosine {m['cosine']}, "
              f"SNR {m['snr_db']} dB, top-1 agreement {m['top1_agreement']:.2%}")
        if not res.passed:
            failed.append(str(out.onnx_path))
    if failed:
        raise CheckFailed(f"Polygraphy comparison failed for {', '.join(failed)} (see the table above)")
    return report
