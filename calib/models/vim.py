"""Vision Mamba (Vim, bimamba v2, middle CLS token), written to the official state_dict format.

Official architectures (hustvl/Vim `models_mamba.py`):
    vim_{tiny,small,base}_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2
with rms_norm, residual_in_fp32, fused_add_norm, if_abs_pos_embed, use_middle_cls_token,
if_devide_out (the two directions are averaged), head on the CLS token.

Design decision: tensors are never flipped. The backward direction is computed on the original
token order with an anti-causal depthwise conv (kernel reversed, padded on the right) and a reverse
scan; this is the same function as the official flip -> causal -> scan -> flip, and it keeps every
per-token table (quantization scales, outlier windows) indexed by the original token position.

Every linear layer and the scan are called through `self.ops` (a `MixerOps`), so quantization,
ONNX export and OuroMamba-Gen swap them without touching this file's arithmetic.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..scan import ScanInputs, selective_scan

__all__ = ["VimConfig", "ARCHS", "VisionMamba", "MambaMixer", "Block", "RMSNorm", "build_model", "MixerOps", "override_ops"]

OFFICIAL_NAME = "vim_{size}_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"


@dataclass(frozen=True)
class VimConfig:
    """Architecture of a Vim model; everything else is derived."""

    embed_dim: int = 192
    depth: int = 24
    img_size: int = 224
    patch_size: int = 16
    stride: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    norm_eps: float = 1e-5
    name: str = "custom"

    def __post_init__(self) -> None:
        for k in ("embed_dim", "depth", "img_size", "patch_size", "stride", "in_chans", "num_classes", "d_state", "d_conv", "expand"):
            if getattr(self, k) < 1:
                raise ValueError(f"VimConfig.{k} must be >= 1, got {getattr(self, k)}")
        if self.patch_size > self.img_size:
            raise ValueError(f"patch_size {self.patch_size} exceeds img_size {self.img_size}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.embed_dim / 16)

    @property
    def grid(self) -> int:
        return (self.img_size - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        return self.num_patches + 1

    @property
    def cls_position(self) -> int:
        """Index of the middle CLS token in the token sequence (98 for 14x14 patches)."""
        return self.num_patches // 2

    def to_dict(self) -> dict:
        return asdict(self)


def _official(size: str, dim: int) -> VimConfig:
    return VimConfig(embed_dim=dim, depth=24, name=OFFICIAL_NAME.format(size=size))


ARCHS: dict[str, VimConfig] = {
    "vim_tiny": _official("tiny", 192),
    "vim_small": _official("small", 384),
    "vim_base": _official("base", 768),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


@dataclass
class MixerOps:
    """The replaceable operations of a mixer. Default: plain FP linear and the dispatching scan.

    linear(name, module, x) -> y   with name in {in_proj, x_proj, x_proj_b, dt_proj, dt_proj_b, out_proj}
    scan(direction, inputs) -> y   with direction "fwd" | "bwd" and inputs a `ScanInputs`
    """

    linear: object = field(default=None)
    scan: object = field(default=None)


@contextmanager
def override_ops(model: nn.Module, make: Callable[[int, "MambaMixer"], dict]) -> Iterator[None]:
    """Temporarily replace fields of every mixer's `MixerOps`; restore the previous ops on exit.

    `make(layer_index, mixer)` returns the fields to replace, e.g. {"scan": hook}; it sees the
    mixer's current ops, so hooks can wrap what is already installed."""
    saved = [(blk.mixer, blk.mixer.ops) for blk in model.layers]
    try:
        for i, (mixer, ops) in enumerate(saved):
            mixer.ops = replace(ops, **make(i, mixer))
        yield
    finally:
        for mixer, ops in saved:
            mixer.ops = ops


