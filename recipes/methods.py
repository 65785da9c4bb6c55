"""Per-method recipe data: each method's own parameters, and the formats its quantizers compute.

`register_method(method, params=..., formats=...)` records, for one `Method`:
    params   the frozen dataclass of its `Recipe.method_params` (defaults for every field)
    formats  recipe -> QuantFormats: the format of every site (linear input, linear weight, each
             scan operand). The quantizers of `ouro.calib` are built from these formats, and the
             exporter checks them against the export target before any work.
Everything here is data about recipes: no module of `ouro.calib` is imported.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from .formats import (
    FP16,
    ActFormat,
    FloatFormat,
    Granularity,
    OutlierDetection,
    OutlierFormat,
    QuantFormats,
    RecipeError,
    WeightFormat,
)
from .typecheck import check_field_types

if TYPE_CHECKING:
    from .config import Recipe

__all__ = [
    "Method",
    "RecipeError",
    "NoParams",
    "OuroMambaParams",
    "PTQ4VMParams",
    "QMambaParams",
    "MethodData",
    "register_method_params",
    "method_params_type",
    "formats_for",
]


class Method(str, Enum):
    OUROMAMBA = "ouromamba"
    PTQ4VM = "ptq4vm"
    QMAMBA = "qmamba"
    MINMAX = "minmax"
    PERCENTILE = "percentile"


@dataclass(frozen=True)
class NoParams:
    """Methods without parameters of their own."""


@dataclass(frozen=True)
class OuroMambaParams:
    """OuroMamba-specific knobs (seed Algorithm 2; ALGORITHMS.md §1.2)."""

    inlier_granularity: str = "token"  # "token": S_I(t) of shape (1, L, 1); "tensor": one scalar (what a per-tensor kernel needs)
    outlier_detection: str = "dynamic"  # "dynamic" (Alg. 2, the product); "static"/"none": ablation only (seed Table 5)
    static_outlier_fraction: float = 0.08  # "static": fraction of channels in the fixed offline list (64 of 768 in the seed)
    delta_before_bias: bool = False  # quantize Delta = dt_proj(x) before its bias is added (bias added in FP after)

    def __post_init__(self) -> None:
        check_field_types(self, "method_params", RecipeError)
        if self.inlier_granularity not in ("token", "tensor"):
            raise RecipeError(f"ouromamba.inlier_granularity must be 'token' or 'tensor', got {self.inlier_granularity!r}")
        if self.outlier_detection not in ("dynamic", "static", "none"):
            raise RecipeError(f"ouromamba.outlier_detection must be 'dynamic', 'static' or 'none', got {self.outlier_detection!r}")
        if not 0.0 < self.static_outlier_fraction < 1.0:
            raise RecipeError(f"ouromamba.static_outlier_fraction must be in (0, 1), got {self.static_outlier_fraction}")


@dataclass(frozen=True)
class PTQ4VMParams:
    """PTQ4VM's own knobs (defaults: the official Vim settings)."""

    alpha: float = 0.5  # SmoothQuant migration strength (0.65 for VMamba)

    def __post_init__(self) -> None:
        check_field_types(self, "method_params", RecipeError)
        if not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"ptq4vm.alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class QMambaParams:
    """QMamba's own knobs (paper defaults)."""

    tau: float = 0.9  # skewness boundary of Eq. 5 (1.0: never LtSQ; 0.0: always)
    group: int = 10  # TGQ group length g
    percentile: float = 0.01  # activation init range [p, 1 - p] (1st / 99th percentile)

    def __post_init__(self) -> None:
        check_field_types(self, "method_params", RecipeError)
        if not 0.0 <= self.tau <= 1.0:
            raise RecipeError(f"qmamba.tau must be in [0, 1], got {self.tau}")
        if self.group < 1:
            raise RecipeError(f"qmamba.group must be >= 1, got {self.group}")
        if not 0.0 <= self.percentile < 0.5:
            raise RecipeError(f"qmamba.percentile must be in [0, 0.5), got {self.percentile}")


FormatsFn = Callable[["Recipe"], QuantFormats]


@dataclass(frozen=True)
class MethodData:
    params: type
    formats: FormatsFn


_METHODS: dict[Method, MethodData] = {}


def _method(v) -> Method:
    try:
        return Method(v)
    except ValueError:
        raise RecipeError(f"method={v!r} is not one of {', '.join(m.value for m in Method)}") from None


def register_method_params(method: Method | str, cls: type, formats: FormatsFn | None = None) -> type:
    """Register `method`'s parameter dataclass (defaults for every field, validated in __post_init__)
    and the function giving the formats of its sites (default: the method's current one)."""
    m = _method(method)
    old = _METHODS.get(m)
    if formats is None and old is None:
        raise RecipeError(f"method {m.value}: give the formats function of its sites")
    _METHODS[m] = MethodData(cls, formats or old.formats)
    return cls


def method_params_type(method: Method | str) -> type:
    return _METHODS[_method(method)].params


