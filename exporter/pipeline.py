"""Pipeline stages of the quantized path: FP evaluation, calibration (or QuantState load), report.

    evaluate_fp(ctx)        FP top-1 on the evaluation set (demo test split or --eval-dir)
    quantize(ctx)           calibrate (or --load-calib), --save-calib, quantized metrics, summary table
    write_report(ctx, path) JSON report (+ PNG plots beside it when matplotlib is available)

Report keys: recipe, method, calibration (source, images), fp_top1, quant_top1, top1_delta,
top1_agreement, sqnr_db (per block), outlier_rate (per quantizer), compression (vs FP16), timings.
The metrics themselves are ouro.calib.metrics; the numerics live in ouro.calib. Every PyTorch stage
runs on the model's device (ctx.device); top-1 over the evaluation set is sharded over torchrun
processes (ctx.dist, ouro.calib.evaluation) and identical to one process's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from torch import Tensor, nn

from ouro.calib.files import atomic_write
from ouro.calib.metrics import agreement, block_sqnr, predict, top1

__all__ = [
    "SQNR_MAX_IMAGES",
    "evaluation_set",
    "outlier_rates",
    "memory_compression",
    "evaluate_fp",
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
def _eval_source(ctx):
    from ouro.calib.evaluation import EvalSource

    a = ctx.args
    if getattr(a, "eval_dir", None):
        return EvalSource.folder(a.eval_dir, ctx.model.cfg.img_size)
    if getattr(a, "demo", False):
        return EvalSource("demo", img_size=ctx.model.cfg.img_size)
    return None


def evaluation_data(ctx):
    """This process's share of the evaluation set (ouro.calib.evaluation.EvalData), or None. Cached on ctx."""
    if getattr(ctx, "_eval_data", None) is None:
        from ouro.calib.distributed import SINGLE
        from ouro.calib.evaluation import EvalData

        src = _eval_source(ctx)
        ctx._eval_data = None if src is None else EvalData.load(src, getattr(ctx, "dist", None) or SINGLE)
    return ctx._eval_data


def evaluation_set(ctx, n: int | None = None) -> tuple[Tensor, Tensor] | None:
    """(images, labels) of the first n evaluation images (all when None and not sharded), on the CPU;
    None when there is no evaluation set (demo test split or --eval-dir)."""
    data = evaluation_data(ctx)
    if data is None:
        return None
    if len(data.batches) == data.total_batches:  # one process holds the whole set
        x, y = data.images(), data.labels()
        return (x, y) if n is None else (x[:n], y[:n])
    if n is None:
        raise ValueError("the evaluation set is sharded over processes; ask for its first n images")
    return data.source.load(list(range(min(n, data.source.size()))))


def _predict_all(ctx, model, desc: str) -> tuple[Tensor, Tensor]:
    from ouro.calib.distributed import SINGLE
    from ouro.calib.evaluation import predict_all

    return predict_all(model, evaluation_data(ctx), getattr(ctx, "dist", None) or SINGLE, desc=desc)


# ------------------------------------------------------------------------------------- stages
def evaluate_fp(ctx) -> float | None:
    if evaluation_data(ctx) is None:
        print("ouro-export: no evaluation data (use --demo or --eval-dir); skipping FP top-1")
        return None
    with ctx.stage("eval_fp"):
        ctx._fp_pred, labels = _predict_all(ctx, ctx.model, "evaluate FP")
        acc = top1(ctx._fp_pred, labels)
    ctx.report["fp_top1"] = round(acc, 3)
    ctx.report["eval_images"] = int(labels.shape[0])
    if getattr(ctx, "is_main", True):
        print(f"FP top-1: {acc:.2f} % on {labels.shape[0]} images")
    return acc


