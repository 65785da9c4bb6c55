"""VMamba (VSSM with SS2D blocks), written to the official state_dict format.

Official code: MzeroMiko/VMamba `classification/models/vmamba.py` (class `VSSM`). The released
ImageNet-1k classifiers (`classification/configs/vssm/*.yaml`, the models both papers quantize):

    arch          config                    official name      depths        dims            ssm_ratio  top-1
    vmamba_tiny   vmambav2v_tiny_224.yaml   vssm1_tiny_0230s   (2, 2, 8, 2)  96 .. 768       1.0        82.6
    vmamba_small  vmambav2_small_224.yaml   vssm1_small_0229   (2, 2, 15, 2) 96 .. 768       2.0        83.6
    vmamba_base   vmambav2_base_224.yaml    vssm1_base_0229    (2, 2, 15, 2) 128 .. 1024     2.0        83.9

All three: patch 4, PATCHEMBED v2, DOWNSAMPLE v3, NORM_LAYER ln2d, SSM_FORWARDTYPE "v05_noz",
SSM_D_STATE 1, SSM_DT_RANK auto (ceil(dim / 16) per stage), SSM_CONV 3, SSM_CONV_BIAS false,
MLP_RATIO 4 (GELU), dims doubling per stage, 224 x 224 input (grids 56, 28, 14, 7).

The network (channel-last (B, H, W, C) between the convolutions; every LayerNorm is over C):
    patch_embed  v2: Conv(3x3, stride p/2, pad 1) -> LN -> GELU -> Conv(3x3, stride p/2, pad 1) -> LN
                 v1: Conv(p x p, stride p) -> LN
    stage i      blocks: x = x + SS2D(LN(x));  x = x + MLP(LN(x))   (MLP: fc1 -> GELU -> fc2; absent if mlp_ratio 0)
                 downsample (not after the last stage)
                     v3: Conv(3x3, stride 2, pad 1) -> LN;  v2: Conv(2x2, stride 2) -> LN
                     v1: PatchMerging (2x2 neighbours concatenated, LN(4C), Linear 4C -> 2C)
    classifier   LN -> global average pool -> Linear
`norm_layer` ln2d (LayerNorm2d, channel-first) and ln (channel-last) have the same keys and the same
arithmetic, so the config has no field for it; bn (BatchNorm2d) is not supported.

SS2D, forward types v0 / v2 / v3 / v01..v05 ("cross2d" scan, LayerNorm out norm; `_noz` = no gate):
    x, z   = in_proj(x)                      (z only with the gate)
    u      = SiLU(depthwise Conv2d(x))       d_inner channels, kernel d_conv, pad (d_conv - 1) / 2
    y_k    = selective scan of u along direction k (table below), with per-direction parameters
             x_proj_weight[k] (dt_rank + 2 d_state, d_inner), dt_projs_weight[k] / dt_projs_bias[k],
             A = -exp(A_logs[k*D:(k+1)*D]), Ds[k*D:(k+1)*D]                      (D = d_inner)
    y      = (y_0 + y_2) + (y_1 + y_3)       each put back on the row-major grid (cross merge)
    out    = out_proj(LN_out(y) * SiLU(z))   (no "* SiLU(z)" with _noz)
Other forward types (unidi/bidi/cascade2d scans, out-norm variants, _oact, _nozact, xv*, m0) and
the optional x_proj_bias / pos_embed are not implemented; `infer_vmamba_config` refuses the ones
the keys reveal. The scan mode is not visible in the keys: a state_dict is read as cross2d.

The four directions (official index k, `DIRECTIONS[k]`), on the H x W grid with row-major token
index t = h*W + w:
    k  name      token order                    scan
    0  row_fwd   row-major (t = h*W + w)        t = 0 .. L-1
    1  col_fwd   column-major (j = w*H + h)     j = 0 .. L-1
    2  row_bwd   row-major                      reverse=True (the official flip of direction 0)
    3  col_bwd   column-major                   reverse=True (the official flip of direction 1)
Design decision, as in Vim: tensors are never flipped. Each direction's `ScanInputs` is laid out in
its token order (a view of the conv output for row-major, one transposed copy of u shared by the two
column-major directions), and the reversed directions run the same operands with the scan's
`reverse=True`. `direction_order(name, H, W)` is the permutation from a direction's layout to the
row-major tokens, for per-token tables (quantization scales, Gen's 2-D neighbourhoods).

Every linear layer of a block and every scan go through the mixer's `self.ops` (a `MixerOps`), so
quantization, ONNX export and OuroMamba-Gen can swap them without touching this arithmetic. Linear
names (inputs are token-major (B, L, in)):
    in_proj, out_proj                      SS2D
    x_proj_0 .. x_proj_3                   direction k's slice of the official x_proj_weight (no bias)
    dt_proj_0 .. dt_proj_3                 direction k's dt_projs_weight[k] with bias dt_projs_bias[k]
    fc1, fc2                               the block's MLP (called through the same mixer's ops)
x_proj_k / dt_proj_k are `StackedLinear` views (`.weight`, `.bias`, `.in_features`, `.out_features`
like nn.Linear) of the official stacked Parameters, so the official keys are kept and each direction
is a separately quantizable linear. The scan directions are the names of `DIRECTIONS`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..families.base import CheckpointError
from ..scan import ScanInputs, selective_scan
from .vim import MixerOps
from .keys import state_dict_mismatch

__all__ = [
    "VMambaConfig",
    "VMAMBA_ARCHS",
    "ScanDirection",
    "DIRECTIONS",
    "direction_order",
    "StackedLinear",
    "SS2D",
    "VSSBlock",
    "VSSM",
    "VMambaStateDictError",
    "build_vmamba",
    "infer_vmamba_config",
    "load_vmamba_state_dict",
]

PATCH_EMBEDS = ("v1", "v2")
DOWNSAMPLES = ("v1", "v2", "v3")
K_DIRECTIONS = 4


@dataclass(frozen=True)
class VMambaConfig:
    """Architecture of a VSSM classifier (module doc). Defaults: the released VMamba-T.

    dt_rank None is the official "auto" (ceil(dim / 16) in each stage); gate False is the `_noz`
    forward type; mlp_ratio 0 removes the MLP branch; img_size is the input the model is built for
    (the network itself is convolutional: no key depends on it)."""

    depths: tuple[int, ...] = (2, 2, 8, 2)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    d_state: int = 1
    ssm_ratio: float = 1.0
    dt_rank: int | None = None
    d_conv: int = 3
    conv_bias: bool = False
    gate: bool = False
    mlp_ratio: float = 4.0
    patch_embed: str = "v2"
    downsample: str = "v3"
    norm_eps: float = 1e-5
    name: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))  # lists from JSON cards
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if not self.depths or len(self.depths) != len(self.dims):
            raise ValueError(f"VMambaConfig: depths {self.depths} and dims {self.dims} must be non-empty and of equal length")
        if min(self.depths) < 1 or min(self.dims) < 1:
            raise ValueError(f"VMambaConfig: every stage needs depth >= 1 and dim >= 1, got depths {self.depths}, dims {self.dims}")
        for k in ("img_size", "patch_size", "in_chans", "num_classes", "d_state"):
            if getattr(self, k) < 1:
                raise ValueError(f"VMambaConfig.{k} must be >= 1, got {getattr(self, k)}")
        if self.dt_rank is not None and self.dt_rank < 1:
            raise ValueError(f"VMambaConfig.dt_rank must be >= 1 or None (auto), got {self.dt_rank}")
        if self.ssm_ratio <= 0 or min(self.d_inner(i) for i in range(self.num_stages)) < 1:
            raise ValueError(f"VMambaConfig.ssm_ratio {self.ssm_ratio} gives no SSM channels (the SSM branch is required)")
        if self.mlp_ratio < 0:
            raise ValueError(f"VMambaConfig.mlp_ratio must be >= 0, got {self.mlp_ratio}")
        if self.d_conv < 3 or self.d_conv % 2 == 0:
            raise ValueError(f"VMambaConfig.d_conv must be odd and >= 3 (a 'same' depthwise conv), got {self.d_conv}")
        if self.patch_embed not in PATCH_EMBEDS:
            raise ValueError(f"VMambaConfig.patch_embed must be one of {PATCH_EMBEDS}, got {self.patch_embed!r}")
        if self.downsample not in DOWNSAMPLES:
            raise ValueError(f"VMambaConfig.downsample must be one of {DOWNSAMPLES}, got {self.downsample!r}")
        if self.patch_embed == "v2" and (self.patch_size < 2 or self.patch_size % 2):
            raise ValueError(f"patch embed v2 (two convs of stride patch/2) needs an even patch_size >= 2, got {self.patch_size}")
        if self.norm_eps <= 0:
            raise ValueError(f"VMambaConfig.norm_eps must be > 0, got {self.norm_eps}")
        if self.patch_size > self.img_size:
            raise ValueError(f"patch_size {self.patch_size} exceeds img_size {self.img_size}")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def d_inner(self, stage: int) -> int:
        return int(self.ssm_ratio * self.dims[stage])

    def dt_rank_of(self, stage: int) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.dims[stage] / 16)

    def mlp_hidden(self, stage: int) -> int:
        return int(self.dims[stage] * self.mlp_ratio)

    @property
    def forward_type(self) -> str:
        return "v05" if self.gate else "v05_noz"

    @property
    def grids(self) -> tuple[int, ...]:
        """Side of the (square) token grid in each stage for an img_size input (56, 28, 14, 7 at 224)."""
        if self.patch_embed == "v2":  # two convs: kernel s + 1, stride s, pad 1
            s, g = self.patch_size // 2, self.img_size
            for _ in range(2):
                g = (g + 2 - (s + 1)) // s + 1
        else:
            g = self.img_size // self.patch_size
        out = [g]
        for _ in range(self.num_stages - 1):
            g = {"v1": (g + 1) // 2, "v2": g // 2, "v3": (g - 1) // 2 + 1}[self.downsample]
            out.append(g)
        return tuple(out)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depths"], d["dims"] = list(self.depths), list(self.dims)
        return d


def _released(name: str, depths: tuple[int, ...], dim: int, ssm_ratio: float) -> VMambaConfig:
    return VMambaConfig(depths=depths, dims=tuple(dim * 2**i for i in range(4)), ssm_ratio=ssm_ratio, d_state=1,
                        conv_bias=False, gate=False, mlp_ratio=4.0, patch_embed="v2", downsample="v3", name=name)


VMAMBA_ARCHS: dict[str, VMambaConfig] = {
    "vmamba_tiny": _released("vssm1_tiny_0230s", (2, 2, 8, 2), 96, 1.0),  # vmambav2v_tiny_224.yaml
    "vmamba_small": _released("vssm1_small_0229", (2, 2, 15, 2), 96, 2.0),  # vmambav2_small_224.yaml
    "vmamba_base": _released("vssm1_base_0229", (2, 2, 15, 2), 128, 2.0),  # vmambav2_base_224.yaml
}


# ------------------------------------------------------------------------------ directions
class ScanDirection(NamedTuple):
    k: int  # official index into the stacked K = 4 parameters
    name: str
    order: str  # "row" | "col": the token layout of this direction's ScanInputs
    reverse: bool  # the scan runs from the last token of that layout to the first


DIRECTIONS: tuple[ScanDirection, ...] = (
    ScanDirection(0, "row_fwd", "row", False),
    ScanDirection(1, "col_fwd", "col", False),
    ScanDirection(2, "row_bwd", "row", True),
    ScanDirection(3, "col_bwd", "col", True),
)
DIRECTION_BY_NAME = {d.name: d for d in DIRECTIONS}


def direction_order(direction: str, H: int, W: int) -> Tensor:
    """perm (L,) with perm[j] = row-major token index (h*W + w) of position j in the layout of
    `direction`'s ScanInputs. Scan step i visits position j = i, or L-1-i when the direction is reversed."""
    d = DIRECTION_BY_NAME.get(direction)
    if d is None:
        raise ValueError(f"unknown VMamba scan direction {direction!r}; known: {', '.join(DIRECTION_BY_NAME)}")
    idx = torch.arange(H * W, device="cpu")  # index metadata
    return idx if d.order == "row" else idx.view(H, W).t().reshape(-1)


