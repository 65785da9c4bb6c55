"""QMamba (Li et al., arXiv 2501.13624): LtSQ for exp(dt*A), TGQ for h, tensor-wise uniform elsewhere.

The paper's equations were lost in extraction (seed 003); the forms below are the reconstructions of
ALGORITHMS.md §2 and are marked [RECONSTRUCTION] where they are not in the surviving text.

Uniform (Eqs. 2-3) [RECONSTRUCTION, standard], every activation and weight not covered below,
one (s, z) per tensor:
    x_q = clamp(round(x / s) + z, 0, 2**b - 1),   x_hat = s * (x_q - z),   s = (u - l)/(2**b - 1), z = -round(l / s)
  init: activations l, u = 1st / 99th percentile over the calibration set; weights min / max.

LtSQ (Eq. 6) [RECONSTRUCTION: mirrored log2 quantizer], for Abar = exp(dt*A) of one SSM (one direction):
    code  = clamp(round(-log2((u - Abar) / s)), 0, 2**b - 1),   Abar_hat = u - s * 2**(-code)
  u is the upper bound (init: the calibration max, <= 1), s = u - l (init l: 1st percentile).
  Levels u - s * 2**-k, k = 0..2**b-1: fine steps just below u, where exp(dt*A) is dense.

Skewness condition (Eq. 5) [RECONSTRUCTION of the form], per SSM:
    LtSQ  iff  (1/L) * sum_t median(Abar_t) > tau          (else uniform; tau default 0.9)
  median over the calibration batch, d_inner and d_state at scan step t.

TGQ (Eq. 7) [RECONSTRUCTION of the form; g from the paper], for h inside the recurrence:
  scan step i (in scan order, i.e. t = L-1-i for the backward direction) uses group i // g;
  ceil(L / g) groups, the last one shorter when g does not divide L; each group has its own
  tensor-wise asymmetric (s_k, z_k) (`ouro.calib.scan.TemporalGroupQuant`), init from the 1st/99th
  percentile of h over that group's steps.

Reconstruction (Eq. 9): block by block, Adam (AdamW, weight decay 0) + CosineAnnealingLR, MSE between
the FP mixer output and the quantized mixer output, only the scales (and LtSQ's u, s) learned; zero
points stay fixed. The paper's learning rate was lost [OUR CHOICE]: every scale s (and LtSQ's span) is
learned as s0 * m with the multiplier m initialised to 1 (folded back into s by `freeze`), so one
learning rate (presets: 1e-2, cosine-annealed) is the same relative step for the scales of h (~1e-3) and of A (~0.3).
With absolute scales a single lr was either unstable (1e-3: a small scale collapses) or had no effect
within a CPU budget of 100 steps (4e-5, QDrop's default, meant for 20 000 iterations).

What is quantized [RECONSTRUCTION of the lost symbols]: the inputs and weights of in_proj, x_proj(_b),
dt_proj(_b) and out_proj (tensor-wise uniform); the scan operands u (SSM input), delta (pre-softplus,
as the kernel receives it), B, C (uniform), Abar (LtSQ or uniform), h (TGQ) and the SSM weights A, D
(uniform, min/max). The SSM output y is quantized as out_proj's input. Deviations, chosen to keep the
comparison on the same tensors as the other methods: conv1d stays FP (the shared exclusion list);
QDrop's random drop of activation quantization is not used (unknown in the paper).
Bits: every activation (h and Abar included) at the recipe's a_bits; weights, A and D at w_bits.
Method outputs: `QuantizedModel.method_info["abar_quantizers"]` lists, per layer and direction, the
quantizer the skewness condition chose and its statistic (QuantState header and report).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ouro.recipes import ActFormat, CalibConfig, FloatFormat, LossKind, Method, QMambaParams, Recipe

from ..quant.base import SCAN_OPERANDS, MethodSpec, QuantizedMixerOps, QuantMode, Quantizer, Site, register_method
from ..quantizers import fake_quant_asym, round_ste
from ..scan import ScanInputs, TemporalGroupQuant
from .common import EPS_SCALE, MIN_SCALE_MULT, TensorAsymQuant, asym_qparams, fold_scale_mult_, quantile_range

__all__ = [
    "QMambaParams",
    "ltsq_quant_ref",
    "ltsq_fake_quant",
    "ltsq_levels",
    "skewness_statistic",
    "use_ltsq",
    "tgq_group_index",
    "tgq_init",
    "AbarQuant",
    "TGQQuant",
    "QMAMBA_SPEC",
    "quantized_scan",
    "ltsq_choices",
]

LTSQ_MIN_RATIO = 2.0**-40
"""(u - Abar)/s is clamped below by this before log2: values at or above u take the top code."""


# ----------------------------------------------------------------------------------- LtSQ
def ltsq_quant_ref(x: Tensor, upper: Tensor, span: Tensor, bits: int) -> Tensor:
    """LtSQ integer codes (float tensor of small integers in [0, 2**bits - 1]), Eq. 6 [RECONSTRUCTION]."""
    r = torch.clamp((upper - x.float()) / span, min=LTSQ_MIN_RATIO)
    return torch.clamp(torch.round(-torch.log2(r)), 0, 2**bits - 1)


def ltsq_fake_quant(x: Tensor, upper: Tensor, span: Tensor, bits: int) -> Tensor:
    """u - s * 2**(-code) with STE on the rounding (gradients reach x, u and s)."""
    r = torch.clamp((upper - x.float()) / span, min=LTSQ_MIN_RATIO)
    code = torch.clamp(round_ste(-torch.log2(r)), 0, 2**bits - 1)
    return upper - span * torch.exp2(-code)


def ltsq_levels(upper: float | Tensor, span: float | Tensor, bits: int) -> Tensor:
    """All 2**bits representable values, ascending: u - s * 2**-k for k = 0..2**bits - 1."""
    u = upper.float() if isinstance(upper, Tensor) else torch.tensor(float(upper), device="cpu")
    s = span.float() if isinstance(span, Tensor) else torch.tensor(float(span), device=u.device)
    k = torch.arange(2**bits, dtype=torch.float32, device=u.device)
    return u - s * torch.exp2(-k)


def skewness_statistic(abar: Tensor) -> Tensor:
    """(1/L) sum_t median(Abar_t) for Abar of shape (B, L, D, S) (Eq. 5 left side) [RECONSTRUCTION]."""
    if abar.dim() != 4:
        raise ValueError(f"Abar must be (B, L, D, S), got {tuple(abar.shape)}")
    per_t = abar.detach().float().transpose(0, 1).reshape(abar.shape[1], -1)
    return per_t.median(dim=1).values.mean()


def use_ltsq(abar: Tensor, tau: float) -> bool:
    """The skewness condition: LtSQ iff the mean per-step median of Abar exceeds tau."""
    return bool(skewness_statistic(abar) > tau)


# ------------------------------------------------------------------------------------ TGQ
def tgq_group_index(L: int, group: int, reverse: bool = False, device: torch.device | str = "cpu") -> Tensor:
    """Group of each TOKEN position t (L,): scan step i // group, with i = t (fwd) or L-1-t (bwd)."""
    if group < 1:
        raise ValueError(f"TGQ group length must be >= 1, got {group}")
    t = torch.arange(L, device=device)
    i = (L - 1 - t) if reverse else t
    return i // group


