"""Quantization formats as data, and what each export target can take.

A *format* says what one quantizer computes: bit width, symmetric or asymmetric grid, scale
granularity, and for OuroMamba activations the outlier split (outlier bits, refresh window,
threshold policy, k, std correction). Formats are frozen and validated on construction; the
recipe says which format each site gets (`ouro.recipes.formats_for(recipe)`), the quantizers of
`ouro.calib` are built from and hold their formats, and the exporter writes them as ONNX
attributes (`to_onnx_attrs` / `from_onnx_attrs` below: one place for the attribute names).

Floating point is an explicit format, `FP16` ("not quantized, rounded to fp16"): there is no
">= 16 bits" sentinel above this module. The kernels' C ABI and the plugin attribute `o_bits`
still encode fp16 outliers as 16 (`abi_bits`); that encoding lives only in `abi_bits` and in
`from_onnx_attrs`.

Export targets (`Target`) take a subset of the formats. `TARGET_CAPS[target]` is the one table
per target; `check_target(formats, target)` refuses an unsupported combination before any work,
naming the target, what it supports and which target would take the recipe instead. The plugin
table is checked against the TensorRT plugins' attribute tables and the kernel binding's validation
by tests/unit/test_formats.py (the test fails when they drift apart).

Shape legend as in ouro.calib.quantizers: L tokens, C channels, N output channels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Union

__all__ = [
    "DEFAULT_K_SIGMA",
    "DELTA_K_SIGMA",
    "DEFAULT_STD_CORRECTION",
    "MIN_BITS",
    "MAX_INT_BITS",
    "FP16_ABI_BITS",
    "RecipeError",
    "FormatError",
    "ThresholdPolicy",
    "FloatFormat",
    "FP16",
    "Bits",
    "parse_bits",
    "bits_label",
    "abi_bits",
    "Granularity",
    "OutlierDetection",
    "OutlierFormat",
    "ActFormat",
    "WeightFormat",
    "QuantFormats",
    "Target",
    "OperandCaps",
    "TargetCaps",
    "TARGET_CAPS",
    "TargetError",
    "target_problems",
    "check_target",
    "linear_onnx_attrs",
    "linear_formats_from_onnx_attrs",
    "scan_onnx_attrs",
    "scan_formats_from_onnx_attrs",
    "SCAN_QUANT_OPERANDS",
]

DEFAULT_K_SIGMA = 3.0
"""k of the dynamic threshold mu + k*sigma for linear-layer inputs, B and C (official code)."""
DELTA_K_SIGMA = 4.0
"""k of the dynamic threshold for the SSM step size Delta (official code's Q_Act_d)."""
DEFAULT_STD_CORRECTION = 1
"""Correction c of the outlier threshold's std over the channels, sqrt(sum (a - mean)^2 / max(C - c, 1)):
Bessel's (1), as torch.std in the official OuroMamba quantizer; 0 (the population std) stays available
(recipe field `std_correction`). An ONNX node without the attribute means 0, as before it existed."""
MIN_BITS = 2
MAX_INT_BITS = 15
"""Integer grids the PyTorch fake quantization simulates (export targets take at most 8 bits)."""
FP16_ABI_BITS = 16
"""How the kernels' C ABI and the plugin attribute `o_bits` spell fp16 outliers."""


class RecipeError(ValueError):
    """A recipe, preset or format is invalid; the message names the key and the allowed values."""

    user_facing = True


class FormatError(RecipeError):
    """An invalid format; the message names the field and the allowed values."""


class ThresholdPolicy(str, Enum):
    """How the outlier threshold theta is obtained."""

    DYNAMIC = "dynamic"  # mu + k*sigma of |inliers| per token (official code)
    CALIBRATED = "calibrated"  # static per-token theta(t) calibrated offline (seed Algorithm 2)

    @property
    def code(self) -> int:
        """The ONNX attribute / C ABI value (`threshold_policy`): 0 dynamic, 1 calibrated."""
        return _POLICY_CODES[self]

    @classmethod
    def from_code(cls, code: int) -> "ThresholdPolicy":
        for p, c in _POLICY_CODES.items():
            if c == int(code):
                return p
        raise FormatError(f"threshold_policy {code!r} is not one of {sorted(_POLICY_CODES.values())}")


_POLICY_CODES = {ThresholdPolicy.DYNAMIC: 0, ThresholdPolicy.CALIBRATED: 1}


class FloatFormat(str, Enum):
    """Not quantized: kept in floating point."""

    FP16 = "fp16"  # rounded to fp16 and back (the value an fp16 kernel would see)


FP16 = FloatFormat.FP16
Bits = Union[int, FloatFormat]
"""A number format where either an integer grid or floating point is allowed: 2..15 or FP16."""


def parse_bits(v, name: str, *, allow_float: bool = True) -> Bits:
    """`v` as a `Bits` value: an integer in [MIN_BITS, MAX_INT_BITS], or "fp16" (FP16)."""
    if isinstance(v, FloatFormat) or (isinstance(v, str) and v.lower() in {f.value for f in FloatFormat}):
        if allow_float:
            return FloatFormat(v.lower() if isinstance(v, str) else v)
        raise FormatError(f"{name} must be an integer bit width, got {v!r}")
    if isinstance(v, bool) or not isinstance(v, int):
        raise FormatError(f"{name} must be an integer in [{MIN_BITS}, {MAX_INT_BITS}]"
                          + (' or "fp16"' if allow_float else "") + f", got {v!r}")
    if v == FP16_ABI_BITS and allow_float:
        raise FormatError(f'{name} = 16 is not a bit width here: write "fp16" for values kept in floating point')
    if not MIN_BITS <= v <= MAX_INT_BITS:
        raise FormatError(f"{name} must be an integer in [{MIN_BITS}, {MAX_INT_BITS}]"
                          + (' or "fp16"' if allow_float else "") + f", got {v!r}")
    return v


def bits_label(b: Bits) -> str:
    return b.value if isinstance(b, FloatFormat) else str(b)


def abi_bits(b: Bits) -> int:
    """The integer the kernels' C ABI / the `o_bits` attribute use: the bit width, 16 for FP16."""
    return FP16_ABI_BITS if b is FP16 else int(b)


def _bits_from_abi(v: int) -> Bits:
    return FP16 if int(v) == FP16_ABI_BITS else int(v)


def _wider(b: Bits) -> float:
    return float("inf") if isinstance(b, FloatFormat) else float(b)


class Granularity(str, Enum):
    """Which elements share one scale (and zero point)."""

    TENSOR = "tensor"  # one scale
    TOKEN = "token"  # one per time step: (1, L, 1) (OuroMamba S_I(t), PTQ4VM PTS)
    CHANNEL = "channel"  # one per output channel / row: (N, 1, ...)
    STEP_GROUP = "step_group"  # one per group of consecutive scan steps (QMamba TGQ on h)


class OutlierDetection(str, Enum):
    """How the outlier channels are found (OuroMamba; static is the seed Table 5 ablation)."""

    DYNAMIC = "dynamic"  # per token, refreshed every n_refresh tokens (seed Algorithm 2)
    STATIC_LIST = "static"  # a fixed offline channel list


@dataclass(frozen=True)
class OutlierFormat:
    """The outlier split of an OuroMamba activation (ouro.calib.quantizers module docstring)."""

    bits: Bits = 8
    n_refresh: int = 10
    threshold: ThresholdPolicy = ThresholdPolicy.DYNAMIC
    k_sigma: float = DEFAULT_K_SIGMA
    std_correction: int = DEFAULT_STD_CORRECTION
    detection: OutlierDetection = OutlierDetection.DYNAMIC

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "bits", parse_bits(self.bits, "outlier bits"))
        s(self, "threshold", _enum(ThresholdPolicy, self.threshold, "threshold policy"))
        s(self, "detection", _enum(OutlierDetection, self.detection, "outlier detection"))
        if isinstance(self.n_refresh, bool) or not isinstance(self.n_refresh, int) or self.n_refresh < 1:
            raise FormatError(f"n_refresh must be an integer >= 1, got {self.n_refresh!r}")
        if not float(self.k_sigma) > 0:
            raise FormatError(f"k_sigma must be > 0, got {self.k_sigma}")
        if self.std_correction not in (0, 1):
            raise FormatError(f"std_correction must be 0 or 1 (1: Bessel's correction, as torch.std), got {self.std_correction!r}")


