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
      (a constant whose zero point lies outside [0, 255], from a one-sided range, uses INT32 codes)
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
    "asym_act_qdq",
    "weight_dq",
    "static_sym_fake_quant",
    "weight_codes",
]

NODE_NAME_ATTR = "ouro_node_name"
"""Temporary string attribute carrying a node's name through torch's exporter."""
INT8_GRID = (-128, 127)
UINT8_MAX = 255
INT16_GRID = (-(1 << 15), (1 << 15) - 1)
INT32_GRID = (-(1 << 31), (1 << 31) - 1)


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
# The spec objects below hold only Python values: tensors reach the functions as inputs (a tensor
# created while tracing and hidden inside a non-tensor argument breaks torch's tracer).
@dataclass(frozen=True)
class AsymActSpec:
    """An asymmetric static activation Q/DQ. Inputs: x, scale and integer zero point (one per tensor,
    shape (), or per token, shape (1, L, 1)), and sigma, the per-input-channel smoothing divisor (K,)
    when `smoothed`. window: None when every zero point lies in [0, 255] (uint8 Q/DQ with zero
    points); else the INT16 window (-z, 2**bits - 1 - z) of a one-sided per-tensor range."""

    name: str
    format: ActFormat
    smoothed: bool = False
    window: tuple[float, float] | None = None

    @classmethod
    def of(cls, name: str, fmt: ActFormat, zero: Tensor, smoothed: bool = False) -> "AsymActSpec":
        z = zero.detach().float()
        if float(z.min()) >= 0 and float(z.max()) <= UINT8_MAX:
            return cls(name, fmt, smoothed)
        if z.numel() != 1:
            raise NotImplementedError(f"{name}: a per-token zero point outside [0, 255] has no Q/DQ form here")
        lo, hi = -float(z), float((1 << fmt.bits) - 1) - float(z)
        if lo < INT16_GRID[0] or hi > INT16_GRID[1]:
            raise NotImplementedError(f"{name}: zero point {float(z)} is outside the INT16 grid")
        return cls(name, fmt, smoothed, (lo, hi))

    @property
    def per_token(self) -> bool:
        return self.format.granularity is Granularity.TOKEN


def _emit_asym_act_qdq(g, x, scale, zero, sigma, spec: AsymActSpec):
    n, bits = spec.name, spec.format.bits
    if spec.smoothed:
        x = g.op("Div", x, sigma, **_named(f"{n}/act_smooth"))
    if spec.window is None:  # uint8 grid with zero points; per token: axis 1 of (B, L, C)
        axis = {"axis_i": 1} if spec.per_token else {}
        y = g.op("QuantizeLinear", x, scale, zero, **axis, **_named(f"{n}/act_q"))
        if bits < 8:
            hi = (1 << bits) - 1
            y = g.op("Clip", y, _const(g, torch.tensor(0, dtype=torch.uint8)), _const(g, torch.tensor(hi, dtype=torch.uint8)),
                     **_named(f"{n}/act_clip"))
        return g.op("DequantizeLinear", y, scale, zero, **axis, **_named(f"{n}/act_dq"))
    # clamp(round(x/s) + z, 0, hi) - z == clamp(round(x/s), -z, hi - z): that window on an INT16 grid
    one, z16 = _const(g, torch.tensor(1.0)), _const(g, torch.tensor(0, dtype=torch.int16))
    lo_c, hi_c = spec.window
    y = g.op("Div", x, scale, **_named(f"{n}/act_div"))
    y = g.op("Clip", y, _const(g, torch.tensor(lo_c)), _const(g, torch.tensor(hi_c)), **_named(f"{n}/act_clip"))
    y = g.op("QuantizeLinear", y, one, z16, **_named(f"{n}/act_q"))
    y = g.op("DequantizeLinear", y, one, z16, **_named(f"{n}/act_dq"))
    return g.op("Mul", y, scale, **_named(f"{n}/act_mul"))