def tgq_init(h: Tensor, group: int, bits: int, reverse: bool, lo_q: float, hi_q: float) -> tuple[Tensor, Tensor]:
    """Per-group (scale, zero), each (ceil(L/g),), from states h (B, L, D, S) in TOKEN order."""
    L = h.shape[1]
    gi = tgq_group_index(L, group, reverse, h.device)
    G = TemporalGroupQuant.num_groups(L, group)
    scales, zeros = [], []
    for k in range(G):
        lo, hi = quantile_range(h[:, gi == k], lo_q, hi_q)
        s, z = asym_qparams(lo, hi, bits)
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales), torch.stack(zeros)


# ------------------------------------------------------------------------------ quantizers
def _params(recipe: Recipe) -> QMambaParams:
    p = recipe.method_params
    return p if isinstance(p, QMambaParams) else QMambaParams()


class AbarQuant(Quantizer):
    """Quantizer of Abar = exp(dt*A) of one SSM (one direction), applied inside the scan.

    init: the skewness condition (Eq. 5) on the observed Abar picks LtSQ (learned u, s) or the
    tensor-wise uniform quantizer (learned scale, fixed zero, 1st/99th percentile init); the choice
    and the statistic are buffers, so they travel with the QuantState."""

    group = "act"

    def __init__(self, fmt: ActFormat, tau: float, p: float) -> None:
        super().__init__(fmt)
        self.bits, self.tau, self.p = fmt.bits, tau, p
        self.upper = nn.Parameter(torch.ones(()))
        self.span = nn.Parameter(torch.ones(()), requires_grad=False)
        self.span_mult = nn.Parameter(torch.ones(()))
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.scale_mult = nn.Parameter(torch.ones(()))
        self.register_buffer("zero", torch.zeros(()))
        self.register_buffer("use_ltsq", torch.zeros((), dtype=torch.bool))
        self.register_buffer("skew_stat", torch.zeros(()))

    def init_from_stats(self, calib: CalibConfig | None = None) -> None:
        a = self.observed()
        stat = skewness_statistic(a)
        lo, hi = quantile_range(a, self.p, 1.0 - self.p)
        amax = a.max()
        s, z = asym_qparams(lo, hi, self.bits)
        with torch.no_grad():
            self.skew_stat.copy_(stat)
            self.use_ltsq.fill_(bool(stat > self.tau))
            self.upper.copy_(amax)  # [RECONSTRUCTION] u = calibration max (<= 1)
            self.span.copy_(torch.clamp(amax - lo, min=EPS_SCALE))
            self.scale.copy_(s)
            self.zero.copy_(z)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"act": [self.upper, self.span_mult] if bool(self.use_ltsq) else [self.scale_mult]}

    def project_(self) -> None:
        with torch.no_grad():
            self.span_mult.clamp_(min=MIN_SCALE_MULT)
            self.scale_mult.clamp_(min=MIN_SCALE_MULT)

    def freeze(self) -> None:
        fold_scale_mult_(self.span, self.span_mult)
        fold_scale_mult_(self.scale, self.scale_mult)

    def state_keys(self) -> list[str]:
        return ["upper", "span", "scale", "zero", "use_ltsq", "skew_stat"]  # the multipliers are 1 after freeze

    def quantize(self, x: Tensor) -> Tensor:
        if bool(self.use_ltsq):
            return ltsq_fake_quant(x, self.upper, self.span * self.span_mult, self.bits)
        return fake_quant_asym(x, self.scale * self.scale_mult, self.zero, self.bits)

    def choice(self) -> dict:
        return {"quantizer": "ltsq" if bool(self.use_ltsq) else "uniform", "skew_stat": round(float(self.skew_stat), 6), "tau": self.tau}

    def export_tables(self) -> tuple[bool, list[Tensor]]:
        """(LtSQ chosen?, [scale, zero, upper, span]): the four scalars of both grids, for the scan node."""
        t = [self.scale * self.scale_mult, self.zero, self.upper, self.span * self.span_mult]
        return bool(self.use_ltsq), [v.detach().float().reshape(()) for v in t]