def quantize(ctx) -> nn.Module:
    """Calibrate (or load the QuantState), optionally save it, then measure and print the summary."""
    from ouro.calib.imagefolder import calibration_images, make_forward_loop, parse_calib_spec
    from ouro.calib.quant import calibrate, load_quant_state, save_quant_state

    a = ctx.args
    if a.load_calib:
        with ctx.stage("load_calib"):
            ctx.qmodel = load_quant_state(ctx.model, a.load_calib)
            ctx.recipe = ctx.qmodel.recipe
        ctx.report["calibration"] = {"quant_state": str(a.load_calib)}
    else:
        spec = parse_calib_spec(a.calib, a.calib_dir)
        with ctx.stage("calib_data"):
            from ouro.calib.gen.cli import gen_config

            images = calibration_images(ctx.model, spec, calib_dir=a.calib_dir, demo=a.demo, seed=a.seed,
                                        dist=getattr(ctx, "dist", None), gen=gen_config(getattr(a, "gen_config", None)))
        ctx.report["calibration"] = {"source": spec.kind, "images": int(images.shape[0]), "seed": a.seed}
        with ctx.stage("calibrate"):
            ctx.qmodel = calibrate(ctx.model, ctx.recipe, make_forward_loop(images), seed=a.seed, progress=getattr(ctx, "is_main", True))
        ctx.report["calibration"]["block_losses"] = [round(v, 6) for v in ctx.qmodel.calib_losses]
    if a.save_calib:
        with ctx.stage("save_calib"):
            atomic_write(a.save_calib, lambda tmp: save_quant_state(ctx.qmodel, tmp), force=bool(getattr(a, "force", False)))
    ctx.report["recipe"] = ctx.recipe.to_dict()
    ctx.report["method"] = ctx.recipe.method.value
    ctx.report["method_info"] = ctx.qmodel.method_info
    quantized_metrics(ctx)
    if getattr(ctx, "is_main", True):
        print(format_table({**ctx.report, "timings": dict(ctx.timings)}))
    return ctx.qmodel


def quantized_metrics(ctx) -> None:
    """Quantized top-1, agreement with FP, per-block SQNR, outlier rates, compression."""
    ctx.report["compression"] = memory_compression(ctx.model, ctx.qmodel)
    if evaluation_data(ctx) is None:
        return
    with ctx.stage("eval_quant"):
        qpred, y = _predict_all(ctx, ctx.qmodel, "evaluate quantized")
    ctx.report["quant_top1"] = round(top1(qpred, y), 3)
    ctx.report["eval_images"] = int(y.shape[0])
    if getattr(ctx, "_fp_pred", None) is None:
        with ctx.stage("eval_fp"):
            ctx._fp_pred, _ = _predict_all(ctx, ctx.model, "evaluate FP")
        ctx.report["fp_top1"] = round(top1(ctx._fp_pred, y), 3)
    ctx.report["top1_delta"] = round(ctx.report["quant_top1"] - ctx.report["fp_top1"], 3)
    ctx.report["top1_agreement"] = round(agreement(qpred, ctx._fp_pred), 3)
    if not getattr(ctx, "is_main", True):  # the per-block metrics are rank 0's (it writes the report)
        return
    sub = evaluation_set(ctx, SQNR_MAX_IMAGES)[0]
    with ctx.stage("sqnr"):
        ctx.report["sqnr_db"] = block_sqnr(ctx.model, ctx.qmodel, sub)
        ctx.report["outlier_rate"] = outlier_rates(ctx.qmodel, sub)


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


def write_report(ctx, path: str | Path) -> Path:
    """Write ctx.report (+ timings) as strict JSON; plots (SQNR per block, outlier rates) beside it.
    Each file is written atomically; an existing one is replaced only with --force (or when this run
    already wrote it, e.g. a report written before a failed --check and again at the end)."""
    path = Path(path)
    rep = dict(ctx.report)
    rep["timings"] = dict(ctx.timings)
    written = getattr(ctx, "_report_written", None)
    if written is None:
        written = set()
        ctx._report_written = written
    force = bool(getattr(ctx.args, "force", False)) or str(path) in written
    atomic_write(path, strict_json(rep).encode(), force=force)
    written.add(str(path))
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