@dataclass(frozen=True)
class ActFormat:
    """An activation quantizer: static grid (+ OuroMamba's dynamic outliers when `outliers` is set).

    bits: inlier grid; symmetric: restricted [-qmax, qmax] (else unsigned [0, 2**bits - 1] with a
    zero point); granularity: TENSOR, TOKEN or STEP_GROUP (`group` steps per scale);
    smoothing: divided by a per-input-channel sigma first (PTQ4VM); log2: QMamba's LtSQ grid on
    exp(dt*A), or the uniform grid, whichever the skewness condition picks at calibration."""

    bits: int
    symmetric: bool = True
    granularity: Granularity = Granularity.TOKEN
    outliers: OutlierFormat | None = None
    smoothing: bool = False
    log2: bool = False
    group: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", parse_bits(self.bits, "activation bits", allow_float=False))
        object.__setattr__(self, "granularity", _enum(Granularity, self.granularity, "activation granularity"))
        if self.granularity is Granularity.CHANNEL:
            raise FormatError("activation granularity must be tensor, token or step_group (channel is a weight granularity)")
        if self.outliers is not None:
            if not self.symmetric:
                raise FormatError("an outlier split needs the symmetric inlier grid (one quantizer contract with the kernels)")
            if _wider(self.outliers.bits) < self.bits:
                raise FormatError(f"outlier bits ({bits_label(self.outliers.bits)}) must be >= inlier bits ({self.bits})")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise FormatError(f"group must be an integer >= 1, got {self.group!r}")

    def describe(self) -> str:
        parts = [f"{self.bits}-bit", "symmetric" if self.symmetric else "asymmetric", f"per {self.granularity.value}"]
        if self.smoothing:
            parts.append("smoothed")
        if self.log2:
            parts.append("LtSQ/uniform")
        if self.outliers is not None:
            parts.append(f"{bits_label(self.outliers.bits)} outliers ({self.outliers.detection.value})")
        return " ".join(parts)