class MambaMixer(nn.Module):
    """Bimamba-v2 mixer with separate backward parameters; parameter names are the official ones."""

    def __init__(self, cfg: VimConfig) -> None:
        super().__init__()
        d, di, s, r = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.cfg = cfg
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1, bias=True)
        self.x_proj = nn.Linear(di, r + 2 * s, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        a = torch.arange(1, s + 1, dtype=torch.float32).repeat(di, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(di))
        self.conv1d_b = nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1, bias=True)
        self.x_proj_b = nn.Linear(di, r + 2 * s, bias=False)
        self.dt_proj_b = nn.Linear(r, di, bias=True)
        self.A_b_log = nn.Parameter(torch.log(a.clone()))
        self.D_b = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=False)
        self.ops = MixerOps()

    # -- hooks -----------------------------------------------------------------------------
    def _linear(self, name: str, x: Tensor) -> Tensor:
        mod = getattr(self, name)
        if self.ops.linear is not None:
            return self.ops.linear(name, mod, x)
        return F.linear(x, mod.weight, mod.bias)

    def _scan(self, direction: str, inputs: ScanInputs) -> Tensor:
        if self.ops.scan is not None:
            return self.ops.scan(direction, inputs)
        return selective_scan(*inputs, delta_softplus=True, reverse=direction == "bwd")

    # -- arithmetic ------------------------------------------------------------------------
    def conv(self, x: Tensor, direction: str) -> Tensor:
        """Depthwise conv + SiLU on (B, L, D): causal for fwd, anti-causal (reversed kernel) for bwd."""
        conv = self.conv1d if direction == "fwd" else self.conv1d_b
        k = conv.weight.shape[-1]
        xt = x.transpose(1, 2)
        if direction == "fwd":
            y = F.conv1d(F.pad(xt, (k - 1, 0)), conv.weight, conv.bias, groups=xt.shape[1])
        else:
            y = F.conv1d(F.pad(xt, (0, k - 1)), conv.weight.flip(-1), conv.bias, groups=xt.shape[1])
        return F.silu(y).transpose(1, 2)

    def ssm_inputs(self, x: Tensor, z: Tensor, direction: str) -> ScanInputs:
        """Everything the selective scan of one direction consumes, token-major."""
        sfx = "" if direction == "fwd" else "_b"
        cfg = self.cfg
        u = self.conv(x, direction)
        x_dbl = self._linear("x_proj" + sfx, u)
        dt_low, Bm, Cm = torch.split(x_dbl, [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        delta = self._linear("dt_proj" + sfx, dt_low)  # bias included, softplus in the scan
        A = -torch.exp(getattr(self, "A_log" if direction == "fwd" else "A_b_log").float())
        Dskip = getattr(self, "D" + sfx).float()
        return ScanInputs(u=u, delta=delta, A=A, Bm=Bm, Cm=Cm, Dskip=Dskip, z=z)

    def forward(self, hidden: Tensor) -> Tensor:
        xz = self._linear("in_proj", hidden)
        x, z = xz.chunk(2, dim=-1)
        y_f = self._scan("fwd", self.ssm_inputs(x, z, "fwd"))
        y_b = self._scan("bwd", self.ssm_inputs(x, z, "bwd"))
        return self._linear("out_proj", (y_f + y_b) / 2)


class Block(nn.Module):
    """Fused add + RMSNorm (residual kept in fp32), then the mixer. Returns (mixer_out, residual)."""

    def __init__(self, cfg: VimConfig) -> None:
        super().__init__()
        self.mixer = MambaMixer(cfg)
        self.norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)

    def forward(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        residual = hidden.float() if residual is None else residual + hidden.float()
        return self.mixer(self.norm(residual)), residual


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VimConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionMamba(nn.Module):
    def __init__(self, cfg: VimConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.embed_dim))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_f = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        cfg = self.cfg
        for blk in self.layers:
            m = blk.mixer
            for dt in (m.dt_proj, m.dt_proj_b):  # official dt init: dt in [1e-3, 1e-1], inverse softplus bias
                nn.init.uniform_(dt.weight, -cfg.dt_rank**-0.5, cfg.dt_rank**-0.5)
                v = torch.exp(torch.rand(cfg.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
                with torch.no_grad():
                    dt.bias.copy_(v + torch.log(-torch.expm1(-v)))

    def embed(self, x: Tensor) -> Tensor:
        """Patch embed, middle CLS token, absolute position embedding: (B, L, d_model)."""
        t = self.patch_embed(x)
        pos = self.cfg.cls_position
        cls = self.cls_token.expand(t.shape[0], -1, -1)
        t = torch.cat([t[:, :pos], cls, t[:, pos:]], dim=1)
        return t + self.pos_embed

    def forward_features(self, x: Tensor) -> Tensor:
        hidden, residual = self.embed(x), None
        for blk in self.layers:
            hidden, residual = blk(hidden, residual)
        residual = residual + hidden.float()
        return self.norm_f(residual)[:, self.cfg.cls_position]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.cfg.in_chans or x.shape[-1] != self.cfg.img_size or x.shape[-2] != self.cfg.img_size:
            raise ValueError(
                f"expected images of shape (B, {self.cfg.in_chans}, {self.cfg.img_size}, {self.cfg.img_size}), got {tuple(x.shape)}"
            )
        return self.head(self.forward_features(x))


def build_model(arch: str | VimConfig, **overrides) -> VisionMamba:
    """Build a randomly initialised Vim from an architecture name in ARCHS or a VimConfig."""
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
        cfg = ARCHS[arch]
    else:
        cfg = arch
    if overrides:
        cfg = VimConfig(**{**cfg.to_dict(), **overrides})
    return VisionMamba(cfg)
