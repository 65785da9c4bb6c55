"""Simple baselines: `minmax` and `percentile`. Static, per tensor, no tuning.

    activations (linear inputs, the recipe's SSM operands): one asymmetric (s, z) per tensor,
        s = (u - l) / (2**b - 1), z = -round(l / s);
        minmax: [l, u] = [min, max] of the calibration activations;
        percentile: [l, u] = [1st, 99th] percentile (PERCENTILE_P);
    weights: symmetric per output channel, s_n = max|W_n| / qmax (min-max for both methods; the
        weight granularity is the recipe's, per output channel, as for every other method);
    SSM parameters A and D: per-tensor asymmetric min-max at the activation bits (the recipe treats
        them like activations, as OuroMamba does).
Nothing is learnable, so the core's tuning loop has nothing to optimise whatever `calib.steps` says.
`h` in the recipe's SSM operands is not supported (quantizing h needs a method-specific scan: QMamba).
"""
from __future__ import annotations

from ouro.recipes import FloatFormat, Method, Recipe

from ..quant.base import MethodSpec, Quantizer, Site, register_method
from .common import ChannelSymWeightQuant, TensorAsymQuant

__all__ = ["PERCENTILE_P", "MINMAX_SPEC", "PERCENTILE_SPEC", "simple_spec"]

PERCENTILE_P = 0.01
"""The percentile baseline clips activations to their [1st, 99th] percentile range."""


def simple_spec(init: str) -> MethodSpec:
    """The MethodSpec of a static per-tensor baseline with activation range init `init`."""

    def make_act(site: Site, recipe: Recipe) -> Quantizer | None:
        fmt = recipe.formats.linear_act
        return None if isinstance(fmt, FloatFormat) else TensorAsymQuant(fmt, init, PERCENTILE_P, learnable=False)

    def make_weight(site: Site, recipe: Recipe) -> Quantizer | None:
        fmt = recipe.formats.linear_weight
        return None if isinstance(fmt, FloatFormat) else ChannelSymWeightQuant(fmt, site.shape[0], learnable=False)

    def make_ssm(site: Site, recipe: Recipe) -> Quantizer | None:
        if site.name in ("h", "abar"):
            raise NotImplementedError(f"method {init!r} cannot quantize {site.name} inside the recurrence; drop it from ssm_operands")
        fmt = recipe.formats.ssm_format(site.name)
        if isinstance(fmt, FloatFormat):
            return None
        if site.name in ("A", "D"):
            return TensorAsymQuant(fmt, "minmax", learnable=False)
        return TensorAsymQuant(fmt, init, PERCENTILE_P, learnable=False)

    return MethodSpec(
        make_act=make_act,
        make_weight=make_weight,
        make_ssm=make_ssm,
        description=f"{init}: static per-tensor asymmetric activations, per-channel min-max weights, no tuning",
        info=lambda module, recipe: {"method": init, "activation_range": "[1st, 99th] percentile" if init == "percentile" else "[min, max]"},
    )


MINMAX_SPEC = register_method(Method.MINMAX, simple_spec("minmax"))
PERCENTILE_SPEC = register_method(Method.PERCENTILE, simple_spec("percentile"))