@dataclass(frozen=True)
class WeightFormat:
    """A constant's quantizer (a linear weight, SSM A or D): integer codes and scales stored offline."""

    bits: int
    symmetric: bool = True
    granularity: Granularity = Granularity.CHANNEL

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", parse_bits(self.bits, "weight bits", allow_float=False))
        object.__setattr__(self, "granularity", _enum(Granularity, self.granularity, "weight granularity"))
        if self.granularity not in (Granularity.TENSOR, Granularity.CHANNEL):
            raise FormatError(f"weight granularity must be tensor or channel, got {self.granularity.value}")

    def describe(self) -> str:
        return f"{self.bits}-bit {'symmetric' if self.symmetric else 'asymmetric'} per {self.granularity.value}"


SiteFormat = Union[ActFormat, WeightFormat, FloatFormat, None]


@dataclass(frozen=True)
class QuantFormats:
    """The formats one recipe gives each site (`ouro.recipes.formats_for`).

    linear_act / linear_weight: input and weight of every quantized linear layer (FP16 or None:
    kept in floating point); ssm: scan operand -> format, for the recipe's SSM operands;
    delta_before_bias: Delta is quantized on dt_proj's output before its bias (OuroMamba option)."""

    method: str
    linear_act: SiteFormat
    linear_weight: SiteFormat
    ssm: tuple[tuple[str, SiteFormat], ...] = ()
    delta_before_bias: bool = False

    def ssm_format(self, operand: str) -> SiteFormat:
        return dict(self.ssm).get(operand)


# ------------------------------------------------------------------------------------------ targets
class Target(str, Enum):
    """Where a quantized model is exported to."""

    PLUGIN = "plugin"  # plugin ONNX (ouro::OutlierLinear / ouro::SelectiveScan): onnxruntime + ouro ops, TensorRT (.plan)
    QDQ_ONNXRUNTIME = "qdq-onnxruntime"  # .qdq.onnx: standard Q/DQ (zero points allowed), scans as ONNX Scan loops
    QDQ_TENSORRT = "qdq-tensorrt"  # symmetric Q/DQ TensorRT can fuse, scans as SelectiveScan plugin nodes (FP)

    @property
    def label(self) -> str:
        return _TARGET_LABELS[self]


