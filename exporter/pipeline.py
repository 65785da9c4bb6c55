"""Pipeline stages of the quantized path: FP evaluation, calibration (or QuantState load), report.

    data = load_evaluation(source, ctx.dist)          this process's share of the evaluation set (or None)
    fp_pred = evaluate_fp(model, data, ctx)          FP top-1 on the evaluation set
    qmodel = quantize(model, recipe=..., calib=..., data=data, fp_pred=fp_pred, ctx=ctx)
                                                     calibrate (or load a QuantState), save it, quantized metrics, summary
    write_report(ctx, path)                          JSON report (+ PNG plots beside it when matplotlib is available)

Each stage takes its inputs as arguments and returns its artifact; `ctx` (ouro.exporter.context.RunContext)
carries only the device, the torchrun processes, the timings and the report.

Report keys: recipe, method, calibration (source, images), fp_top1, quant_top1, top1_delta,
top1_agreement, sqnr_db (per block), outlier_rate (per quantizer), compression (vs FP16), timings.
The metrics themselves are ouro.calib.metrics; the numerics live in ouro.calib. Every PyTorch stage
runs on the model's device; top-1 over the evaluation set is sharded over torchrun
processes (ctx.dist, ouro.calib.evaluation) and identical to one process's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from typing import TYPE_CHECKING

from torch import Tensor, nn

from ouro.calib.distributed import SINGLE, DistContext
from ouro.calib.files import atomic_write
from ouro.calib.metrics import agreement, block_sqnr, predict, top1

from .context import RunContext

if TYPE_CHECKING:
    from ouro.calib.evaluation import EvalData
    from ouro.calib.quant import QuantizedModel
    from ouro.recipes import Recipe

    from .run_config import CalibSource

__all__ = [
    "SQNR_MAX_IMAGES",
    "load_evaluation",
    "evaluation_set",
    "outlier_rates",
    "memory_compression",
    "evaluate_fp",
    "calibrate_model",
    "load_calibration",
    "save_calibration",
    "quantize",
    "quantized_metrics",
    "format_table",
    "write_report",
    "report_files",
    "strict_json",
]

SQNR_MAX_IMAGES = 256  # images used for the per-block SQNR and the outlier rates
FP16_BYTES = 2
SCALE_BYTES = 4  # scales and thresholds are stored as fp32


def outlier_rates(qmodel, images: Tensor) -> dict[str, float]:
    """Fraction of activation elements quantized as outliers, per quantizer (runs `images`)."""
    from ouro.calib.quant import QuantMode, iter_quant_points, set_quant_mode

    set_quant_mode(qmodel, QuantMode.QUANT, track_stats=True)
    qs = [(f"{point.key}.{n}", q) for point, ops in iter_quant_points(qmodel) for n, q in ops.quantizers()]
    for _, q in qs:
        q.reset_stats()
    try:
        predict(qmodel, images)
    finally:
        set_quant_mode(qmodel, QuantMode.QUANT, track_stats=False)
    return {n: round(q.stats()["outlier_rate"], 6) for n, q in qs if "outlier_rate" in q.stats()}


def memory_compression(model: nn.Module, qmodel) -> dict:
    """Memory vs FP16: packed integer weights plus every scale and threshold (fp32).

    Integer tensors: the weight of each linear with a weight quantizer, and every constant a
    quantizer stores as `codes` (SSM A, D), at the quantizer's `bits`. Scales: every floating
    tensor a quantizer stores in the QuantState (`state_keys`), at 4 bytes.
    quantized_layers: FP16 size of the quantized tensors / their quantized size (scales included);
    model: the whole model, unquantized parameters counted as FP16 on both sides."""
    from ouro.calib.quant import iter_quant_points

    fp16_q = q_bytes = 0.0
    for point, ops in iter_quant_points(qmodel):
        weights = {id(q): point.linear(name).module.weight.numel() for name, q in ops.weight.items()}
        for _, q in ops.quantizers():
            sd = q.state_dict()
            keys = q.state_keys()
            n_int = weights.get(id(q), sd["codes"].numel() if "codes" in keys else 0)
            if n_int:
                fp16_q += n_int * FP16_BYTES
                q_bytes += n_int * q.format.bits / 8
            q_bytes += sum(sd[k].numel() * SCALE_BYTES for k in keys if k != "codes" and sd[k].is_floating_point())
    total_fp16 = sum(p.numel() for p in model.parameters()) * FP16_BYTES
    model_q = total_fp16 - fp16_q + q_bytes
    return {
        "fp16_bytes": int(total_fp16),
        "quantized_bytes": int(round(model_q)),
        "model": round(total_fp16 / model_q, 3) if model_q else None,
        "quantized_layers": round(fp16_q / q_bytes, 3) if fp16_q else None,
    }


# --------------------------------------------------------------------------------------- data
def load_evaluation(source, dist: DistContext = SINGLE) -> EvalData | None:
    """This process's share of the evaluation set (ouro.calib.evaluation.EvalData) of an EvalSource;
    None when there is no evaluation set (source None)."""
    from ouro.calib.evaluation import EvalData

    return None if source is None else EvalData.load(source, dist)


def evaluation_set(data: EvalData | None, n: int | None = None) -> tuple[Tensor, Tensor] | None:
    """(images, labels) of the first n evaluation images (all when None and not sharded), on the CPU;
    None when there is no evaluation set."""
    if data is None:
        return None
    if len(data.batches) == data.total_batches:  # one process holds the whole set
        x, y = data.images(), data.labels()
        return (x, y) if n is None else (x[:n], y[:n])
    if n is None:
        raise ValueError("the evaluation set is sharded over processes; ask for its first n images")
    return data.source.load(list(range(min(n, data.source.size()))))


# ------------------------------------------------------------------------------------- stages
def evaluate_fp(model: nn.Module, data: EvalData | None, ctx: RunContext) -> Tensor | None:
    """FP top-1 on the evaluation set (report: fp_top1, eval_images); returns the FP predictions
    (None without an evaluation set)."""
    from ouro.calib.evaluation import predict_all

    if data is None:
        print("ouro-export: no evaluation data (use --demo or --eval-dir); skipping FP top-1")
        return None
    with ctx.stage("eval_fp"):
        fp_pred, labels = predict_all(model, data, ctx.dist, desc="evaluate FP")
        acc = top1(fp_pred, labels)
    ctx.report["fp_top1"] = round(acc, 3)
    ctx.report["eval_images"] = int(labels.shape[0])
    if ctx.is_main:
        print(f"FP top-1: {acc:.2f} % on {labels.shape[0]} images")
    return fp_pred


def calibrate_model(model: nn.Module, recipe: Recipe, source: CalibSource, ctx: RunContext) -> QuantizedModel:
    """Draw the calibration images of `source` and calibrate `model` with `recipe`."""
    from ouro.calib.imagefolder import make_forward_loop
    from ouro.calib.quant import calibrate

    with ctx.stage("calib_data"):
        images = source.images(model, ctx.dist)
    ctx.report["calibration"] = {"source": source.spec.kind, "images": int(images.shape[0]), "seed": source.seed}
    with ctx.stage("calibrate"):
        qmodel = calibrate(model, recipe, make_forward_loop(images), seed=source.seed, progress=ctx.is_main)
    ctx.report["calibration"]["block_losses"] = [round(v, 6) for v in qmodel.calib_losses]
    return qmodel


def load_calibration(model: nn.Module, path: str | Path, ctx: RunContext) -> QuantizedModel:
    """The QuantizedModel of a saved QuantState (no data, no calibration)."""
    from ouro.calib.quant import load_quant_state

    with ctx.stage("load_calib"):
        qmodel = load_quant_state(model, path)
    ctx.report["calibration"] = {"quant_state": str(path)}
    return qmodel


def save_calibration(qmodel: QuantizedModel, path: str | Path, ctx: RunContext, *, force: bool = False) -> None:
    """Write the QuantState (no-clobber unless `force`: the output plan checked the path before the run)."""
    from ouro.calib.quant import save_quant_state

    with ctx.stage("save_calib"):
        atomic_write(path, lambda tmp: save_quant_state(qmodel, tmp), force=force)


def quantize(model: nn.Module, *, recipe: Recipe | None = None, calib: CalibSource | None = None,
             load_calib: str | Path | None = None, save_calib: str | Path | None = None, force: bool = False,
             data: EvalData | None = None, fp_pred: Tensor | None = None, ctx: RunContext) -> QuantizedModel:
    """Calibrate `model` with `recipe` on `calib` (or load the QuantState `load_calib`), optionally
    save it, then measure (quantized_metrics) and print the summary."""
    if load_calib is not None:
        qmodel = load_calibration(model, load_calib, ctx)
    elif recipe is not None and calib is not None:
        qmodel = calibrate_model(model, recipe, calib, ctx)
    else:
        raise ValueError("quantize needs a recipe and a calibration source, or a QuantState to load")
    if save_calib is not None:
        save_calibration(qmodel, save_calib, ctx, force=force)
    ctx.report["recipe"] = qmodel.recipe.to_dict()
    ctx.report["method"] = qmodel.recipe.method.value
    ctx.report["method_info"] = qmodel.method_info
    quantized_metrics(model, qmodel, data, fp_pred, ctx)
    if ctx.is_main:
        print(format_table({**ctx.report, "timings": dict(ctx.timings)}))
    return qmodel


def quantized_metrics(model: nn.Module, qmodel: QuantizedModel, data: EvalData | None, fp_pred: Tensor | None,
                      ctx: RunContext) -> None:
    """Quantized top-1, agreement with FP, per-block SQNR, outlier rates, compression (into ctx.report).
    fp_pred: the FP predictions of evaluate_fp (computed here when None)."""
    from ouro.calib.evaluation import predict_all

    ctx.report["compression"] = memory_compression(model, qmodel)
    if data is None:
        return
    with ctx.stage("eval_quant"):
        qpred, y = predict_all(qmodel, data, ctx.dist, desc="evaluate quantized")
    ctx.report["quant_top1"] = round(top1(qpred, y), 3)
    ctx.report["eval_images"] = int(y.shape[0])
    if fp_pred is None:
        with ctx.stage("eval_fp"):
            fp_pred, _ = predict_all(model, data, ctx.dist, desc="evaluate FP")
        ctx.report["fp_top1"] = round(top1(fp_pred, y), 3)
    ctx.report["top1_delta"] = round(ctx.report["quant_top1"] - ctx.report["fp_top1"], 3)
    ctx.report["top1_agreement"] = round(agreement(qpred, fp_pred), 3)
    if not ctx.is_main:  # the per-block metrics are rank 0's (it writes the report)
        return
    sub = evaluation_set(data, SQNR_MAX_IMAGES)[0]
    with ctx.stage("sqnr"):
        ctx.report["sqnr_db"] = block_sqnr(model, qmodel, sub)
        ctx.report["outlier_rate"] = outlier_rates(qmodel, sub)


def format_table(report: dict) -> str:
    """Human-readable summary of a report."""
    rows = [("recipe", f"{report.get('recipe', {}).get('name')} ({report.get('method')})")]
    cal = report.get("calibration", {})
    if "images" in cal:
        rows.append(("calibration", f"{cal['source']}, {cal['images']} images, seed {cal['seed']}"))
    elif "quant_state" in cal:
        rows.append(("calibration", f"loaded from {cal['quant_state']}"))
    for k, label in (("fp_top1", "FP top-1 %"), ("quant_top1", "quantized top-1 %"), ("top1_delta", "delta (points)"), ("top1_agreement", "top-1 agreement with FP %")):
        if k in report:
            rows.append((label, f"{report[k]:.2f}"))
    s = report.get("sqnr_db")
    if s:
        rows.append(("SQNR per block (dB)", f"min {min(s):.1f} / mean {sum(s) / len(s):.1f} / last {s[-1]:.1f}"))
    o = report.get("outlier_rate")
    if o:
        v = list(o.values())
        rows.append(("outlier rate", f"mean {100 * sum(v) / len(v):.2f} % / max {100 * max(v):.2f} % over {len(v)} quantizers"))
    c = report.get("compression")
    if c:
        rows.append(("memory vs FP16", f"{c['model']}x model, {c['quantized_layers']}x quantized layers"))
    t = report.get("timings")
    if t:
        rows.append(("timings (s)", ", ".join(f"{k} {v:.1f}" for k, v in t.items())))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


REPORT_PLOTS = (".sqnr.png", ".outliers.png")  # written beside the report: r.json -> r.sqnr.png, r.outliers.png


def report_files(path: str | Path) -> tuple[Path, ...]:
    """The files a report at `path` may write besides itself (the plots), for the output plan."""
    return tuple(Path(path).with_suffix(s) for s in REPORT_PLOTS)


def _finite_or_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    return v


def strict_json(obj) -> str:
    """JSON that strict parsers accept: NaN and infinities become null (a metric that has no value)."""
    return json.dumps(_finite_or_none(obj), indent=2, default=str, allow_nan=False)


def write_report(ctx: RunContext, path: str | Path, *, force: bool = False) -> Path:
    """Write ctx.report (+ timings) as strict JSON; plots (SQNR per block, outlier rates) beside it.
    Each file is written atomically; an existing one is replaced only with `force` (--force: the
    output plan checked every one of them before the run)."""
    path = Path(path)
    rep = dict(ctx.report)
    rep["timings"] = dict(ctx.timings)
    atomic_write(path, strict_json(rep).encode(), force=force)
    try:
        _plots(rep, path, force)
    except ImportError:
        pass
    return path


def _save_fig(fig, path: Path, force: bool) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), force=force)


def _plots(rep: dict, path: Path, force: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rep.get("sqnr_db"):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(rep["sqnr_db"], marker="o")
        ax.set_xlabel("block")
        ax.set_ylabel("SQNR (dB)")
        ax.set_title(f"SQNR per block, {rep.get('recipe', {}).get('name')}")
        fig.tight_layout()
        _save_fig(fig, path.with_suffix(".sqnr.png"), force)
        plt.close(fig)
    if rep.get("outlier_rate"):
        # heat map: one row per quantizer kind (e.g. act.in_proj, ssm.B_fwd), one column per hook point
        # (names are <hook key>.<act|weight|ssm>.<site>)
        import re

        cells: dict[str, dict[int, float]] = {}
        columns: dict[str, int] = {}
        for name, rate in rep["outlier_rate"].items():
            m = re.match(r"^(.*?)\.((?:act|weight|ssm)\..+)$", name)
            key, kind = (m.group(1), m.group(2)) if m else ("", name)
            cells.setdefault(kind, {})[columns.setdefault(key, len(columns))] = 100 * rate
        kinds = list(cells)
        depth = len(columns)
        grid = [[cells[k].get(i, float("nan")) for i in range(depth)] for k in kinds]
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * depth + 3), 0.3 * len(kinds) + 1.2))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_xticks(range(depth))
        ax.set_xlabel("block")
        fig.colorbar(im, ax=ax, label="outlier rate (%)")
        fig.tight_layout()
        _save_fig(fig, path.with_suffix(".outliers.png"), force)
        plt.close(fig)
