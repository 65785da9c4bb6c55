"""PTQ4VM (Cho et al., WACV 2025): per-token static (PTS) activations, SmoothQuant smoothing, JLSS.

Numerics (ALGORITHMS.md §3, read from the official code YoungHyun197/ptq4vm `ptq4vm/quantizer.py`,
`ptq4vm/jlss.py`), for every quantized linear layer y = x W^T + b with x (B, L, K), W (N, K):

    x~   = x / sigma                                            sigma: (K,) per input channel
    x_hat = s_t * (clamp(round(x~ / s_t) + z_t, 0, 2**b_a - 1) - z_t)   s_t, z_t: (1, L, 1) per token
    W_hat = s_w * clamp(round(W * sigma / s_w), -qmax, qmax)            s_w: (N, 1) per output channel
    y     = x_hat W_hat^T + b                 (unquantized: (x/sigma)(W sigma)^T = x W^T exactly)

Initialisation:
    sigma_j = clamp(max|X_j|, 1e-3)**alpha / clamp(max_i |W_ij|, 1e-5)**(1 - alpha), clamped >= 1e-5
    s_t, z_t: per token, 100 candidate ranges shrinking [min, max] symmetrically, L_p (p = 2.4) error;
              the chosen range is widened to contain 0; z_t is a fixed integer (not learned)
    s_w:      per output channel, candidates i/100 * absmax, L_p (p = 2.4)
JLSS: block by block, AdamW on {s_w, s_t, sigma} (lr_w = lr_a = 5e-4, lr_sigma = 1e-2, weight decay
1e-5, grad-norm clip 2.0), loss mean(1 - cos) of the mixer output along the hidden dimension,
inputs of block l taken from the already-quantized blocks 0..l-1, FP target from the FP chain.

Scope: only the linear layers (in_proj, x_proj(_b), dt_proj(_b), out_proj); the selective scan,
conv1d, norms, patch embed and head stay in floating point, as in the official code.
Deviation: the official code runs 100 epochs on one batch of 256 images; here steps and images come
from the recipe (`calib.steps`, `calib.batch_size`) so a CPU run stays in budget.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ouro.recipes import ActFormat, CalibConfig, FloatFormat, Method, PTQ4VMParams, Recipe, WeightFormat

from ..quant.base import MethodSpec, QuantizedMixerOps, QuantMode, Quantizer, Site, register_method
from ..quant.qdq import asym_act_qdq, weight_dq
from ..quantizers import fake_quant_asym, fake_quant_sym, qmax
from .common import EPS_SCALE

__all__ = [
    "PTQ4VMParams",
    "smooth_scale_init",
    "pts_init",
    "weight_scale_init",
    "lp_error",
    "PTSQuant",
    "SmoothedWeightQuant",
    "PTQ4VM_SPEC",
]

SIGMA_ACT_MIN = 1e-3
SIGMA_W_MIN = 1e-5
SIGMA_MIN = 1e-5
LR_SIGMA = 1e-2
"""AdamW learning rate of the smoothing scales sigma (official Vim setting; lr_w = lr_a come from calib)."""


def lp_error(a: Tensor, b: Tensor, p: float, dim) -> Tensor:
    return (a - b).abs().pow(p).mean(dim=dim)


def smooth_scale_init(act_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """SmoothQuant sigma (K,) from the per-input-channel activation absmax (K,) and W (N, K)."""
    if act_absmax.shape[-1] != weight.shape[1]:
        raise ValueError(f"activation absmax has {act_absmax.shape[-1]} channels, weight has K={weight.shape[1]}")
    a = act_absmax.float().clamp(min=SIGMA_ACT_MIN)
    w = weight.detach().float().abs().amax(dim=0).clamp(min=SIGMA_W_MIN)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=SIGMA_MIN)


def pts_init(x: Tensor, bits: int, p: float = 2.4, grid_points: int = 100) -> tuple[Tensor, Tensor]:
    """Per-token static asymmetric (scale, zero), each (1, L, 1), for x (B, L, C) (already smoothed).

    Candidate i in 1..grid_points moves min and max toward each other by alpha = i/grid_points;
    the per-token L_p error over (B, C) picks the best; the final range is widened to contain 0."""
    if x.dim() != 3:
        raise ValueError(f"PTS init needs x of shape (B, L, C), got {tuple(x.shape)}")
    xt = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)  # (L, B*C)
    xmin, xmax = xt.amin(1), xt.amax(1)
    qhi = 2**bits - 1
    best = torch.full_like(xmin, float("inf"))
    bmin, bmax = xmin.clone(), xmax.clone()
    for i in range(1, grid_points + 1):
        a = i / grid_points
        tmin = xmin * (1 - a) + xmax * a
        tmax = xmin * a + xmax * (1 - a)
        s = torch.clamp((tmax - tmin) / qhi, min=EPS_SCALE)
        z = torch.round(-tmin / s)
        xq = (torch.clamp(torch.round(xt / s[:, None]) + z[:, None], 0, qhi) - z[:, None]) * s[:, None]
        score = lp_error(xt, xq, p, dim=1)
        better = score < best
        bmin = torch.where(better, tmin, bmin)
        bmax = torch.where(better, tmax, bmax)
        best = torch.minimum(best, score)
    lo, hi = torch.clamp(bmin, max=0.0), torch.clamp(bmax, min=0.0)
    s = torch.clamp((hi - lo) / qhi, min=EPS_SCALE)
    z = torch.clamp(-torch.round(lo / s), 0, qhi)
    return s.reshape(1, -1, 1), z.reshape(1, -1, 1)


def weight_scale_init(w: Tensor, bits: int, p: float = 2.4, grid_points: int = 100) -> Tensor:
    """Per-output-channel symmetric scale (N, 1) for w (N, K): candidates i/grid_points * absmax, L_p."""
    wf = w.detach().float()
    q = qmax(bits)
    rng = wf.abs().amax(1)
    best = torch.full_like(rng, float("inf"))
    bmax = rng.clone()
    for i in range(1, grid_points + 1):
        m = rng * (i / grid_points)
        s = torch.clamp(m / q, min=EPS_SCALE)[:, None]
        score = lp_error(wf, torch.clamp(torch.round(wf / s), -q, q) * s, p, dim=1)
        bmax = torch.where(score < best, m, bmax)
        best = torch.minimum(best, score)
    return torch.clamp(bmax / q, min=EPS_SCALE)[:, None]


def _params(recipe: Recipe) -> PTQ4VMParams:
    p = recipe.method_params
    return p if isinstance(p, PTQ4VMParams) else PTQ4VMParams()


class PTSQuant(Quantizer):
    """Input quantizer of one linear layer: smoothing sigma (K,) and PTS scale / zero (1, L, 1).

    quantize(x) = s_t * (clamp(round((x / sigma) / s_t) + z_t, 0, 2**b - 1) - z_t).
    `init_from_stats` also initialises the paired `SmoothedWeightQuant` (it needs sigma), whose
    weight the quantized linear binds while observing."""

    group = "act"

    def __init__(self, fmt: ActFormat, L: int, K: int, alpha: float) -> None:
        super().__init__(fmt)
        self.bits, self.alpha = fmt.bits, alpha
        self.sigma = nn.Parameter(torch.ones(K))
        self.scale = nn.Parameter(torch.ones(1, L, 1))
        self.register_buffer("zero", torch.zeros(1, L, 1))
        self._bound: tuple = (None, None)  # (layer weight, paired weight quantizer); a tuple, so neither is registered

    def bind(self, weight: Tensor, partner: "SmoothedWeightQuant | None") -> None:
        self._bound = (weight, partner)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"act": [self.scale], "sigma": [self.sigma]}

    def init_from_stats(self, calib: CalibConfig) -> None:
        x = self.observed()
        weight, partner = self._bound
        if weight is None:
            raise RuntimeError("PTSQuant needs the layer weight (bound by the PTQ4VM linear while observing)")
        if x.shape[1] != self.scale.shape[1]:
            raise ValueError(f"PTQ4VM per-token scales are sized for L={self.scale.shape[1]} tokens, calibration input has L={x.shape[1]}")
        w = weight.detach().float()
        sigma = smooth_scale_init(x.abs().reshape(-1, x.shape[-1]).amax(0), w, self.alpha)
        s_t, z_t = pts_init(x / sigma, self.bits, calib.lp_norm, calib.grid_points)
        with torch.no_grad():
            self.sigma.copy_(sigma)
            self.scale.copy_(s_t)
            self.zero.copy_(z_t)
        if partner is not None:
            partner.init_from_weight(w * sigma, calib)

    def project_(self) -> None:
        with torch.no_grad():
            self.sigma.clamp_(min=SIGMA_MIN)
            self.scale.clamp_(min=EPS_SCALE)

    def quantize(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.scale.shape[1]:
            raise ValueError(f"PTQ4VM per-token scales are sized for L={self.scale.shape[1]} tokens, input has L={x.shape[1]}")
        return fake_quant_asym(x.float() / self.sigma, self.scale, self.zero, self.bits)

    def export(self, x: Tensor) -> Tensor:
        return asym_act_qdq(x, self.scale, self.zero, self.node_name, self.format, sigma=self.sigma)


class SmoothedWeightQuant(Quantizer):
    """Per-output-channel symmetric quantizer of W * sigma: s_w (N, 1), L_p grid-search init
    (done by the paired PTSQuant, since it needs sigma)."""

    group = "weight"

    def __init__(self, fmt: WeightFormat, out_features: int) -> None:
        super().__init__(fmt)
        self.bits = fmt.bits
        self.scale = nn.Parameter(torch.ones(out_features, 1))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def observe(self, x: Tensor) -> None:  # the weight reaches this quantizer through its PTSQuant
        pass

    def init_from_weight(self, w_smoothed: Tensor, calib: CalibConfig) -> None:
        with torch.no_grad():
            self.scale.copy_(weight_scale_init(w_smoothed, self.bits, calib.lp_norm, calib.grid_points))
            self.initialised.fill_(True)

    def init_from_stats(self, calib: CalibConfig) -> None:
        """Nothing to do here: the paired PTSQuant initialises this quantizer (it owns sigma)."""

    def project_(self) -> None:
        with torch.no_grad():
            self.scale.clamp_(min=EPS_SCALE)

    def quantize(self, x: Tensor) -> Tensor:
        if not bool(self.initialised):
            raise RuntimeError("SmoothedWeightQuant used before its PTSQuant initialised it")
        return fake_quant_sym(x, self.scale, self.bits)

    def export(self, w: Tensor) -> Tensor:
        """DequantizeLinear of the int8 codes of W * sigma (w is that product)."""
        return weight_dq(w, self.format, self.node_name, self.scale)


def _ptq4vm_linear(ops: QuantizedMixerOps, name: str, module: nn.Linear, x: Tensor) -> Tensor:
    """PTS(x / sigma) @ Q_w(W * sigma)^T + b in QUANT mode; the FP linear (while observing) otherwise."""
    qa = ops.act[name] if name in ops.act else None
    qw = ops.weight[name] if name in ops.weight else None
    if qa is None:
        raise ValueError(f"PTQ4VM quantizes a linear layer's input and weight together; {name!r} has no input quantizer")
    if qa.mode not in (QuantMode.QUANT, QuantMode.EXPORT):
        if qa.mode is QuantMode.OBSERVE:
            qa.bind(module.weight, qw)
        return F.linear(qa(x), module.weight, module.bias)
    w = module.weight.float() * qa.sigma
    return F.linear(qa(x), qw(w) if qw is not None else w, None if module.bias is None else module.bias.float())


def _make_act(site: Site, recipe: Recipe) -> Quantizer | None:
    fmt = recipe.formats.linear_act
    return None if isinstance(fmt, FloatFormat) else PTSQuant(fmt, site.shape[0], site.shape[1], _params(recipe).alpha)


def _make_weight(site: Site, recipe: Recipe) -> Quantizer | None:
    fmt = recipe.formats.linear_weight
    return None if isinstance(fmt, FloatFormat) else SmoothedWeightQuant(fmt, site.shape[0])


def _make_ssm(site: Site, recipe: Recipe) -> None:
    """PTQ4VM quantizes only the linear layers: every scan operand stays in floating point."""
    return None


def _lr(group: str, calib: CalibConfig) -> float:
    if group == "sigma":
        return LR_SIGMA
    return calib.lr_weight if group == "weight" else calib.lr_act


PTQ4VM_SPEC = register_method(
    Method.PTQ4VM,
    MethodSpec(
        make_act=_make_act,
        make_weight=_make_weight,
        make_ssm=_make_ssm,
        linear=_ptq4vm_linear,
        lr=_lr,
        info=lambda module, recipe: {"method": "ptq4vm", "alpha": _params(recipe).alpha, "lr_sigma": LR_SIGMA, "quantized": "linear layers only"},
        description="PTQ4VM: per-token static asymmetric activations, SmoothQuant sigma, per-channel weights, JLSS (cosine)",
    ),
)