_TARGET_LABELS = {
    Target.PLUGIN: "the plugin ONNX / TensorRT engine (.onnx, .plan)",
    Target.QDQ_ONNXRUNTIME: "the QDQ ONNX for onnxruntime (.qdq.onnx)",
    Target.QDQ_TENSORRT: "the QDQ ONNX for TensorRT",
}


@dataclass(frozen=True)
class OperandCaps:
    """What a target can take for one kind of site. Empty `bits`: the site cannot be quantized there.

    outlier_bits: outlier formats it computes; drops_outliers: it takes an outlier format but
    keeps only the static inlier grid (the QDQ graphs: dynamic outliers are not Q/DQ)."""

    bits: frozenset[int] = frozenset()
    outlier_bits: frozenset = frozenset()
    drops_outliers: bool = False
    asymmetric: bool = False
    granularities: frozenset = frozenset()
    smoothing: bool = False
    log2: bool = False
    float_ok: bool = True  # FP16 / not quantized is fine
    needs_outliers: bool = False  # the node always splits outliers off (OutlierLinear, SelectiveScan's delta/B/C)

    def problems(self, what: str, fmt: SiteFormat) -> list[tuple[str, str]]:
        """(what, issue) for each way `fmt` is outside these capabilities."""
        if fmt is None or isinstance(fmt, FloatFormat):
            return [] if self.float_ok else [(what, "not quantized (this target needs them quantized)")]
        if not self.bits:
            return [(what, "quantized, which this target does not support")]
        out = []
        if fmt.bits not in self.bits:
            out.append((what, f"{fmt.bits}-bit (supported: {_set(self.bits)})"))
        if not fmt.symmetric and not self.asymmetric:
            out.append((what, "asymmetric (supported: symmetric only, no zero points)"))
        if fmt.granularity not in self.granularities:
            out.append((what, f"scaled per {fmt.granularity.value} (supported: per {_set(g.value for g in self.granularities)})"))
        if isinstance(fmt, ActFormat):
            if fmt.smoothing and not self.smoothing:
                out.append((what, "smoothed by a per-channel sigma (not supported)"))
            if fmt.log2 and not self.log2:
                out.append((what, "on the LtSQ log grid (not supported)"))
            o = fmt.outliers
            if o is None and self.needs_outliers:
                out.append((what, "without an outlier split (the node always splits outliers off)"))
            if o is not None and not self.drops_outliers:
                if not self.outlier_bits:
                    out.append((what, "split into inliers and outliers (not supported)"))
                elif o.bits not in self.outlier_bits:
                    out.append((what, f"with {bits_label(o.bits)} outliers (supported: {_set(bits_label(b) for b in self.outlier_bits)})"))
            if o is not None and o.detection is not OutlierDetection.DYNAMIC:
                out.append((what, f"with a {o.detection.value} outlier list (an ablation; supported: dynamic detection)"))
        return out


def _join_sites(whats: list[str]) -> list[str]:
    """["scan operand u", "scan operand B"] -> ["scan operands u, B"]; other sites unchanged."""
    ops = [w.removeprefix("scan operand ") for w in whats if w.startswith("scan operand ")]
    rest = [w for w in whats if not w.startswith("scan operand ")]
    if len(ops) > 1:
        rest.append("scan operands " + ", ".join(ops))
    elif ops:
        rest.append(f"scan operand {ops[0]}")
    return rest


def _set(items) -> str:
    """Sorted values, runs of consecutive integers as lo..hi: {2, 3, 4, 8} -> "2..4, 8"."""
    vals = sorted(set(items), key=lambda v: (isinstance(v, str), v))
    parts: list[str] = []
    i = 0
    while i < len(vals):
        j = i
        while isinstance(vals[i], int) and j + 1 < len(vals) and isinstance(vals[j + 1], int) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(f"{vals[i]}..{vals[j]}" if j - i >= 2 else ", ".join(str(v) for v in vals[i : j + 1]))
        i = j + 1
    return ", ".join(parts)