class AsymActQDQFn(torch.autograd.Function):
    """x -> [Div(sigma)] -> asymmetric Q/DQ (module docstring); forward: `fake_quant_asym` on x[/sigma].

    scale: float (1, L, 1) / (), shaped for the node (per token: (L,)); zero: uint8 of the same
    shape (or, with a window, the float zero point)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero: Tensor, sigma: Tensor, spec: AsymActSpec) -> Tensor:
        xf = x.float() / sigma if spec.smoothed else x.float()
        shape = (1, -1, 1) if spec.per_token else ()
        return fake_quant_asym(xf, scale.reshape(shape), zero.float().reshape(shape), spec.format.bits).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero, sigma, spec):
        return _emit_asym_act_qdq(g, x, scale, zero, sigma, spec)


def asym_act_qdq(x: Tensor, scale: Tensor, zero: Tensor, name: str, fmt: ActFormat, sigma: Tensor | None = None) -> Tensor:
    """Apply the asymmetric Q/DQ function: tensors shaped and typed for the nodes."""
    spec = AsymActSpec.of(name, fmt, zero, smoothed=sigma is not None)
    s = scale.detach().float()
    if spec.window is None:
        shape = (-1,) if spec.per_token else ()
        s, z = s.reshape(shape), zero.detach().reshape(shape).to(torch.uint8)
    else:
        s, z = s.reshape(()), zero.detach().float().reshape(())
    sig = sigma.detach().float() if sigma is not None else s
    return AsymActQDQFn.apply(x, s, z, sig, spec)


# --------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class WeightSpec:
    """A constant as integer codes: w = (codes - zero) * scale, one scale (and zero) per row
    (CHANNEL: (N,)) or one (TENSOR: ()); int8 codes (symmetric) or uint8 (asymmetric)."""

    name: str
    format: WeightFormat

    @property
    def per_row(self) -> bool:
        return self.format.granularity is Granularity.CHANNEL


def weight_codes(w: Tensor, fmt: WeightFormat, scale: Tensor, zero: Tensor | None = None) -> Tensor:
    """The integer codes a fake-quantized constant stands for (int8 symmetric, uint8 asymmetric);
    `scale` / `zero` broadcast against `w`."""
    wf = w.detach().float()
    if fmt.symmetric:
        q = qmax(fmt.bits)
        return torch.clamp(torch.round(wf / scale.float()), -q, q).to(torch.int8)
    return torch.clamp(torch.round(wf / scale.float()) + zero.float(), 0, (1 << fmt.bits) - 1).to(torch.uint8)


class WeightDQFn(torch.autograd.Function):
    """A constant as DequantizeLinear(codes, scale, zero, axis 0 per row); `w` ties it into the trace."""

    @staticmethod
    def forward(ctx, w: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, spec: WeightSpec) -> Tensor:
        shape = (-1,) + (1,) * (codes.dim() - 1) if spec.per_row else ()
        return ((codes.float() - zero.float().reshape(shape)) * scale.reshape(shape)).to(w.dtype)

    @staticmethod
    def symbolic(g, w, codes, scale, zero, spec):
        axis = {"axis_i": 0} if spec.per_row else {}
        return g.op("DequantizeLinear", codes, scale, zero, **axis, **_named(f"{spec.name}/weight_dq"))


def weight_dq(w: Tensor, fmt: WeightFormat, name: str, scale: Tensor, zero: Tensor | None = None) -> Tensor:
    """DequantizeLinear of `w`'s codes under (scale, zero): the tensors shaped and typed for the node."""
    spec = WeightSpec(name, fmt)
    bshape = (-1,) + (1,) * (w.dim() - 1) if spec.per_row else ()
    s = scale.detach().float().reshape(bshape)
    z = None if zero is None else zero.detach().float().reshape(bshape)
    codes = weight_codes(w, fmt, s, z)
    shape = (-1,) if spec.per_row else ()
    if z is None:
        zq = torch.zeros_like(s.reshape(shape), dtype=codes.dtype)
    else:  # a one-sided range (A < 0, a constant D) puts the zero point outside [0, 255]: INT32 container
        wide = float(z.min()) < 0 or float(z.max()) > UINT8_MAX
        if wide and (float(z.min()) < INT32_GRID[0] or float(z.max()) > INT32_GRID[1]):
            raise NotImplementedError(f"{name}: zero point {float(z.min())}..{float(z.max())} outside the INT32 grid")
        codes = codes.to(torch.int32) if wide else codes
        zq = z.reshape(shape).to(codes.dtype)
    return WeightDQFn.apply(w, codes, s.reshape(shape), zq, spec)
