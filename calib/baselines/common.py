"""Pieces shared by the baseline methods: range observers, asymmetric parameters, simple quantizers.

All quantizers here follow the core's `ouro.calib.quant.base.Quantizer` protocol (observe ->
init_from_stats -> quantize), so the core's `calibrate` drives them like OuroMamba's.
Shape notation as in `ouro.calib.quantizers`: B batch, L tokens, C channels, N output channels.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ouro.recipes import ActFormat, CalibConfig, WeightFormat

from ..quant.base import Quantizer
from ..quant.qdq import asym_act_qdq, weight_dq
from ..quantizers import fake_quant_asym, fake_quant_sym, qmax

__all__ = [
    "QUANTILE_MAX_NUMEL",
    "EPS_SCALE",
    "flat_sample",
    "quantile_range",
    "minmax_range",
    "asym_qparams",
    "TensorAsymQuant",
    "fold_scale_mult_",
    "ChannelSymWeightQuant",
]

QUANTILE_MAX_NUMEL = 1 << 18
"""Quantiles of larger tensors are taken on an evenly strided subsample of this many elements
(deterministic; `torch.quantile` refuses inputs above 2**24 elements)."""
EPS_SCALE = 1e-8
"""Smallest scale any baseline uses (as the reference codes' eps)."""
MIN_SCALE_MULT = 1e-3
"""Smallest learned multiplier of an initial scale (relative scale learning)."""


def flat_sample(x: Tensor, max_numel: int = QUANTILE_MAX_NUMEL) -> Tensor:
    """x flattened to fp32, evenly strided down to at most `max_numel` elements (deterministic)."""
    f = x.detach().reshape(-1).float()
    if f.numel() > max_numel:
        step = -(-f.numel() // max_numel)
        f = f[::step]
    return f


def quantile_range(x: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    """(lo-quantile, hi-quantile) of all elements of x, quantiles in [0, 1] (linear interpolation)."""
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    f = flat_sample(x)
    q = torch.quantile(f, torch.tensor([lo, hi], dtype=f.dtype, device=f.device))
    return q[0], q[1]


def minmax_range(x: Tensor) -> tuple[Tensor, Tensor]:
    f = x.detach().float()
    return f.min(), f.max()


def asym_qparams(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point of the unsigned grid [0, 2**b - 1] covering [lo, hi] (ALGORITHMS.md §2 Eq. 3):

        s = (hi - lo) / (2**b - 1),   z = -round(lo / s)

    The range is not forced to contain 0 (a strictly positive tensor such as exp(dt*A) keeps every level)."""
    # not torch.as_tensor: under a default-device context it would move a tensor to that device
    lo = lo.float() if isinstance(lo, Tensor) else torch.tensor(float(lo), device="cpu")
    hi = hi.float() if isinstance(hi, Tensor) else torch.tensor(float(hi), device=lo.device)
    s = torch.clamp((hi - lo) / (2**bits - 1), min=EPS_SCALE)
    z = -torch.round(lo / s)
    return s, z


class TensorAsymQuant(Quantizer):
    """One asymmetric (scale, zero) for the whole tensor: s * (clamp(round(x/s) + z, 0, 2**b-1) - z).

    format: an asymmetric per-tensor ActFormat (an activation: exported as Q/DQ) or WeightFormat (a
    constant: exported as DequantizeLinear of its uint8 codes).
    init "minmax": [min, max] of the observed tensor; "percentile": [q_p, q_(1-p)] quantiles.
    The zero point is a fixed integer. The scale is learnable unless learnable=False; with
    relative=True the optimizer learns a multiplier `scale_mult` (init 1) of the initial scale, so
    one learning rate means the same relative step for scales of very different magnitudes;
    `freeze` folds it into `scale`."""

    def __init__(self, fmt: ActFormat | WeightFormat, init: str = "minmax", p: float = 0.01, group: str = "act",
                 learnable: bool = True, relative: bool = False) -> None:
        super().__init__(fmt)
        if init not in ("minmax", "percentile"):
            raise ValueError(f"init must be 'minmax' or 'percentile', got {init!r}")
        if fmt.symmetric or fmt.granularity.value != "tensor":
            raise ValueError(f"TensorAsymQuant takes an asymmetric per-tensor format, got {fmt}")
        self.bits, self.init, self.p, self.group = fmt.bits, init, p, group
        self.scale = nn.Parameter(torch.ones(()), requires_grad=learnable and not relative)
        self.scale_mult = nn.Parameter(torch.ones(()), requires_grad=learnable and relative)
        self.register_buffer("zero", torch.zeros(()))

    def range_of(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return quantile_range(x, self.p, 1.0 - self.p) if self.init == "percentile" else minmax_range(x)

    def init_from_stats(self, calib: CalibConfig | None = None) -> None:
        s, z = asym_qparams(*self.range_of(self.observed()), self.bits)
        with torch.no_grad():
            self.scale.copy_(s)
            self.zero.copy_(z)

    def observe(self, x: Tensor) -> None:
        if self.group == "weight" and self._observed:  # a weight is the same tensor on every call
            return
        super().observe(x)

    def project_(self) -> None:
        with torch.no_grad():
            self.scale.clamp_(min=EPS_SCALE)
            self.scale_mult.clamp_(min=MIN_SCALE_MULT)

    def freeze(self) -> None:
        fold_scale_mult_(self.scale, self.scale_mult)

    def state_keys(self) -> list[str]:
        return ["scale", "zero"]  # scale_mult is 1 after freeze

    def quantize(self, x: Tensor) -> Tensor:
        return fake_quant_asym(x, self.scale * self.scale_mult, self.zero, self.bits)

    def export(self, x: Tensor) -> Tensor:
        s = (self.scale * self.scale_mult).detach()
        if isinstance(self.format, WeightFormat):
            return weight_dq(x, self.format, self.node_name, s, self.zero)
        return asym_act_qdq(x, s, self.zero, self.node_name, self.format)


def fold_scale_mult_(scale: nn.Parameter, mult: nn.Parameter) -> None:
    """scale <- scale * mult, mult <- 1 (after tuning: the QuantState then holds the final scale)."""
    with torch.no_grad():
        scale.mul_(mult)
        mult.fill_(1.0)


class ChannelSymWeightQuant(Quantizer):
    """Per-output-channel symmetric min-max weight quantizer: s_n = max_k |W_nk| / qmax, scale (N, 1)."""

    group = "weight"

    def __init__(self, fmt: WeightFormat, out_features: int, learnable: bool = True) -> None:
        super().__init__(fmt)
        if not fmt.symmetric or fmt.granularity.value != "channel":
            raise ValueError(f"ChannelSymWeightQuant takes a symmetric per-channel WeightFormat, got {fmt}")
        self.bits = fmt.bits
        self.scale = nn.Parameter(torch.ones(out_features, 1), requires_grad=learnable)

    def observe(self, x: Tensor) -> None:
        if not self._observed:
            super().observe(x)

    def init_from_stats(self, calib: CalibConfig | None = None) -> None:
        w = self.observed().reshape(self.scale.shape[0], -1)
        with torch.no_grad():
            self.scale.copy_(torch.clamp(w.abs().amax(1, keepdim=True) / qmax(self.bits), min=EPS_SCALE))

    def project_(self) -> None:
        with torch.no_grad():
            self.scale.clamp_(min=EPS_SCALE)

    def quantize(self, x: Tensor) -> Tensor:
        return fake_quant_sym(x, self.scale, self.bits)

    def export(self, w: Tensor) -> Tensor:
        return weight_dq(w, self.format, self.node_name, self.scale)