@dataclass(frozen=True)
class TargetCaps:
    """One table per target: what it takes for linear inputs, linear weights and each scan operand.

    shared_scan_params: delta/B/C of one scan must agree on n_refresh, threshold policy and std
    correction (the SelectiveScan node has one attribute each). fallback: the target suggested when
    a recipe is refused."""

    target: Target
    linear_act: OperandCaps
    linear_weight: OperandCaps
    ssm: dict[str, OperandCaps] = field(default_factory=dict)
    linear_needs_act: bool = False
    shared_scan_params: bool = False
    delta_before_bias: bool = False
    fallback: Target | None = None

    def problems(self, formats: QuantFormats) -> list[str]:
        """What the target cannot express in `formats`, one sentence per issue (sites sharing it merged)."""
        found: list[tuple[str, str]] = []
        found += self.linear_act.problems("linear-layer activations", formats.linear_act)
        found += self.linear_weight.problems("linear-layer weights", formats.linear_weight)
        if self.linear_needs_act and isinstance(formats.linear_weight, WeightFormat) and not isinstance(formats.linear_act, ActFormat):
            found.append(("linear layers", "weight-only (an unquantized activation is not supported)"))
        for op, fmt in formats.ssm:
            if fmt is None or isinstance(fmt, FloatFormat):
                continue
            found += self.ssm.get(op, OperandCaps()).problems(f"scan operand {op}", fmt)
        merged: dict[str, list[str]] = {}
        for what, issue in found:
            merged.setdefault(issue, []).append(what)
        out = []
        for issue, whats in merged.items():
            sites = _join_sites(whats)
            subject = sites[0] if len(sites) == 1 else ", ".join(sites[:-1]) + " and " + sites[-1]
            out.append(f"{subject} {'is' if subject.startswith('scan operand ') else 'are'} {issue}")
        if self.shared_scan_params:
            outl = {op: f.outliers for op, f in formats.ssm if isinstance(f, ActFormat) and f.outliers is not None}
            for attr in ("n_refresh", "threshold", "std_correction"):
                if len({getattr(o, attr) for o in outl.values()}) > 1:
                    out.append(f"scan operands {', '.join(outl)} differ in {attr} (the scan node takes one value)")
        if formats.delta_before_bias and not self.delta_before_bias:
            out.append("Delta is quantized before dt_proj's bias (delta_before_bias; the scan node takes Delta with the bias added)")
        return out


_INT8_GRIDS = frozenset(range(MIN_BITS, 9))
_ACT_GRAN = frozenset({Granularity.TENSOR, Granularity.TOKEN})
_ANY_ACT_GRAN = frozenset({Granularity.TENSOR, Granularity.TOKEN, Granularity.STEP_GROUP})
_W_GRAN = frozenset({Granularity.TENSOR, Granularity.CHANNEL})
_CONSTANT = OperandCaps(bits=frozenset(range(MIN_BITS, MAX_INT_BITS + 1)), asymmetric=True, granularities=_W_GRAN)
"""A and D are constants: every target takes their dequantized values as FP tensors."""

PLUGIN_LINEAR_W_BITS = frozenset({4, 8})
PLUGIN_LINEAR_A_BITS = frozenset({4, 8})
PLUGIN_LINEAR_O_BITS = frozenset({4, 8, FP16})
PLUGIN_SCAN_BITS = _INT8_GRIDS
PLUGIN_SCAN_O_BITS = _INT8_GRIDS | {FP16}

_PLUGIN_SCAN_OPERAND = OperandCaps(bits=PLUGIN_SCAN_BITS, outlier_bits=PLUGIN_SCAN_O_BITS, granularities=_ACT_GRAN,
                                   needs_outliers=True)

