"""Standard Q/DQ emission, owned by the quantizers (QuantMode.EXPORT).

Each function here is a `torch.autograd.Function` whose ONNX `symbolic` emits the standard
QuantizeLinear / DequantizeLinear nodes of one format, and whose forward computes in PyTorch exactly
what those nodes compute (the static part of the quantizer: OuroMamba's dynamic outliers are not
Q/DQ). A quantizer's `export(x)` applies its function, so `torch.onnx.export` of a model in export
mode (`ouro.calib.quant.export_mode`) writes every quantizer's nodes, and the same model run eagerly
is the PyTorch twin of that graph. Node names: `<quantizer node_name>/<role>` through the temporary
attribute NODE_NAME_ATTR (moved onto NodeProto.name by the exporter).

    symmetric activation, per token or tensor (OuroMamba inliers; scale s (1, L, 1), b bits):
        x -> Div(s) -> [Clip(-qmax, qmax) when b < 8] -> QuantizeLinear(1, int8 0) -> DequantizeLinear -> Mul(s)
      A per-time-step scale is a per-row scale of the GEMM input, and row scaling commutes with the GEMM
      (diag(s) X W = diag(s) (X W)): TensorRT runs the INT8 GEMM on X/s and applies s to the output. The
      Clip makes b < 8 bits exact on the INT8 grid; at 8 bits the grid is INT8's [-128, 127] (the fake-quant
      model uses the restricted [-127, 127]; a code of -128 needs x/s < -127.5, beyond every calibrated range).
    asymmetric activation (PTQ4VM per token, QMamba / min-max / percentile per tensor; scale s, zero z):
        x [-> Div(sigma)] -> QuantizeLinear(s, z uint8, axis 1 per token) -> [Clip(0, 2**b - 1) when b < 8]
          -> DequantizeLinear(s, z)
      (a zero point outside [0, 255], possible for a one-sided range, uses the Div/Clip/INT16 form instead)
    weight (codes [N, K] int8 / uint8, per output channel (axis 0) or per tensor):
        DequantizeLinear(codes, scale, zero)                   (INT4/UINT4 at <= 4 bits: exporter, once)
    OuroMamba linear (one fused function, `QLinearFn`): act Q/DQ, weight DQ -> Transpose, MatMul, Add(bias)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ouro.recipes import ActFormat, Granularity, WeightFormat

from ..quantizers import fake_quant_asym, qmax

__all__ = [
    "NODE_NAME_ATTR",
    "SymActSpec",
    "AsymActSpec",
    "WeightSpec",
    "SymActQDQFn",
    "QLinearFn",
    "AsymActQDQFn",
    "WeightDQFn",
    "static_sym_fake_quant",
    "weight_codes",
]

NODE_NAME_ATTR = "ouro_node_name"
"""Temporary string attribute carrying a node's name through torch's exporter."""
INT8_GRID = (-128, 127)
UINT8_MAX = 255
INT16_GRID = (-(1 << 15), (1 << 15) - 1)


def _named(name: str) -> dict:
    return {f"{NODE_NAME_ATTR}_s": name}


def _const(g, value: Tensor):
    return g.op("Constant", value_t=value)


# ----------------------------------------------------------------------------- symmetric activation
@dataclass(frozen=True)
class SymActSpec:
    """A symmetric static activation Q/DQ: node name prefix and format (its inlier grid)."""

    name: str
    format: ActFormat

    @property
    def bits(self) -> int:
        return self.format.bits


def static_sym_fake_quant(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """What the symmetric Q/DQ chain computes (round half to even, clamp to the restricted grid, or
    INT8's full grid at 8 bits)."""
    lo, hi = (-qmax(bits), qmax(bits)) if bits < 8 else INT8_GRID
    return torch.clamp(torch.round(x.float() / scale), lo, hi) * scale


def _emit_sym_act_qdq(g, x, scale, spec: SymActSpec):
    one, zero = _const(g, torch.tensor(1.0)), _const(g, torch.tensor(0, dtype=torch.int8))
    y = g.op("Div", x, scale, **_named(f"{spec.name}/act_div"))
    if spec.bits < 8:
        q = float(qmax(spec.bits))
        y = g.op("Clip", y, _const(g, torch.tensor(-q)), _const(g, torch.tensor(q)), **_named(f"{spec.name}/act_clip"))
    y = g.op("QuantizeLinear", y, one, zero, **_named(f"{spec.name}/act_q"))
    y = g.op("DequantizeLinear", y, one, zero, **_named(f"{spec.name}/act_dq"))
    return g.op("Mul", y, scale, **_named(f"{spec.name}/act_mul"))


def _emit_weight_dq_int8(g, codes, scale, name: str):
    n = codes.type().sizes()[0]
    zero = _const(g, torch.zeros(n, dtype=torch.int8))
    return g.op("DequantizeLinear", codes, scale, zero, axis_i=0, **_named(f"{name}/weight_dq"))


class SymActQDQFn(torch.autograd.Function):
    """x (B, L, C) -> Div(s) -> [Clip] -> Q -> DQ -> Mul(s), s: (1, L, 1)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, spec: SymActSpec) -> Tensor:
        return static_sym_fake_quant(x, scale, spec.bits).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale, spec):
        return _emit_sym_act_qdq(g, x, scale, spec)


class QLinearFn(torch.autograd.Function):
    """y = QDQ(x) @ DQ(W)^T + b: a symmetric activation Q/DQ, symmetric int8 weight codes per output
    channel (scale [N]), one node group named `<spec.name>/...`."""

    @staticmethod
    def forward(ctx, x, scale, codes, w_scale, bias, spec: SymActSpec):
        w = codes.float() * w_scale.reshape(-1, 1)
        y = static_sym_fake_quant(x, scale, spec.bits) @ w.t()
        return (y + bias).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale, codes, w_scale, bias, spec):
        xq = _emit_sym_act_qdq(g, x, scale, spec)
        w = _emit_weight_dq_int8(g, codes, w_scale, spec.name)
        wt = g.op("Transpose", w, perm_i=[1, 0], **_named(f"{spec.name}/weight_t"))
        y = g.op("MatMul", xq, wt, **_named(f"{spec.name}/matmul"))
        return g.op("Add", y, bias, **_named(f"{spec.name}/bias"))


# ---------------------------------------------------------------------------- asymmetric activation
@dataclass(frozen=True, eq=False)
class AsymActSpec:
    """An asymmetric static activation Q/DQ: scale and integer zero point, one per tensor (shape ())
    or per token (shape (1, L, 1)); sigma: the per-input-channel smoothing divisor (K,), or None."""

    name: str
    format: ActFormat
    scale: Tensor
    zero: Tensor
    sigma: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if self.sigma is None else x.float() / self.sigma
        return fake_quant_asym(xf, self.scale, self.zero, self.format.bits)


def _emit_asym_act_qdq(g, x, spec: AsymActSpec):
    n = spec.name
    if spec.sigma is not None:
        x = g.op("Div", x, _const(g, spec.sigma.detach().float().contiguous()), **_named(f"{n}/act_smooth"))
    bits, z = spec.format.bits, spec.zero.detach().float()
    per_token = spec.format.granularity is Granularity.TOKEN and spec.scale.numel() > 1
    hi = (1 << bits) - 1
    if float(z.min()) >= 0 and float(z.max()) <= UINT8_MAX:
        shape = (-1,) if per_token else ()
        s = _const(g, spec.scale.detach().float().reshape(shape).contiguous())
        zp = _const(g, z.reshape(shape).to(torch.uint8).contiguous())
        axis = {"axis_i": 1} if per_token else {}
        y = g.op("QuantizeLinear", x, s, zp, **axis, **_named(f"{n}/act_q"))
        if bits < 8:
            y = g.op("Clip", y, _const(g, torch.tensor(0, dtype=torch.uint8)), _const(g, torch.tensor(hi, dtype=torch.uint8)),
                     **_named(f"{n}/act_clip"))
        return g.op("DequantizeLinear", y, s, zp, **axis, **_named(f"{n}/act_dq"))
    # clamp(round(x/s) + z, 0, hi) - z == clamp(round(x/s), -z, hi - z): the window on an INT16 grid
    if per_token:
        raise NotImplementedError(f"{n}: a per-token zero point outside [0, 255] has no Q/DQ form here")
    s = _const(g, spec.scale.detach().float().reshape(()))
    lo_c, hi_c = -float(z), float(hi) - float(z)
    if lo_c < INT16_GRID[0] or hi_c > INT16_GRID[1]:
        raise NotImplementedError(f"{n}: zero point {float(z)} is outside the INT16 grid")
    one, zero = _const(g, torch.tensor(1.0)), _const(g, torch.tensor(0, dtype=torch.int16))
    y = g.op("Div", x, s, **_named(f"{n}/act_div"))
    y = g.op("Clip", y, _const(g, torch.tensor(lo_c)), _const(g, torch.tensor(hi_c)), **_named(f"{n}/act_clip"))
    y = g.op("QuantizeLinear", y, one, zero, **_named(f"{n}/act_q"))
    y = g.op("DequantizeLinear", y, one, zero, **_named(f"{n}/act_dq"))
    return g.op("Mul", y, s, **_named(f"{n}/act_mul"))


class AsymActQDQFn(torch.autograd.Function):
    """x -> [Div(sigma)] -> asymmetric Q/DQ (module docstring); forward: `fake_quant_asym` on x[/sigma]."""

    @staticmethod
    def forward(ctx, x: Tensor, spec: AsymActSpec) -> Tensor:
        return spec.forward(x).to(x.dtype)

    @staticmethod
    def symbolic(g, x, spec):
        return _emit_asym_act_qdq(g, x, spec)


# --------------------------------------------------------------------------------------- weights
@dataclass(frozen=True, eq=False)
class WeightSpec:
    """Integer codes of a constant and how to dequantize them: w = (codes - zero) * scale.

    codes: int8 (symmetric) or uint8 (asymmetric) with the constant's shape; scale / zero: one per
    row (CHANNEL, shape (N,)) or one (TENSOR, shape ())."""

    name: str
    format: WeightFormat
    codes: Tensor
    scale: Tensor
    zero: Tensor | None = None

    def dequantized(self) -> Tensor:
        per_row = self.format.granularity is Granularity.CHANNEL
        shape = (-1,) + (1,) * (self.codes.dim() - 1) if per_row else ()
        s = self.scale.float().reshape(shape)
        z = 0.0 if self.zero is None else self.zero.float().reshape(shape)
        return (self.codes.float() - z) * s


def weight_codes(w: Tensor, fmt: WeightFormat, scale: Tensor, zero: Tensor | None = None) -> Tensor:
    """The integer codes a fake-quantized constant stands for (int8 symmetric, uint8 asymmetric)."""
    wf = w.detach().float()
    if fmt.symmetric:
        q = qmax(fmt.bits)
        return torch.clamp(torch.round(wf / scale.float()), -q, q).to(torch.int8)
    return torch.clamp(torch.round(wf / scale.float()) + zero.float(), 0, (1 << fmt.bits) - 1).to(torch.uint8)


class WeightDQFn(torch.autograd.Function):
    """A constant as DequantizeLinear(codes, scale, zero) (`w` only ties the node into the trace)."""

    @staticmethod
    def forward(ctx, w: Tensor, spec: WeightSpec) -> Tensor:
        return spec.dequantized().to(w.dtype)

    @staticmethod
    def symbolic(g, w, spec):
        per_row = spec.format.granularity is Granularity.CHANNEL
        shape = (-1,) if per_row else ()
        codes = _const(g, spec.codes.contiguous())
        s = _const(g, spec.scale.detach().float().reshape(shape).contiguous())
        zdt = torch.int8 if spec.format.symmetric else torch.uint8
        z = torch.zeros_like(spec.scale.reshape(shape), dtype=zdt) if spec.zero is None else spec.zero.reshape(shape).to(zdt)
        axis = {"axis_i": 0} if per_row else {}
        return g.op("DequantizeLinear", codes, s, _const(g, z.contiguous()), **axis, **_named(f"{spec.name}/weight_dq"))