def formats_for(recipe: "Recipe") -> QuantFormats:
    """The format of every site under `recipe` (what its method's quantizers compute)."""
    return _METHODS[recipe.method].formats(recipe)


# --------------------------------------------------------------------------- the methods' formats
def _is_fp(b) -> bool:
    return isinstance(b, FloatFormat)


def _ouromamba(r: "Recipe") -> QuantFormats:
    """Linear inputs, Delta, B, C: symmetric S_I(t) inliers + dynamic outliers (Delta with
    k_sigma_delta); weights symmetric per output channel; A per row and D per tensor at a_bits."""
    p: OuroMambaParams = r.method_params
    gran = Granularity.TOKEN if p.inlier_granularity == "token" else Granularity.TENSOR

    def act(k: float):
        if _is_fp(r.a_bits):
            return FP16
        if p.outlier_detection == "none":
            return ActFormat(r.a_bits, granularity=gran)
        det = OutlierDetection.STATIC_LIST if p.outlier_detection == "static" else OutlierDetection.DYNAMIC
        return ActFormat(r.a_bits, granularity=gran, outliers=OutlierFormat(
            r.a_bits_outlier, r.n_refresh, r.threshold_policy, k, std_correction=r.std_correction, detection=det))

    ssm: dict = {}
    for op in r.ssm_operands:
        if op == "delta":
            ssm[op] = act(r.k_sigma_delta)
        elif op in ("B", "C"):
            ssm[op] = act(r.k_sigma)
        elif op in ("A", "D"):
            ssm[op] = FP16 if _is_fp(r.a_bits) else WeightFormat(
                r.a_bits, granularity=Granularity.CHANNEL if op == "A" else Granularity.TENSOR)
        else:  # h, u, abar: the quantizer builder refuses them with the reason
            ssm[op] = None
    return QuantFormats(
        Method.OUROMAMBA.value, act(r.k_sigma), FP16 if _is_fp(r.w_bits) else WeightFormat(r.w_bits),
        tuple(ssm.items()), delta_before_bias=bool(p.delta_before_bias) and "delta" in r.ssm_operands,
    )


def _ptq4vm(r: "Recipe") -> QuantFormats:
    """Linear layers only: per-token static asymmetric activations after smoothing, weights (W*sigma)
    symmetric per output channel; the scan stays FP."""
    act = FP16 if _is_fp(r.a_bits) else ActFormat(r.a_bits, symmetric=False, granularity=Granularity.TOKEN, smoothing=True)
    w = FP16 if _is_fp(r.w_bits) else WeightFormat(r.w_bits)
    return QuantFormats(Method.PTQ4VM.value, act, w, tuple((op, None) for op in r.ssm_operands))


def _qmamba(r: "Recipe") -> QuantFormats:
    """Tensor-wise asymmetric everywhere (weights, A and D at w_bits); Abar: LtSQ or uniform
    (skewness condition); h: TGQ, one asymmetric scale per group of `group` scan steps."""
    p: QMambaParams = r.method_params
    a = FP16 if _is_fp(r.a_bits) else ActFormat(r.a_bits, symmetric=False, granularity=Granularity.TENSOR)
    w = FP16 if _is_fp(r.w_bits) else WeightFormat(r.w_bits, symmetric=False, granularity=Granularity.TENSOR)
    ssm: dict = {}
    for op in r.ssm_operands:
        if op in ("A", "D"):
            ssm[op] = w
        elif op == "abar":
            ssm[op] = FP16 if _is_fp(r.a_bits) else ActFormat(r.a_bits, symmetric=False, granularity=Granularity.TENSOR, log2=True)
        elif op == "h":
            ssm[op] = FP16 if _is_fp(r.a_bits) else ActFormat(r.a_bits, symmetric=False, granularity=Granularity.STEP_GROUP, group=p.group)
        else:
            ssm[op] = a
    return QuantFormats(Method.QMAMBA.value, a, w, tuple(ssm.items()))


def _simple(method: Method) -> FormatsFn:
    def formats(r: "Recipe") -> QuantFormats:
        """Static per-tensor asymmetric activations (A and D too, at a_bits); weights symmetric per channel."""
        a = FP16 if _is_fp(r.a_bits) else ActFormat(r.a_bits, symmetric=False, granularity=Granularity.TENSOR)
        const = FP16 if _is_fp(r.a_bits) else WeightFormat(r.a_bits, symmetric=False, granularity=Granularity.TENSOR)
        ssm = {op: (const if op in ("A", "D") else None if op == "h" else a) for op in r.ssm_operands}
        return QuantFormats(method.value, a, FP16 if _is_fp(r.w_bits) else WeightFormat(r.w_bits), tuple(ssm.items()))

    return formats


register_method_params(Method.OUROMAMBA, OuroMambaParams, _ouromamba)
register_method_params(Method.PTQ4VM, PTQ4VMParams, _ptq4vm)
register_method_params(Method.QMAMBA, QMambaParams, _qmamba)
register_method_params(Method.MINMAX, NoParams, _simple(Method.MINMAX))
register_method_params(Method.PERCENTILE, NoParams, _simple(Method.PERCENTILE))
