"""The attention matmuls' operand quantizer (QK^T and attention x V), the same for every method.

A hook point that calls `ops.matmul(name, a, b)` (MambaVision's windowed self-attention: "qk" with
a = q, b = k^T before the 1/sqrt(head_dim) scale; "av" with a = the softmax probabilities, b = v)
declares `MatmulSite`s (ouro.calib.families). Each operand of such a matmul gets one
`MatmulOperandQuant`:

    format   MATMUL_FORMAT: 8-bit, symmetric, one scale per tensor (the restricted grid [-127, 127]
             in the fake-quant model; INT8's [-128, 127] in the Q/DQ graph, as every symmetric
             activation: ouro.calib.quant.qdq)
    init     scale = max |x| / 127 over the calibration inputs of the unit (min-max); a running
             maximum, so the observed tensors are not kept (attention maps are large)
    tuning   none: the scale is a buffer, fixed after init (the block-wise tuning only moves the
             methods' own quantizers around it)
    export   the standard symmetric Q/DQ (Div, QuantizeLinear, DequantizeLinear, Mul) on each operand,
             named `<hook path>.<matmul>.<a|b>/act_*`, in front of a plain ONNX MatMul

The softmax between the two matmuls stays in floating point. The recipe's bits do not apply here:
the OuroMamba paper's transformer extension keeps attention's matmuls at 8 bits per tensor whatever
the linear layers get (Recipe docstring), and PTQ4VM / QMamba / min-max / percentile say nothing
about attention, so they get the same quantizer (calib/baselines/__init__.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ouro.recipes import ActFormat, CalibConfig, Granularity

from ..quantizers import fake_quant_sym, qmax
from .base import Quantizer
from .qdq import SymActQDQFn, SymActSpec

__all__ = ["MATMUL_FORMAT", "MatmulOperandQuant"]

MATMUL_FORMAT = ActFormat(8, symmetric=True, granularity=Granularity.TENSOR)
"""The attention matmuls' operand format (module docstring)."""
EPS_SCALE = 1e-12


class MatmulOperandQuant(Quantizer):
    """One operand of an attention matmul: 8-bit symmetric per tensor, min-max init (module docstring)."""

    def __init__(self, fmt: ActFormat = MATMUL_FORMAT) -> None:
        super().__init__(fmt)
        if not fmt.symmetric or fmt.granularity is not Granularity.TENSOR or fmt.outliers is not None:
            raise ValueError(f"MatmulOperandQuant takes a symmetric per-tensor format without outliers, got {fmt.describe()}")
        self.bits = fmt.bits
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("amax", torch.zeros(()))

    def observe(self, x: Tensor) -> None:
        self.amax = torch.maximum(self.amax, x.detach().abs().max().float().to(self.amax.device))
        self._stat_den += 1

    def init_from_stats(self, calib: CalibConfig | None = None) -> None:
        if self._stat_den == 0:
            raise RuntimeError(f"{self.node_name or 'MatmulOperandQuant'}: no calibration statistics observed before init_from_stats")
        with torch.no_grad():
            self.scale.copy_(torch.clamp(self.amax / qmax(self.bits), min=EPS_SCALE))

    def clear_observed(self) -> None:
        super().clear_observed()
        self._stat_den = 0.0

    def state_keys(self) -> list[str]:
        return ["scale"]

    def quantize(self, x: Tensor) -> Tensor:
        return fake_quant_sym(x.float(), self.scale, self.bits).to(x.dtype)

    def export(self, x: Tensor) -> Tensor:
        return SymActQDQFn.apply(x, self.scale.detach().float(), SymActSpec(self.node_name, self.format))