TARGET_CAPS: dict[Target, TargetCaps] = {
    Target.PLUGIN: TargetCaps(
        Target.PLUGIN,
        linear_act=OperandCaps(bits=PLUGIN_LINEAR_A_BITS, outlier_bits=PLUGIN_LINEAR_O_BITS, granularities=_ACT_GRAN,
                               float_ok=False, needs_outliers=True),
        linear_weight=OperandCaps(bits=PLUGIN_LINEAR_W_BITS, granularities=frozenset({Granularity.CHANNEL}), float_ok=False),
        ssm={
            "delta": _PLUGIN_SCAN_OPERAND, "B": _PLUGIN_SCAN_OPERAND, "C": _PLUGIN_SCAN_OPERAND,
            "A": _CONSTANT, "D": _CONSTANT,
            "h": OperandCaps(bits=PLUGIN_SCAN_BITS, asymmetric=True, granularities=frozenset({Granularity.STEP_GROUP})),
        },
        linear_needs_act=True,
        shared_scan_params=True,
        fallback=Target.QDQ_ONNXRUNTIME,
    ),
    Target.QDQ_ONNXRUNTIME: TargetCaps(
        Target.QDQ_ONNXRUNTIME,
        linear_act=OperandCaps(bits=_INT8_GRIDS, drops_outliers=True, asymmetric=True, granularities=_ACT_GRAN, smoothing=True),
        linear_weight=OperandCaps(bits=_INT8_GRIDS, asymmetric=True, granularities=_W_GRAN),
        ssm={
            op: OperandCaps(bits=_INT8_GRIDS, drops_outliers=True, asymmetric=True, granularities=_ACT_GRAN)
            for op in ("u", "delta", "B", "C")
        } | {
            "A": _CONSTANT, "D": _CONSTANT,
            # inside the recurrence, lowered with the ONNX Scan loop (float ops, not Q/DQ)
            "abar": OperandCaps(bits=_INT8_GRIDS, asymmetric=True, granularities=frozenset({Granularity.TENSOR}), log2=True),
            "h": OperandCaps(bits=_INT8_GRIDS, asymmetric=True, granularities=frozenset({Granularity.STEP_GROUP})),
        },
    ),
    Target.QDQ_TENSORRT: TargetCaps(
        Target.QDQ_TENSORRT,
        linear_act=OperandCaps(bits=_INT8_GRIDS, drops_outliers=True, granularities=_ACT_GRAN),
        linear_weight=OperandCaps(bits=frozenset({4, 8}), granularities=_W_GRAN),
        ssm={op: OperandCaps(bits=_INT8_GRIDS, drops_outliers=True, granularities=_ACT_GRAN) for op in ("u", "delta", "B", "C")}
        | {"A": _CONSTANT, "D": _CONSTANT},
        linear_needs_act=True,
        fallback=Target.QDQ_ONNXRUNTIME,
    ),
}
"""What each target takes. PLUGIN: the OutlierLinear / SelectiveScan attribute tables
(trt_plugins/*/ *Plugin.cpp) and the kernel binding's validation (exporter/cuda_kernels.py).
QDQ_ONNXRUNTIME: standard QuantizeLinear/DequantizeLinear on INT8/UINT8 grids (INT4/UINT4 weights),
zero points and per-token (axis 1) scales allowed; dynamic outliers are dropped (the QDQ graph is the
static inlier grid). QDQ_TENSORRT: TensorRT's Q/DQ rules (symmetric only, no zero points, INT8
activations, INT8/INT4 weights; ALGORITHMS.md §6.4)."""


class TargetError(FormatError):
    """A recipe that the requested export target cannot express (refused before any work)."""


def target_problems(formats: QuantFormats, target: Target | str) -> list[str]:
    return TARGET_CAPS[Target(target)].problems(formats)


def check_target(formats: QuantFormats, target: Target | str, *, recipe_name: str = "") -> None:
    """Raise TargetError naming the target, what it supports, and a target that takes the recipe."""
    target = Target(target)
    caps = TARGET_CAPS[target]
    bad = caps.problems(formats)
    if not bad:
        return
    who = f"recipe {recipe_name!r} (method {formats.method})" if recipe_name else f"method {formats.method}"
    msg = f"{target.label} cannot express {who}: " + "; ".join(bad) + "."
    if caps.fallback is not None and not TARGET_CAPS[caps.fallback].problems(formats):
        msg += f" Write {caps.fallback.label} instead."
    raise TargetError(msg)


# ------------------------------------------------------------------------------- ONNX attributes
def linear_onnx_attrs(act: ActFormat, weight: WeightFormat) -> dict:
    """`ouro::OutlierLinear` quantization attributes (trt_plugins/outlier_linear/README.md), in the
    node's attribute order: w_bits, a_bits, o_bits, n_refresh, threshold_policy, k_sigma, std_correction
    (always written)."""
    o = act.outliers
    if o is None:
        raise FormatError("an OutlierLinear node needs an activation format with an outlier split")
    return {
        "w_bits": weight.bits, "a_bits": act.bits, "o_bits": abi_bits(o.bits), "n_refresh": o.n_refresh,
        "threshold_policy": o.threshold.code, "k_sigma": float(o.k_sigma), "std_correction": o.std_correction,
    }