class TGQQuant(Quantizer):
    """TGQ of the hidden state h of one direction: ceil(L/g) groups of g scan steps, each with a
    learned tensor-wise scale and a fixed zero point (`ouro.calib.scan.TemporalGroupQuant` numerics).

    Used through `hook(h, step)` (the scan's h_quant hook: step = index in scan order)."""

    group = "act"

    def __init__(self, fmt: ActFormat, L: int, p: float) -> None:
        super().__init__(fmt)
        self.bits, self.L, self.g, self.p = fmt.bits, L, fmt.group, p
        G = TemporalGroupQuant.num_groups(L, fmt.group)
        self.scale = nn.Parameter(torch.ones(G), requires_grad=False)
        self.scale_mult = nn.Parameter(torch.ones(G))
        self.register_buffer("zero", torch.zeros(G))
        self._by_group: dict[int, list[Tensor]] = {}

    def hook(self, h: Tensor, step: int) -> Tensor:
        if self.mode is QuantMode.FP:
            return h
        if self.mode is QuantMode.OBSERVE:
            self._by_group.setdefault(step // self.g, []).append(h.detach().float())
            return h
        return TemporalGroupQuant(self.bits, self.g, self.scale * self.scale_mult, self.zero)(h, step)

    def forward(self, x: Tensor) -> Tensor:
        raise TypeError("TGQQuant quantizes inside the recurrence: call hook(h, step) (the scan's h_quant)")

    def init_from_stats(self, calib: CalibConfig | None = None) -> None:
        G = self.scale.shape[0]
        missing = [k for k in range(G) if k not in self._by_group]
        if missing:
            raise RuntimeError(f"TGQ observed no hidden states for groups {missing} (L={self.L}, g={self.g})")
        with torch.no_grad():
            for k in range(G):
                lo, hi = quantile_range(torch.cat([t.reshape(-1) for t in self._by_group[k]]), self.p, 1.0 - self.p)
                s, z = asym_qparams(lo, hi, self.bits)
                self.scale[k] = s
                self.zero[k] = z

    def clear_observed(self) -> None:
        super().clear_observed()
        self._by_group = {}

    def project_(self) -> None:
        with torch.no_grad():
            self.scale_mult.clamp_(min=MIN_SCALE_MULT)

    def freeze(self) -> None:
        fold_scale_mult_(self.scale, self.scale_mult)

    def state_keys(self) -> list[str]:
        return ["scale", "zero"]  # scale_mult is 1 after freeze

    def export_tables(self) -> list[Tensor]:
        """[scale, zero], one per group (G,): the scan node's h_scale / h_zero (group = step // g)."""
        return [(self.scale * self.scale_mult).detach().float(), self.zero.detach().float()]


def quantized_scan(
    u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, Dskip: Tensor | None, z: Tensor | None, *,
    reverse: bool, abar_quant=None, h_quant=None,
) -> Tensor:
    """Fast twin of `selective_scan_ref(..., delta_softplus=True, abar_quant=, h_quant=)`: the same
    fp32 operations in the same order (bit-identical forward, tests/unit/test_baselines.py), but the
    per-step slices come from one `unbind`, whose backward is a single stack instead of L full-size
    scatters (the reference's `dA[:, t]` indexing made the tuning backward O(L^2) in memory traffic)."""
    Bsz, L, D = u.shape
    uf = u.float()
    dt = F.softplus(delta.float())
    dA = torch.exp(dt.unsqueeze(-1) * A.float())
    if abar_quant is not None:
        dA = abar_quant(dA)
    dBu = dt.unsqueeze(-1) * Bm.float().unsqueeze(2) * uf.unsqueeze(-1)
    dAs, dBus, Cs = dA.unbind(1), dBu.unbind(1), Cm.float().unbind(1)
    h = uf.new_zeros(Bsz, D, A.shape[1])
    ys: list[Tensor] = [None] * L  # type: ignore[list-item]
    for i, t in enumerate(range(L - 1, -1, -1) if reverse else range(L)):
        h = dAs[t] * h + dBus[t]
        if h_quant is not None:
            h = h_quant(h, i)
        ys[t] = torch.einsum("bds,bs->bd", h, Cs[t])
    y = torch.stack(ys, dim=1)
    if Dskip is not None:
        y = y + uf * Dskip.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y


def _get(d: nn.ModuleDict, key: str):
    return d[key] if key in d else None


def _qmamba_scan(ops: QuantizedMixerOps, direction: str, inputs: ScanInputs) -> Tensor:
    """Quantize the scan operands, then the sequential scan (`quantized_scan`, the twin of
    `selective_scan_ref` with its hooks) with LtSQ/uniform on Abar and TGQ on h inside the recurrence
    (the fast FP scan when neither is quantized)."""
    for op, arg in SCAN_OPERANDS.items():
        q = _get(ops.ssm, f"{op}_{direction}")
        if q is not None:
            inputs = inputs._replace(**{arg: ops.quantize_operand(q, getattr(inputs, arg))})
    abar, hq = _get(ops.ssm, f"abar_{direction}"), _get(ops.ssm, f"h_{direction}")
    if abar is None and hq is None:
        return ops.run_scan_core(direction, inputs)
    if ops.exporting:  # the exporter's scan core emits the recurrence with its abar / h quantizers
        return ops.run_scan_core(direction, inputs, abar_quant=abar, h_quant=hq)
    return quantized_scan(*inputs, reverse=ops.reverse[direction], abar_quant=abar, h_quant=None if hq is None else hq.hook)


def _make_act(site: Site, recipe: Recipe) -> Quantizer | None:
    fmt = recipe.formats.linear_act
    return None if isinstance(fmt, FloatFormat) else TensorAsymQuant(fmt, "percentile", _params(recipe).percentile, relative=True)


def _make_weight(site: Site, recipe: Recipe) -> Quantizer | None:
    fmt = recipe.formats.linear_weight
    return None if isinstance(fmt, FloatFormat) else TensorAsymQuant(fmt, "minmax", group="weight", relative=True)


def _make_ssm(site: Site, recipe: Recipe) -> Quantizer | None:
    prm = _params(recipe)
    fmt = recipe.formats.ssm_format(site.name)
    if isinstance(fmt, FloatFormat):
        return None
    if site.name in ("A", "D"):  # the two SSM weights: tensor-wise, min-max
        return TensorAsymQuant(fmt, "minmax", group="weight", relative=True)
    if site.name == "abar":
        return AbarQuant(fmt, prm.tau, prm.percentile)
    if site.name == "h":
        return TGQQuant(fmt, site.shape[0], prm.percentile)
    return TensorAsymQuant(fmt, "percentile", prm.percentile, relative=True)


QMAMBA_SPEC = register_method(
    Method.QMAMBA,
    MethodSpec(
        make_act=_make_act,
        make_weight=_make_weight,
        make_ssm=_make_ssm,
        scan=_qmamba_scan,
        loss=LossKind.MSE,
        cosine_lr=True,
        info=lambda module, recipe: {"method": "qmamba", "abar_quantizers": ltsq_choices(module)},
        description="QMamba: LtSQ on exp(dt*A) (skewness condition), TGQ on h, tensor-wise uniform elsewhere, block MSE reconstruction",
    ),
)


def ltsq_choices(qmodel: nn.Module) -> list[dict]:
    """Per layer and direction: which quantizer the skewness condition chose for Abar, and why."""
    out = []
    for name, m in qmodel.named_modules():
        if isinstance(m, AbarQuant):
            out.append({"site": name, **m.choice()})
    return out