# ------------------------------------------------------------------------------ modules
class StackedLinear:
    """Direction k's linear inside the official stacked Parameters (not a module: no keys of its own).

    `.weight` is `owner.<weight>[k]` and `.bias` `owner.<bias>[k]` (or None), looked up on every access,
    so they are views of the official Parameters (gradients and in-place edits reach them)."""

    def __init__(self, owner: nn.Module, weight: str, bias: str | None, k: int) -> None:
        self._owner, self._weight, self._bias, self.k = owner, weight, bias, k

    @property
    def weight(self) -> Tensor:
        return getattr(self._owner, self._weight)[self.k]

    @property
    def bias(self) -> Tensor | None:
        return None if self._bias is None else getattr(self._owner, self._bias)[self.k]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __repr__(self) -> str:
        b = f", bias={self._bias}[{self.k}]" if self._bias else ""
        return f"StackedLinear({self._weight}[{self.k}]{b}, in={self.in_features}, out={self.out_features})"


def _linear(ops: MixerOps, name: str, module, x: Tensor) -> Tensor:
    if ops.linear is not None:
        return ops.linear(name, module, x)
    return F.linear(x, module.weight, module.bias)


def _dt_init_(weight: Tensor, bias: Tensor, dt_rank: int) -> None:
    """Official dt init: weight U(+-dt_rank^-0.5); bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1]."""
    with torch.no_grad():
        nn.init.uniform_(weight, -dt_rank**-0.5, dt_rank**-0.5)
        dt = torch.exp(torch.rand(bias.shape) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class SS2D(nn.Module):
    """The 2-D selective-scan mixer (module doc); official parameter names. Input/output (B, H, W, C)."""

    def __init__(self, cfg: VMambaConfig, stage: int) -> None:
        super().__init__()
        dim, di, R, N, K = cfg.dims[stage], cfg.d_inner(stage), cfg.dt_rank_of(stage), cfg.d_state, K_DIRECTIONS
        self.d_model, self.d_inner, self.dt_rank, self.d_state, self.gate = dim, di, R, N, cfg.gate
        # registration order as the official __initv2__ (out_norm first)
        self.out_norm = nn.LayerNorm(di, eps=cfg.norm_eps)
        self.in_proj = nn.Linear(dim, 2 * di if cfg.gate else di, bias=False)
        self.conv2d = nn.Conv2d(di, di, cfg.d_conv, padding=(cfg.d_conv - 1) // 2, groups=di, bias=cfg.conv_bias)
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, di))
        self.out_proj = nn.Linear(di, dim, bias=False)
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(K * di, 1))
        self.Ds = nn.Parameter(torch.ones(K * di))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, di, R))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, di))
        self.x_proj = tuple(StackedLinear(self, "x_proj_weight", None, k) for k in range(K))
        self.dt_proj = tuple(StackedLinear(self, "dt_projs_weight", "dt_projs_bias", k) for k in range(K))
        self.ops = MixerOps()
        with torch.no_grad():
            bound = di**-0.5  # nn.Linear's default init, as the official stacked nn.Linear weights
            nn.init.uniform_(self.x_proj_weight, -bound, bound)
            for k in range(K):
                _dt_init_(self.dt_projs_weight[k], self.dt_projs_bias[k], R)

    def linears(self) -> dict[str, object]:
        """Every linear of the mixer by its ops name (module doc)."""
        out: dict[str, object] = {"in_proj": self.in_proj}
        out.update({f"x_proj_{k}": m for k, m in enumerate(self.x_proj)})
        out.update({f"dt_proj_{k}": m for k, m in enumerate(self.dt_proj)})
        out["out_proj"] = self.out_proj
        return out

    def _scan(self, d: ScanDirection, inputs: ScanInputs) -> Tensor:
        if self.ops.scan is not None:
            return self.ops.scan(d.name, inputs)
        return selective_scan(*inputs, delta_softplus=True, reverse=d.reverse)

    def ssm_inputs(self, u: Tensor, k: int) -> ScanInputs:
        """Everything direction k's scan consumes; u (B, L, d_inner) already in that direction's token order."""
        K, D, N = K_DIRECTIONS, self.d_inner, self.d_state
        x_dbl = _linear(self.ops, f"x_proj_{k}", self.x_proj[k], u)
        dt_low, Bm, Cm = torch.split(x_dbl, [self.dt_rank, N, N], dim=-1)
        delta = _linear(self.ops, f"dt_proj_{k}", self.dt_proj[k], dt_low)  # bias included, softplus in the scan
        A = -torch.exp(self.A_logs.view(K, D, N)[k].float())
        Dskip = self.Ds.view(K, D)[k].float()
        return ScanInputs(u=u, delta=delta, A=A, Bm=Bm, Cm=Cm, Dskip=Dskip, z=None)

    def cross_scan_merge(self, u: Tensor) -> Tensor:
        """The four directional scans of u (B, D, H, W) and their merge, returned row-major (B, L, D)."""
        H, W = u.shape[2:]
        # row: a view when u is channels_last (the conv of a permuted channel-last tensor is); col: one copy.
        # The batch size is never read from a shape: an ONNX export keeps its batch axis dynamic.
        layouts = {"row": u.permute(0, 2, 3, 1).flatten(1, 2), "col": u.permute(0, 3, 2, 1).flatten(1, 2)}
        acc: dict[str, Tensor] = {}
        for d in DIRECTIONS:  # k order: row_fwd, col_fwd, then + row_bwd, + col_bwd (the official sums)
            y = self._scan(d, self.ssm_inputs(layouts[d.order], d.k))
            acc[d.order] = y if d.order not in acc else acc[d.order] + y
        y = acc["row"].unflatten(1, (H, W)) + acc["col"].unflatten(1, (W, H)).transpose(1, 2)  # transposed read, no copy
        return y.flatten(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[1:3]
        xz = _linear(self.ops, "in_proj", self.in_proj, x.flatten(1, 2))
        xs, z = xz.chunk(2, dim=-1) if self.gate else (xz, None)
        u = F.silu(self.conv2d(xs.unflatten(1, (H, W)).permute(0, 3, 1, 2)))
        y = F.layer_norm(self.cross_scan_merge(u), (self.d_inner,), self.out_norm.weight, self.out_norm.bias, self.out_norm.eps)
        if z is not None:
            y = y * F.silu(z)
        return _linear(self.ops, "out_proj", self.out_proj, y).unflatten(1, (H, W))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2; its linears go through the block's mixer ops (names fc1, fc2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, ops: MixerOps) -> Tensor:
        H, W = x.shape[1:3]
        h = F.gelu(_linear(ops, "fc1", self.fc1, x.flatten(1, 2)))
        return _linear(ops, "fc2", self.fc2, h).unflatten(1, (H, W))


class VSSBlock(nn.Module):
    """Pre-norm residual block: x + SS2D(LN(x)), then x + MLP(LN(x)). (B, H, W, C) in and out."""

    def __init__(self, cfg: VMambaConfig, stage: int) -> None:
        super().__init__()
        dim = cfg.dims[stage]
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.op = SS2D(cfg, stage)
        if cfg.mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
            self.mlp = Mlp(dim, cfg.mlp_hidden(stage))
        else:
            self.norm2 = self.mlp = None

    def linears(self) -> dict[str, object]:
        out = self.op.linears()
        if self.mlp is not None:
            out.update(fc1=self.mlp.fc1, fc2=self.mlp.fc2)
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.op(self.norm(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x), self.op.ops)
        return x


class PatchEmbed(nn.Sequential):
    """Official nn.Sequential layout (keys `patch_embed.{0,2,5,7}` for v2, `{0,2}` for v1; the other
    slots are the official Identity/Permute/GELU). (B, C, H, W) -> channel-last (B, H', W', E)."""

    def __init__(self, cfg: VMambaConfig) -> None:
        E, C, p, eps = cfg.dims[0], cfg.in_chans, cfg.patch_size, cfg.norm_eps
        if cfg.patch_embed == "v2":
            s = p // 2
            super().__init__(nn.Conv2d(C, E // 2, s + 1, stride=s, padding=1), nn.Identity(), nn.LayerNorm(E // 2, eps=eps),
                             nn.Identity(), nn.GELU(), nn.Conv2d(E // 2, E, s + 1, stride=s, padding=1), nn.Identity(),
                             nn.LayerNorm(E, eps=eps))
        else:
            super().__init__(nn.Conv2d(C, E, p, stride=p), nn.Identity(), nn.LayerNorm(E, eps=eps))

    def forward(self, x: Tensor) -> Tensor:
        x = self[2](self[0](x).permute(0, 2, 3, 1))
        if len(self) == 3:
            return x
        x = F.gelu(x).permute(0, 3, 1, 2)
        return self[7](self[5](x).permute(0, 2, 3, 1))


class ConvDownsample(nn.Sequential):
    """Downsample v2 (2x2 conv, stride 2) / v3 (3x3 conv, stride 2, pad 1), then LN; keys `1.*`, `3.*`.
    Channel-last in and out."""

    def __init__(self, dim: int, out_dim: int, version: str, eps: float) -> None:
        conv = nn.Conv2d(dim, out_dim, 2, stride=2) if version == "v2" else nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        super().__init__(nn.Identity(), conv, nn.Identity(), nn.LayerNorm(out_dim, eps=eps))

    def forward(self, x: Tensor) -> Tensor:
        return self[3](self[1](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class PatchMerging2D(nn.Module):
    """Downsample v1: pad H, W to even, concatenate the 2x2 neighbours [(0,0), (1,0), (0,1), (1,1)]
    (row, col offsets) along channels, LN(4C), Linear(4C -> out) without bias. Channel-last."""

    def __init__(self, dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class VSSLayer(nn.Module):
    """One stage: `blocks`, then `downsample` (nn.Identity after the last stage, as the official)."""

    def __init__(self, cfg: VMambaConfig, stage: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(VSSBlock(cfg, stage) for _ in range(cfg.depths[stage]))
        if stage == cfg.num_stages - 1:
            self.downsample = nn.Identity()
        elif cfg.downsample == "v1":
            self.downsample = PatchMerging2D(cfg.dims[stage], cfg.dims[stage + 1], cfg.norm_eps)
        else:
            self.downsample = ConvDownsample(cfg.dims[stage], cfg.dims[stage + 1], cfg.downsample, cfg.norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class Classifier(nn.Module):
    """LN -> global average pool -> head (official `classifier.norm`, `classifier.head`)."""

    def __init__(self, cfg: VMambaConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dims[-1], eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dims[-1], cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x).mean(dim=(1, 2)))


class VSSM(nn.Module):
    """VMamba classifier (module doc). forward: (B, in_chans, img, img) -> logits (B, num_classes)."""

    def __init__(self, cfg: VMambaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.layers = nn.ModuleList(VSSLayer(cfg, i) for i in range(cfg.num_stages))
        self.classifier = Classifier(cfg)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official VSSM._init_weights (nn.Linear: trunc_normal 0.02, bias 0; LayerNorm: 1, 0); the
        stacked SS2D parameters, convs and the dt/A/D init are set where they are created."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def blocks(self) -> Iterator[VSSBlock]:
        for layer in self.layers:
            yield from layer.blocks

    def mixers(self) -> list[SS2D]:
        """The SS2D mixers in execution order (one MixerOps each)."""
        return [blk.op for blk in self.blocks()]

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        c = self.cfg
        if x.dim() != 4 or x.shape[1] != c.in_chans or x.shape[-1] != c.img_size or x.shape[-2] != c.img_size:
            raise ValueError(f"expected images of shape (B, {c.in_chans}, {c.img_size}, {c.img_size}), got {tuple(x.shape)}")
        return self.classifier(self.forward_features(x))


def build_vmamba(arch: str | VMambaConfig, **overrides) -> VSSM:
    """A randomly initialised VSSM (official init) from a VMAMBA_ARCHS name or a VMambaConfig."""
    if isinstance(arch, str):
        if arch not in VMAMBA_ARCHS:
            raise ValueError(f"unknown VMamba architecture {arch!r}; known: {', '.join(VMAMBA_ARCHS)}")
        arch = VMAMBA_ARCHS[arch]
    if overrides:
        arch = VMambaConfig(**{**arch.to_dict(), **overrides})
    return VSSM(arch)


# ------------------------------------------------------------------------------ state_dict
class VMambaStateDictError(CheckpointError):
    """A state_dict that is not a (supported) VMamba, or does not match the requested architecture."""


_BLOCK_RE = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")
REQUIRED = ("patch_embed.0.weight", "layers.0.blocks.0.norm.weight", "layers.0.blocks.0.op.in_proj.weight",
            "layers.0.blocks.0.op.A_logs", "layers.0.blocks.0.op.x_proj_weight", "layers.0.blocks.0.op.dt_projs_weight",
            "classifier.head.weight")


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


def _ratio(name: str, pairs: list[tuple[int, int]], size) -> float:
    """The one ratio r with size(r, dim) == n for every stage's (n, dim); else a clear error."""
    n0, d0 = pairs[0]
    r = n0 / d0
    bad = [(i, n, d) for i, (n, d) in enumerate(pairs) if size(r, d) != n]
    if bad:
        raise VMambaStateDictError(f"inconsistent {name} across stages: stage 0 gives {n0}/{d0} = {r:g}, but "
                                   + ", ".join(f"stage {i} has {n} for dim {d}" for i, n, d in bad))
    return r


def infer_vmamba_config(state_dict: Mapping[str, Tensor], *, img_size: int | None = None) -> VMambaConfig:
    """The VMambaConfig an official VSSM state_dict was built with, from its key shapes:

        in_chans, dims[0], patch, patch embed  patch_embed.0.weight, patch_embed.5.weight (v2 only)
        depths, dims                           layers.{i}.blocks.{j}.*, layers.{i}.blocks.0.norm.weight
        downsample                             layers.0.downsample.{1.weight (v2: 2x2, v3: 3x3) | reduction.weight (v1)}
        d_inner, d_state                       op.A_logs (4 * d_inner, d_state); ssm_ratio = d_inner / dim
        gate                                   op.in_proj.weight rows: 2 * d_inner (gate) or d_inner (noz)
        dt_rank                                op.dt_projs_weight (4, d_inner, R): None (auto) when R = ceil(dim/16)
        d_conv, conv_bias                      op.conv2d.weight (d_inner, 1, k, k), op.conv2d.bias present
        mlp_ratio                              mlp.fc1.weight (hidden, dim); 0 without an MLP
        num_classes                            classifier.head.weight
    img_size is not in the keys (no position embedding): the hint, else 224. Every other key and shape is
    then checked by `load_vmamba_state_dict` against the model built from this config."""
    sd = state_dict
    missing = [k for k in REQUIRED if k not in sd]
    if missing:
        hint = " (it looks like a Vim checkpoint)" if "layers.0.mixer.A_log" in sd else ""
        old = " (old VMamba key names: self_attention/ln_1, renamed by the official loader, are not supported)" \
            if any(".self_attention." in k for k in sd) else ""
        raise VMambaStateDictError(f"not a VMamba (VSSM) state_dict{hint}{old}: missing keys {missing} "
                                   f"(it has {len(sd)} keys, e.g. {', '.join(list(sd)[:5])})")
    unsupported = {"running_mean": "BatchNorm norm layers ('bn')", "x_proj_bias": "x_proj_bias",
                   "pos_embed": "a position embedding (posembed=True)"}
    for frag, what in unsupported.items():
        hit = [k for k in sd if frag in k]
        if hit:
            raise VMambaStateDictError(f"VMamba with {what} is not supported (key {hit[0]})")
    blocks = sorted({(int(m.group(1)), int(m.group(2))) for k in sd if (m := _BLOCK_RE.match(k))})
    n_stages = max(i for i, _ in blocks) + 1
    depths = []
    for i in range(n_stages):
        js = {j for s, j in blocks if s == i}
        if not js or js != set(range(max(js) + 1)):
            raise VMambaStateDictError(f"stage {i}: blocks are not numbered 0..n-1 (found {sorted(js)})")
        depths.append(len(js))

    def op(i: int, name: str) -> str:
        return f"layers.{i}.blocks.0.op.{name}"

    for i in range(n_stages):
        if op(i, "out_norm.weight") not in sd:
            raise VMambaStateDictError(f"stage {i}: no {op(i, 'out_norm.weight')}; only the LayerNorm out norm is supported "
                                       "(forward types with _onnone/_onsoftmax/_onsigmoid/_ondwconv3/_oncnorm are not)")
        if op(i, "conv2d.weight") not in sd:
            raise VMambaStateDictError(f"stage {i}: no depthwise conv {op(i, 'conv2d.weight')} (ssm_conv < 2 is not supported)")
    dims = [_shape(sd, f"layers.{i}.blocks.0.norm.weight")[0] for i in range(n_stages)]
    d_state = _shape(sd, op(0, "A_logs"))[1]
    d_inners = []
    for i in range(n_stages):
        kd, n = _shape(sd, op(i, "A_logs"))
        if kd % K_DIRECTIONS or n != d_state:
            raise VMambaStateDictError(f"{op(i, 'A_logs')} {(kd, n)}: expected (4 * d_inner, {d_state}) (four scan directions)")
        d_inners.append(kd // K_DIRECTIONS)
    ssm_ratio = _ratio("ssm_ratio (d_inner / dim)", list(zip(d_inners, dims)), lambda r, d: int(r * d))
    rows = _shape(sd, op(0, "in_proj.weight"))[0]
    if rows not in (d_inners[0], 2 * d_inners[0]):
        raise VMambaStateDictError(f"{op(0, 'in_proj.weight')} has {rows} rows: expected d_inner {d_inners[0]} (noz) or 2 * d_inner (gate)")
    ranks = [_shape(sd, op(i, "dt_projs_weight"))[-1] for i in range(n_stages)]
    if all(r == math.ceil(d / 16) for r, d in zip(ranks, dims)):
        dt_rank = None
    elif len(set(ranks)) == 1:
        dt_rank = ranks[0]
    else:
        raise VMambaStateDictError(f"dt ranks {ranks} per stage are neither 'auto' (ceil(dim/16) = "
                                   f"{[math.ceil(d / 16) for d in dims]}) nor one fixed value")
    k = _shape(sd, op(0, "conv2d.weight"))[-1]
    fc1 = [f"layers.{i}.blocks.0.mlp.fc1.weight" for i in range(n_stages)]
    if all(f in sd for f in fc1):
        mlp_ratio = _ratio("mlp_ratio (fc1 rows / dim)", [(_shape(sd, f)[0], d) for f, d in zip(fc1, dims)], lambda r, d: int(d * r))
    elif any(f in sd for f in fc1):
        raise VMambaStateDictError(f"some stages have an MLP and others not ({[f for f in fc1 if f not in sd]} missing)")
    else:
        mlp_ratio = 0.0
    E, C, kh, kw = _shape(sd, "patch_embed.0.weight")
    if kh != kw:
        raise VMambaStateDictError(f"patch_embed.0.weight {(E, C, kh, kw)}: only square kernels are supported")
    if "patch_embed.5.weight" in sd:
        patch_embed, patch = "v2", 2 * (kh - 1)
    else:
        patch_embed, patch = "v1", kh
    if n_stages == 1:
        downsample = "v3"
    elif "layers.0.downsample.reduction.weight" in sd:
        downsample = "v1"
    elif "layers.0.downsample.1.weight" in sd:
        dk = _shape(sd, "layers.0.downsample.1.weight")[-1]
        if dk not in (2, 3):
            raise VMambaStateDictError(f"layers.0.downsample.1.weight has a {dk}x{dk} kernel: expected 2 (v2) or 3 (v3)")
        downsample = "v2" if dk == 2 else "v3"
    else:
        raise VMambaStateDictError("no downsample layer after stage 0 (layers.0.downsample.*): downsample 'none' is not supported")
    try:
        cfg = VMambaConfig(depths=tuple(depths), dims=tuple(dims), img_size=img_size or 224, patch_size=patch, in_chans=C,
                           num_classes=_shape(sd, "classifier.head.weight")[0], d_state=d_state, ssm_ratio=ssm_ratio,
                           dt_rank=dt_rank, d_conv=k, conv_bias=op(0, "conv2d.bias") in sd, gate=rows == 2 * d_inners[0],
                           mlp_ratio=mlp_ratio, patch_embed=patch_embed, downsample=downsample)
    except ValueError as e:
        raise VMambaStateDictError(f"inferred an invalid VMamba architecture: {e}") from None
    return _named(cfg)


def _named(cfg: VMambaConfig) -> VMambaConfig:
    """An inferred config gets the released name when it is one of VMAMBA_ARCHS (at its img_size)."""
    for arch in VMAMBA_ARCHS.values():
        if VMambaConfig(**{**arch.to_dict(), "name": cfg.name, "img_size": cfg.img_size}) == cfg:
            return VMambaConfig(**{**arch.to_dict(), "img_size": cfg.img_size})
    return cfg


def _check_keys(model: VSSM, sd: Mapping[str, Tensor], source: str) -> None:
    bad = state_dict_mismatch(model, sd, label=source)
    if bad:
        c = model.cfg
        raise VMambaStateDictError(f"{source} does not match VMamba architecture {c.name} (depths {list(c.depths)}, "
                                   f"dims {list(c.dims)}, d_state {c.d_state}, ssm_ratio {c.ssm_ratio:g}, "
                                   f"forward type {c.forward_type}): " + bad)


def load_vmamba_state_dict(sd: Mapping[str, Tensor], arch: str | VMambaConfig | None = None, *,
                           img_size: int | None = None, source: str = "state_dict",
                           device: torch.device | str | None = None) -> VSSM:
    """Build the VSSM for `sd` (inferred, or `arch`: a VMAMBA_ARCHS name or a config) on `device` (default
    the CPU) and load it with strict=True, in eval mode. Any key or shape mismatch is a
    VMambaStateDictError (a CheckpointError) naming them."""
    if arch is None:
        try:
            cfg = infer_vmamba_config(sd, img_size=img_size)
        except VMambaStateDictError as e:
            raise VMambaStateDictError(f"{source}: {e}") from None
    elif isinstance(arch, str):
        if arch not in VMAMBA_ARCHS:
            raise VMambaStateDictError(f"unknown VMamba architecture {arch!r}; known: {', '.join(VMAMBA_ARCHS)}")
        cfg = VMAMBA_ARCHS[arch]
    else:
        cfg = arch
    if img_size is not None and cfg.img_size != img_size:
        cfg = VMambaConfig(**{**cfg.to_dict(), "img_size": img_size})
    with torch.device("meta"):  # check keys and shapes before paying for a real model
        _check_keys(VSSM(cfg), sd, source)
    with torch.device(device or "cpu"):
        model = VSSM(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()
