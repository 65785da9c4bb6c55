"""The accuracy metrics, in one place (the report, `compare`, `--check` and the tools use these).

    logits(model, images)          the model's logits, in batches, no grad (a QuantizedModel works too)
    predict(model, images)         argmax of those
    top1(pred_or_logits, labels)   top-1 accuracy in percent
    agreement(a, b)                percent of images on which two predictions (or logits) agree
    sqnr_db(ref, x)                20 log10(||ref|| / ||ref - x||) in dB over the whole tensor (inf when equal)
    cosine(ref, x)                 mean cosine similarity of the rows
    block_sqnr(model, qmodel, x)   SQNR of the quantized residual stream after each block (calibration unit) vs FP
    logits_vs_fp(out, fp)          {cosine, snr_db, top1_agreement}: a runtime's logits vs FP (--check)

Tensors or numpy arrays are accepted; all sums are in float64. Library decision: Polygraphy (0.53)
has SNR and cosine compare functions, but they score each inference batch separately and
pyproject allows Polygraphy >= 0.49, which lacks them; the whole-set numbers here are used for every
report, and Polygraphy's SimpleCompareFunc stays the runtime-vs-twin pass/fail (ouro.exporter.check).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "EVAL_BATCH",
    "logits",
    "predict",
    "top1",
    "agreement",
    "sqnr_db",
    "cosine",
    "block_sqnr",
    "logits_vs_fp",
]

EVAL_BATCH = 64


def _t(x) -> Tensor:
    return torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x


def _module(model) -> nn.Module:
    from .quant.base import QuantizedModel

    return model.module if isinstance(model, QuantizedModel) else model


def logits(model, images: Tensor, batch: int = EVAL_BATCH, *, progress: bool = False, desc: str = "evaluate") -> Tensor:
    """fp32 logits of `model` (an nn.Module or a QuantizedModel) on `images`, in batches, eval mode, no grad.

    The batches run on the model's device (`--device`); the logits come back on the CPU. On the CPU,
    small models run with one intra-op thread (`small_work_threads`): measured 10x faster on a loaded
    2-core host, and the choice depends only on the model, so results are deterministic."""
    from tqdm.auto import tqdm

    from .device import module_device
    from .quant.calibrate import intra_op_threads, small_work_threads

    module = _module(model)
    module.eval()
    dev = module_device(module)
    outs = []
    with torch.no_grad(), intra_op_threads(small_work_threads(module, batch) if dev.type == "cpu" else None):
        for i in tqdm(range(0, images.shape[0], batch), desc=desc, unit="batch", disable=not progress, leave=False):
            outs.append(module(images[i : i + batch].to(dev)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0, device="cpu")


def predict(model, images: Tensor, batch: int = EVAL_BATCH, **kw) -> Tensor:
    """argmax of `logits` (N,), on the CPU."""
    out = logits(model, images, batch, **kw)
    return out.argmax(-1) if out.numel() else torch.empty(0, dtype=torch.long, device="cpu")


def _pred(x) -> Tensor:
    x = _t(x)
    return x.argmax(-1) if x.dim() > 1 else x


def top1(pred_or_logits, labels) -> float:
    """Top-1 accuracy in percent (predicted classes, or logits whose argmax is taken)."""
    p, y = _pred(pred_or_logits), _t(labels)
    if p.shape != y.shape or p.numel() == 0:
        raise ValueError(f"top-1 needs one prediction per label; got {tuple(p.shape)} predictions and {tuple(y.shape)} labels")
    return 100.0 * float((p == y).double().mean())


def agreement(a, b) -> float:
    """Percent of images on which two predictions (or the argmax of two logit tensors) agree."""
    return top1(a, _pred(b))


def sqnr_db(ref, x) -> float:
    """20 log10(||ref|| / ||ref - x||) in dB over all elements (inf when identical)."""
    r, q = _t(ref).double(), _t(x).double()
    den = (r - q).norm()
    if float(den) == 0.0:
        return math.inf
    return float(20 * torch.log10(r.norm() / den))


def cosine(ref, x) -> float:
    """Mean over rows (first axis) of the cosine similarity of the flattened rows."""
    r, q = _t(ref).double().reshape(len(ref), -1), _t(x).double().reshape(len(x), -1)
    return float(torch.nn.functional.cosine_similarity(r, q, dim=1, eps=1e-30).mean())


def _block_streams(module: nn.Module, images: Tensor, batch: int = EVAL_BATCH) -> list[Tensor]:
    """Residual stream after each calibration unit (the family's `unit_stream`), one tensor per unit
    (on the CPU), computed by running the units as `calibrate` does, from the first unit's captured
    input; the units run on the model's device."""
    from .device import module_device
    from .families.base import family_of
    from .quant.calibrate import capture_unit_inputs, intra_op_threads, run_unit, small_work_threads

    fam = family_of(module)
    module.eval()
    dev = module_device(module)

    def loop(m: nn.Module) -> None:
        for i in range(0, images.shape[0], batch):
            m(images[i : i + batch].to(dev))

    with torch.no_grad(), intra_op_threads(small_work_threads(module, batch) if dev.type == "cpu" else None):
        state = capture_unit_inputs(module, loop)
        outs = []
        for unit in fam.units(module):
            out, _ = run_unit(unit, state)
            outs.append(fam.unit_stream(out).detach().cpu())
            state = unit.next_input(out)
    return outs


def block_sqnr(model: nn.Module, qmodel, images: Tensor) -> list[float]:
    """SQNR (dB) of the quantized model's residual stream after each block vs the FP model's."""
    fp = _block_streams(model, images)
    q = _block_streams(_module(qmodel), images)
    return [round(sqnr_db(a, b), 3) for a, b in zip(fp, q)]


def logits_vs_fp(out, fp) -> dict:
    """Cosine similarity, SNR (dB) and top-1 agreement (fraction) of logits `out` against FP logits."""
    snr = sqnr_db(fp, out)
    return {"cosine": round(cosine(fp, out), 6), "snr_db": round(snr, 3) if math.isfinite(snr) else "inf",
            "top1_agreement": round(agreement(out, fp) / 100.0, 4)}
