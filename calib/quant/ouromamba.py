"""OuroMamba-Quant quantizer modules and the method registration (ALGORITHMS.md §1.2, seed Alg. 2).

Decisions (each is what the kernels must implement too):
* Linear inputs (in_proj, x_proj(_b), dt_proj(_b), out_proj): `OutlierActQuantizer`, i.e.
  `outlier_fake_quant` with a learnable static per-time-step inlier scale S_I(t) of shape (1, L, 1)
  (STE on round, so the gradient reaches S_I through x/S_I as in LSQ), outliers dynamic per token.
* Learned scales are parameterised as scale = init_scale * ratio with `ratio` (init 1) the learned
  tensor, so AdamW's step is relative to each scale's size (a raw-scale lr of 5e-4, as in the
  official code, moves an 8-bit weight scale of ~1e-3 by half its value per step). `freeze()`
  folds the ratio into the stored scale, which is then exactly the scale the kernels use.
  The outlier list is kept per batch element and per refresh window (quantizers.py docstring).
* Weights of those linears: symmetric, per output channel, restricted range, L_p (p = 2.4)
  initialised, learnable scale (`ChannelWeightQuantizer`); bias stays FP.
* SSM operands: Delta (pre-softplus, dt_proj output incl. bias) with the outlier quantizer and
  k = k_sigma_delta (4); B and C with the outlier quantizer (k = k_sigma) over their d_state
  channels. Symmetric for Delta too (the official Q_Act_d is asymmetric): one quantizer contract
  (`outlier_quant_ref`) serves every activation and TensorRT has no zero points.
* A (= -exp(A_log), (d_inner, d_state)) and D ((d_inner,)) are constants: quantized offline at
  a_bits, A per row (per inner channel), D per tensor, L_p initialised, scales learnable, no
  outlier split (there are no tokens). The official code treats them as Q_Act activations.
* h is not quantized inside the recurrence (the official Vim code quantizes it only after the scan,
  which does not change outputs); asking for "h" is an error for this method.
* Each direction has its own SSM quantizers (the official code shares them, so the backward
  calibration overwrote the forward one; we do not replicate that quirk).
* theta: policy "dynamic" (mu + k sigma of the current token's |inliers|) or "calibrated"
  (theta(t) = calibration mean over images of mu + k sigma at token t). Default: dynamic. Measured
  on the demo model (128 real images, seeds 0 and 1, `tools/quant_accuracy.py`): top-1 equal or
  better with dynamic in every run (W4A4 99.60/99.40 vs 99.40/99.40, W4A8 99.20/99.20 vs
  99.20/98.99); logit SQNR W4A4 21.49/21.31 vs 21.54/21.11 dB (a tie), W8A8 ~1 dB better with
  calibrated (42 vs 43 dB, both at FP top-1). Dynamic is also the official code's policy and needs
  no theta table in the kernels.
* Delta can be quantized before dt_proj's bias (`delta_before_bias`, zero-centred for the
  symmetric grid: +0.6 dB logit SQNR at W4A4 on a demo-config model); off by default because the
  SelectiveScan plugin contract takes Delta with the bias included.
* Outlier detection "static" (fixed offline list) and "none" exist for the seed Table 5 ablation
  (`tools/ablate_outliers.py`) only; the exporters refuse them.
* VMamba (the paper quantizes it without naming its extra layers): conv2d, the out norm and every
  LayerNorm stay FP, fc1 / fc2 are quantized like the mixer linears, each scan direction has its own
  S_I(t) / theta tables in its own token order, the same for every method (ouro.calib.baselines).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ouro.recipes import FP16, ActFormat, CalibConfig, FloatFormat, Method, Recipe, ThresholdPolicy, WeightFormat
from ouro.recipes.formats import abi_bits

from ..quantizers import channel_std, fake_quant_sym, fp16_roundtrip, outlier_fake_quant, qmax, quant_sym_ref
from .base import MethodSpec, QuantizedMixerOps, Quantizer, Site, default_linear, register_method
from .observers import SCALE_EPS, lp_scale_search
from .qdq import QLinearFn, SymActQDQFn, SymActSpec

__all__ = ["OutlierActQuantizer", "ChannelWeightQuantizer", "dynamic_outlier_mask", "static_outlier_fake_quant", "OUROMAMBA"]


def dynamic_outlier_mask(x: Tensor, k_sigma: float, n_refresh: int, std_correction: int = 0) -> Tensor:
    """Outlier mask used for the static init (official `extracter_refresh`): |x| > mu + k sigma per
    token (sigma with `std_correction`, as the quantizer's threshold), accumulated inside each
    n_refresh window (a channel once an outlier stays one). (N, L, C) bool."""
    N, L, C = x.shape
    a = x.abs()
    th = a.mean(-1, keepdim=True) + k_sigma * channel_std(a, std_correction, keepdim=True)
    m = a > th
    W = -(-L // n_refresh)
    pad = W * n_refresh - L
    mw = torch.nn.functional.pad(m, (0, 0, 0, pad)).reshape(N, W, n_refresh, C)
    mw = mw.to(torch.int32).cummax(2).values.bool()
    return mw.reshape(N, W * n_refresh, C)[:, :L]


def static_outlier_fake_quant(x: Tensor, static_scale: Tensor, mask: Tensor, bits_inlier: int, bits_outlier: int) -> Tensor:
    """Ablation only (seed Table 5 "static"): a fixed channel list `mask` (C,) is always the
    outliers (dynamic per-token scale at bits_outlier, or fp16 for the ABI's 16); the rest are static S_I(t) inliers."""
    xf = x.float()
    m = mask.to(torch.bool).view(1, 1, -1)
    inl = torch.where(m, torch.zeros_like(xf), xf)
    out = torch.where(m, xf, torch.zeros_like(xf))
    x_in = fake_quant_sym(inl, static_scale, bits_inlier)
    if bits_outlier >= abi_bits(FP16):
        return x_in + fp16_roundtrip(out)
    amax = out.detach().abs().amax(-1, keepdim=True)
    s_o = torch.where(amax > 0, amax / qmax(bits_outlier), torch.ones_like(amax))
    return x_in + fake_quant_sym(out, s_o, bits_outlier)


class OutlierActQuantizer(Quantizer):
    """OuroMamba activation quantizer: static S_I(t) inliers + dynamic outliers (`outlier_fake_quant`).

    format: an ActFormat, symmetric, per token ((1, L, 1) scale) or per tensor ((1, 1, 1)); its
    `outliers` (None: no outlier split, the "none" ablation) give outlier bits, n_refresh, threshold
    policy and k. static_scale is learned through `ratio`; theta: (L,) buffer, the calibrated
    threshold (policy "calibrated" only). applied_in_linear: Delta quantized inside dt_proj, before
    its bias (delta_before_bias). fake_quant: the function quantize() calls, (x, scale, bits_in,
    bits_out, n_refresh, policy, k_sigma=, theta=, std_correction=, return_mask=True) -> (x_hat, mask);
    tools/calib_cost.py swaps in the `_ref`-based one."""

    group = "act"
    fake_quant = staticmethod(outlier_fake_quant)

    def __init__(self, seq_len: int, fmt: ActFormat, *, channels: int | None = None, static_fraction: float = 0.08,
                 applied_in_linear: bool = False) -> None:
        super().__init__(fmt)
        if not isinstance(fmt, ActFormat) or not fmt.symmetric or fmt.smoothing or fmt.log2:
            raise ValueError(f"OutlierActQuantizer takes a symmetric ActFormat, got {fmt}")
        self.static_fraction = static_fraction
        self.applied_in_linear = applied_in_linear
        if self.detection == "static":
            if channels is None:
                raise ValueError("static outlier detection needs the channel count")
            self.register_buffer("static_mask", torch.zeros(channels, dtype=torch.bool))
        self.seq_len = seq_len
        shape = (1, seq_len if self.granularity == "token" else 1, 1)
        self.register_buffer("static_scale", torch.ones(shape))
        self.ratio = nn.Parameter(torch.ones(shape))
        self.register_buffer("theta", torch.zeros(seq_len))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    # -- the format, as the _ref functions take it ------------------------------------------------
    @property
    def bits_inlier(self) -> int:
        return self.format.bits

    @property
    def bits_outlier(self) -> int:
        """Outlier bits in the kernels' ABI spelling (16: fp16 outliers)."""
        o = self.format.outliers
        return abi_bits(o.bits) if o is not None else self.format.bits

    @property
    def n_refresh(self) -> int:
        o = self.format.outliers
        return o.n_refresh if o is not None else 1

    @property
    def k_sigma(self) -> float:
        o = self.format.outliers
        return float(o.k_sigma) if o is not None else 0.0

    @property
    def std_correction(self) -> int:
        o = self.format.outliers
        return o.std_correction if o is not None else 0

    @property
    def policy(self) -> ThresholdPolicy:
        o = self.format.outliers
        return o.threshold if o is not None else ThresholdPolicy.DYNAMIC

    @property
    def granularity(self) -> str:
        return self.format.granularity.value

    @property
    def detection(self) -> str:
        """"dynamic" (the product), "static" (fixed list) or "none" (no outlier split)."""
        o = self.format.outliers
        return "none" if o is None else o.detection.value

    def extra_repr(self) -> str:
        return (f"{self.format.describe()}, n_refresh={self.n_refresh}, theta={self.policy.value}, k={self.k_sigma}, "
                f"std correction {self.std_correction}")

    def init_from_stats(self, calib: CalibConfig) -> None:
        x = self.observed()
        if x.shape[1] != self.seq_len:
            raise ValueError(f"activation has {x.shape[1]} tokens, the quantizer was built for L={self.seq_len}")
        a = x.abs()
        th = a.mean(-1) + self.k_sigma * channel_std(a, self.std_correction)  # (N, L)
        self.theta.copy_(th.mean(0))
        mask = dynamic_outlier_mask(x, self.k_sigma, self.n_refresh, self.std_correction)
        if self.detection == "static":  # the channels most often detected, fixed offline
            k = max(1, round(self.static_fraction * x.shape[-1]))
            top = mask.float().mean((0, 1)).topk(k).indices
            self.static_mask.zero_()
            self.static_mask[top] = True
            mask = self.static_mask.expand_as(x)
        elif self.detection == "none":
            mask = torch.zeros_like(mask)
        inl = torch.where(mask, torch.zeros_like(x), x)
        xg = inl.transpose(0, 1).reshape(self.seq_len, -1) if self.granularity == "token" else inl.reshape(1, -1)
        s = lp_scale_search(xg, self.bits_inlier, calib.lp_norm, calib.grid_points)
        with torch.no_grad():
            self.static_scale.copy_(s.reshape(self.static_scale.shape))

    def project_(self) -> None:
        with torch.no_grad():
            self.ratio.copy_(torch.maximum(self.ratio, SCALE_EPS / self.static_scale))

    def scale(self) -> Tensor:
        """The inlier scale S_I in force (learned ratio folded in until `freeze`)."""
        return self.static_scale if bool(self.frozen) else self.static_scale * self.ratio

    def token_scale(self) -> Tensor:
        """The inlier scale as (1, L, 1) (a per-tensor scale is broadcast over the tokens): the
        `inlier_scale` table of the plugin nodes and the Div/Mul scale of the Q/DQ graph."""
        L = self.seq_len
        s = self.scale().detach().float().reshape(-1)
        return (s.expand(L) if s.numel() == 1 else s).reshape(1, L, 1).contiguous()

    def theta_table(self) -> Tensor:
        """(L,) the calibrated thresholds for policy "calibrated", zeros for "dynamic" (unused there)."""
        if self.policy is ThresholdPolicy.CALIBRATED:
            return self.theta.detach().float().reshape(-1)
        return torch.zeros(self.seq_len)

    def freeze(self) -> None:
        with torch.no_grad():
            if not bool(self.frozen):
                self.static_scale.copy_(self.static_scale * self.ratio)
                self.ratio.fill_(1.0)
            self.frozen.fill_(True)
        self.ratio.requires_grad_(False)

    def quantize(self, x: Tensor) -> Tensor:
        if self.detection == "none":
            return fake_quant_sym(x.float(), self.scale(), self.bits_inlier)
        if self.detection == "static":
            return static_outlier_fake_quant(x, self.scale(), self.static_mask, self.bits_inlier, self.bits_outlier)
        x_hat, mask = self.fake_quant(  # the x_hat of outlier_quant_ref, bit for bit, without its codes
            x, self.scale(), self.bits_inlier, self.bits_outlier, self.n_refresh, self.policy,
            k_sigma=self.k_sigma, theta=self.theta, std_correction=self.std_correction, return_mask=True,
        )
        if self.track_stats:
            self._stat_num += float(mask.sum())
            self._stat_den += float(mask.numel())
        return x_hat

    def export(self, x: Tensor) -> Tensor:
        """The static inlier grid as Q/DQ (outliers are not Q/DQ: the plugin node computes them)."""
        return SymActQDQFn.apply(x, self.token_scale(), SymActSpec(self.node_name, self.format))

    def stats(self) -> dict[str, float]:
        return {"outlier_rate": self._stat_num / self._stat_den} if self._stat_den else {}

    def state_keys(self) -> list[str]:
        keys = ["frozen", "static_scale"]
        if self.detection == "static":
            keys.append("static_mask")
        elif self.detection == "dynamic" and self.policy is ThresholdPolicy.CALIBRATED:
            keys.append("theta")
        return keys

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        if bool(self.frozen):
            return {}
        return {self.group: [self.ratio]}


class ChannelWeightQuantizer(Quantizer):
    """Symmetric restricted-range quantizer of a constant tensor (a weight, or SSM A / D).

    format: a symmetric WeightFormat, per channel (one scale per row, dim 0, shape (N, 1, ...)) or per
    tensor (shape (1, ...)). After `freeze()` the integer codes are a buffer and forward returns
    codes * scale exactly (in export mode too: a constant is folded into the graph; a linear's
    export reads `codes` and `scale` itself)."""

    group = "weight"

    def __init__(self, shape: tuple[int, ...], fmt: WeightFormat) -> None:
        super().__init__(fmt)
        if not isinstance(fmt, WeightFormat) or not fmt.symmetric:
            raise ValueError(f"ChannelWeightQuantizer takes a symmetric WeightFormat, got {fmt}")
        sshape = (shape[0] if self.per_channel else 1,) + (1,) * (len(shape) - 1)
        self.register_buffer("scale", torch.ones(sshape))
        self.ratio = nn.Parameter(torch.ones(sshape))
        self.register_buffer("codes", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def per_channel(self) -> bool:
        return self.format.granularity.value == "channel"

    def extra_repr(self) -> str:
        return self.format.describe()

    def observe(self, x: Tensor) -> None:
        self._observed = [x.detach().float()]  # a constant: keep the latest

    def init_from_stats(self, calib: CalibConfig) -> None:
        w = self.observed()
        rows = w.reshape(w.shape[0], -1) if self.per_channel else w.reshape(1, -1)
        s = lp_scale_search(rows, self.bits, calib.lp_norm, calib.grid_points)
        with torch.no_grad():
            self.scale.copy_(s.reshape(self.scale.shape))
        self._weight = w

    def project_(self) -> None:
        with torch.no_grad():
            self.ratio.copy_(torch.maximum(self.ratio, SCALE_EPS / self.scale))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {} if bool(self.frozen) else {self.group: [self.ratio]}

    def state_keys(self) -> list[str]:
        return ["scale", "codes", "frozen"]

    def freeze(self) -> None:
        w = getattr(self, "_weight", None)
        if w is None:
            raise RuntimeError("ChannelWeightQuantizer.freeze before init_from_stats")
        with torch.no_grad():
            self.scale.copy_(self.scale * self.ratio)
            self.ratio.fill_(1.0)
            self.codes.copy_(quant_sym_ref(w, self.scale, self.bits).to(torch.int8))
            self.frozen.fill_(True)
        self.ratio.requires_grad_(False)
        del self._weight

    def quantize(self, w: Tensor) -> Tensor:
        if bool(self.frozen):
            return self.codes.float() * self.scale
        self._weight = w.detach().float()
        return fake_quant_sym(w.float(), self.scale * self.ratio, self.bits)

    def export(self, w: Tensor) -> Tensor:
        if not bool(self.frozen):
            raise RuntimeError(f"{self.node_name}: weight quantizer is not frozen (calibration did not finish)")
        return self.quantize(w)


# ------------------------------------------------------------------------------- registration
def _act(site: Site, recipe: Recipe, fmt) -> OutlierActQuantizer | None:
    if fmt is None or isinstance(fmt, FloatFormat):
        return None
    return OutlierActQuantizer(site.shape[0], fmt, channels=site.shape[-1],
                               static_fraction=recipe.method_params.static_outlier_fraction)


def make_act(site: Site, recipe: Recipe) -> Quantizer | None:
    return _act(site, recipe, recipe.formats.linear_act)


def make_weight(site: Site, recipe: Recipe) -> Quantizer | None:
    fmt = recipe.formats.linear_weight
    return None if isinstance(fmt, FloatFormat) else ChannelWeightQuantizer(site.shape, fmt)


def make_ssm(site: Site, recipe: Recipe) -> Quantizer | None:
    formats = recipe.formats
    fmt = formats.ssm_format(site.name)
    if site.name in ("delta", "B", "C"):
        q = _act(site, recipe, fmt)
        if q is not None and site.name == "delta":
            q.applied_in_linear = formats.delta_before_bias
        return q
    if site.name in ("A", "D"):
        return None if isinstance(fmt, FloatFormat) else ChannelWeightQuantizer(site.shape, fmt)
    raise NotImplementedError(
        f"OuroMamba does not quantize SSM operand {site.name!r} (h stays FP in the recurrence, like the official code); "
        "remove it from the recipe's ssm_operands"
    )


def linear(ops: QuantizedMixerOps, name: str, module: nn.Linear, x: Tensor) -> Tensor:
    """Default quantized linear, except a dt_proj (the linear producing a direction's Delta,
    `ops.delta_of`) when that Delta quantizer is `applied_in_linear`: then Delta is quantized on
    dt_proj's output before the bias, and the bias is added in FP."""
    direction = ops.delta_of.get(name)
    if direction is not None:
        key = f"delta_{direction}"
        q = ops.ssm[key] if key in ops.ssm else None
        if q is not None and q.applied_in_linear:
            xq = ops.act[name](x) if name in ops.act else x
            w = ops.weight[name](module.weight) if name in ops.weight else module.weight
            y = q(torch.nn.functional.linear(xq, w))
            return y if module.bias is None else y + module.bias
    return default_linear(ops, name, module, x)


def export_linear(ops: QuantizedMixerOps, name: str, module: nn.Linear, x: Tensor) -> Tensor:
    """Export mode: one fused Q/DQ linear (`QLinearFn`): the input's inlier Q/DQ, the int8 weight
    codes per output channel, MatMul and the bias (zeros when the layer has none)."""
    qa, qw = ops.act[name] if name in ops.act else None, ops.weight[name] if name in ops.weight else None
    if qa is None and qw is None:
        return nn.functional.linear(x, module.weight, module.bias)
    if qa is None or qw is None:
        raise NotImplementedError(f"{ops.prefix}.{name}: the OuroMamba linear export needs both the input and the weight quantized")
    if not bool(qw.frozen):
        raise RuntimeError(f"{qw.node_name}: weight quantizer is not frozen (calibration did not finish)")
    bias = module.bias.detach() if module.bias is not None else torch.zeros(module.out_features)
    return QLinearFn.apply(x, qa.token_scale(), qw.codes, qw.scale.detach().float().reshape(-1), bias.float(),
                           SymActSpec(qa.node_name, qa.format))


OUROMAMBA = register_method(
    Method.OUROMAMBA,
    MethodSpec(make_act=make_act, make_weight=make_weight, make_ssm=make_ssm, linear=linear, export_linear=export_linear,
               description="OuroMamba-Quant (dynamic outliers)"),
)