def linear_formats_from_onnx_attrs(attrs: dict) -> tuple[ActFormat, WeightFormat]:
    """Inverse of `linear_onnx_attrs` (absent std_correction: 0, the meaning before it existed)."""
    outl = OutlierFormat(bits=_bits_from_abi(attrs["o_bits"]), n_refresh=int(attrs["n_refresh"]),
                         threshold=ThresholdPolicy.from_code(attrs["threshold_policy"]), k_sigma=float(attrs["k_sigma"]),
                         std_correction=int(attrs.get("std_correction", 0)))
    return ActFormat(int(attrs["a_bits"]), outliers=outl), WeightFormat(int(attrs["w_bits"]))


SCAN_QUANT_OPERANDS = (("delta", "delta", "delta_k_sigma"), ("B", "b", "bc_k_sigma"), ("C", "c", "bc_k_sigma"))
"""(operand, attribute prefix, k attribute) of the quantized SelectiveScan operands, in input order."""
_NO_H = {"h_bits": 0, "h_group": 1}


def scan_onnx_attrs(formats: dict[str, ActFormat | None]) -> dict:
    """`ouro::SelectiveScan` quantization attributes for delta/B/C (bits 0: not quantized), in the
    node's attribute order: n_refresh, threshold_policy, std_correction (always written),
    delta_k_sigma, bc_k_sigma, h_bits, h_group, then <operand>_bits and <operand>_bits_outlier for
    delta, b, c."""
    shared: dict = {}
    ks: dict = {}
    per_op: dict = {}
    for op, prefix, kname in SCAN_QUANT_OPERANDS:
        fmt = formats.get(op)
        if fmt is None:
            per_op.update({f"{prefix}_bits": 0, f"{prefix}_bits_outlier": 0})
            continue
        o = fmt.outliers
        if o is None:
            raise FormatError(f"scan operand {op}: the SelectiveScan node quantizes with an outlier split; got {fmt.describe()}")
        per_op.update({f"{prefix}_bits": fmt.bits, f"{prefix}_bits_outlier": abi_bits(o.bits)})
        ks.setdefault(kname, float(o.k_sigma))
        for attr, v in (("n_refresh", o.n_refresh), ("threshold_policy", o.threshold.code), ("std_correction", o.std_correction)):
            if shared.setdefault(attr, v) != v:
                raise FormatError(f"scan operands disagree on {attr}; the SelectiveScan node takes one value")
    return {"n_refresh": shared.get("n_refresh", 1), "threshold_policy": shared.get("threshold_policy", 0),
            "std_correction": shared.get("std_correction", DEFAULT_STD_CORRECTION),
            "delta_k_sigma": ks.get("delta_k_sigma", DELTA_K_SIGMA), "bc_k_sigma": ks.get("bc_k_sigma", DEFAULT_K_SIGMA),
            **_NO_H, **per_op}


def scan_formats_from_onnx_attrs(attrs: dict) -> dict[str, ActFormat | None]:
    """Inverse of `scan_onnx_attrs`: operand -> format (None when its bits are 0)."""
    out: dict[str, ActFormat | None] = {}
    for op, prefix, kname in SCAN_QUANT_OPERANDS:
        bits = int(attrs.get(f"{prefix}_bits", 0))
        if not bits:
            out[op] = None
            continue
        ob = int(attrs.get(f"{prefix}_bits_outlier", 0)) or FP16_ABI_BITS  # 0: fp16 outliers (plugin contract)
        out[op] = ActFormat(bits, outliers=OutlierFormat(
            bits=_bits_from_abi(ob), n_refresh=int(attrs.get("n_refresh", 1)),
            threshold=ThresholdPolicy.from_code(attrs.get("threshold_policy", 0)),
            k_sigma=float(attrs.get(kname, DELTA_K_SIGMA if op == "delta" else DEFAULT_K_SIGMA)),
            std_correction=int(attrs.get("std_correction", 0))))
    return out


def _enum(cls: type[Enum], v, key: str):
    try:
        return cls(v)
    except ValueError:
        raise FormatError(f"{key} {v!r} is not one of {', '.join(m.value for m in cls)}") from None
