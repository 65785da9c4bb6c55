"""MambaVision (hybrid Mamba-Transformer), written to the official state_dict format.

Official architectures (NVlabs/MambaVision `mambavision/models/mamba_vision.py`, released files
`mambavision_{tiny,tiny2,small,base}_1k.pth.tar`):

    arch            official name      dim  in_dim  depths         heads         windows       layer scale
    mambavision_t   mamba_vision_T      80    32    (1, 3, 8, 4)   (2, 4, 8, 16) (8, 8, 14, 7) -
    mambavision_t2  mamba_vision_T2     80    32    (1, 3, 11, 4)  (2, 4, 8, 16) (8, 8, 14, 7) -
    mambavision_s   mamba_vision_S      96    64    (3, 3, 7, 5)   (2, 4, 8, 16) (8, 8, 14, 7) -
    mambavision_b   mamba_vision_B     128    64    (3, 3, 10, 5)  (2, 4, 8, 16) (8, 8, 14, 7) 1e-5 (hybrid blocks)

all with mlp_ratio 4, qkv bias, 224x224 input, and the mixer's fixed d_state 8, d_conv 3, expand 1.

Layout (stage i has dim * 2**i channels; the stem and each downsample halve H and W, rounding up):

    patch_embed.conv_down   conv3x3/2 (in_dim) + BN(eps 1e-4) + ReLU, conv3x3/2 (dim) + BN(eps 1e-4) + ReLU
    levels.0, levels.1      ConvBlocks: conv3x3 + BN + GELU(tanh) + conv3x3 + BN (+ gamma), residual
    levels.2, levels.3      hybrid: the feature map is zero-padded (right/bottom) to a multiple of the
                            stage's window, cut into windows of window**2 tokens (row-major inside a
                            window), and every block runs on each window as a sequence. The first
                            ceil(depth/2) blocks mix with MambaVisionMixer, the rest with multi-head
                            self-attention; each block is
                                x = x + gamma_1 * mixer(LN(x));  x = x + gamma_2 * MLP(LN(x))
                            (gamma only with layer scale), then windows are merged and the padding cut.
    levels.{0,1,2}.downsample   conv3x3/2, no bias, channels x2
    norm, head              BatchNorm2d over the last stage, global average pool, Linear

The mixer, as the official code writes it (d_inner = expand * dim, split in two halves of di = d_inner/2):

    x, z  = in_proj(h).chunk(2)                 (no bias)
    u     = silu(depthwise conv1d_x(x))         padding 'same' (non-causal), no conv bias
    zc    = silu(depthwise conv1d_z(z))         the z half is a symmetric branch, not a gate
    dt, B, C = x_proj(u).split(dt_rank, d_state, d_state)
    delta = dt_proj(dt) + dt_proj.bias          dt_proj's own bias AND the scan's delta_bias (the same
                                                tensor): the official code adds that bias twice
    y     = selective_scan(u, delta, A=-exp(A_log), B, C, D), softplus on delta, unidirectional
    out   = out_proj(concat([y, zc]))

Every linear layer, the scan and the attention's two matmuls are called through `self.ops`
(a `HybridOps`, the counterpart of Vim's `MixerOps`), so quantization, ONNX export and OuroMamba-Gen
swap them without touching this file's arithmetic. The modules that hold ops (`op_modules`) are
each hybrid block's `mixer` (MambaVisionMixer or Attention) and its `mlp`.
"""
from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..scan import ScanInputs, selective_scan
from .keys import state_dict_mismatch

__all__ = [
    "MambaVisionConfig",
    "ARCHS",
    "HybridOps",
    "MambaVision",
    "MambaVisionMixer",
    "Attention",
    "Mlp",
    "HybridBlock",
    "ConvBlock",
    "build_model",
    "override_ops",
    "op_modules",
    "infer_config",
    "resolve_arch",
    "load_mambavision_state_dict",
    "load_mambavision",
]

NUM_STAGES = 4
CONV_STAGES = (0, 1)
STEM_BN_EPS = 1e-4
BN_EPS = 1e-5
LN_EPS = 1e-5


def _tuple4(name: str, v) -> tuple[int, ...]:
    t = tuple(int(x) for x in v)
    if len(t) != NUM_STAGES:
        raise ValueError(f"MambaVisionConfig.{name} needs {NUM_STAGES} entries (one per stage), got {t}")
    if min(t) < 1:
        raise ValueError(f"MambaVisionConfig.{name} entries must be >= 1, got {t}")
    return t


@dataclass(frozen=True)
class MambaVisionConfig:
    """Architecture of a MambaVision model; everything else is derived. `layer_scale` /
    `layer_scale_conv` None means no gamma parameters (their value only initialises them)."""

    dim: int = 80
    in_dim: int = 32
    depths: tuple[int, ...] = (1, 3, 8, 4)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    window_size: tuple[int, ...] = (8, 8, 14, 7)
    mlp_ratio: float = 4.0
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    qkv_bias: bool = True
    layer_scale: float | None = None
    layer_scale_conv: float | None = None
    d_state: int = 8
    d_conv: int = 3
    expand: int = 1
    name: str = "custom"

    def __post_init__(self) -> None:
        for k in ("depths", "num_heads", "window_size"):
            object.__setattr__(self, k, _tuple4(k, getattr(self, k)))
        for k in ("dim", "in_dim", "img_size", "in_chans", "num_classes", "d_state", "d_conv", "expand"):
            if getattr(self, k) < 1:
                raise ValueError(f"MambaVisionConfig.{k} must be >= 1, got {getattr(self, k)}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"MambaVisionConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        for i in self.hybrid_stages:
            d = self.stage_dim(i)
            if d % self.num_heads[i]:
                raise ValueError(f"stage {i}: dim {d} is not divisible by num_heads {self.num_heads[i]}")
            if (self.expand * d) % 2:
                raise ValueError(f"stage {i}: d_inner {self.expand * d} must be even (the mixer splits it into x and z halves)")
            if self.mlp_hidden(i) < 1:
                raise ValueError(f"stage {i}: mlp hidden size int({d} * {self.mlp_ratio}) < 1")

    # -- derived -------------------------------------------------------------------------
    @property
    def hybrid_stages(self) -> tuple[int, ...]:
        return tuple(i for i in range(NUM_STAGES) if i not in CONV_STAGES)

    def stage_dim(self, i: int) -> int:
        return self.dim * 2**i

    @property
    def num_features(self) -> int:
        return self.stage_dim(NUM_STAGES - 1)

    def mlp_hidden(self, i: int) -> int:
        return int(self.stage_dim(i) * self.mlp_ratio)

    def d_inner(self, i: int) -> int:
        return self.expand * self.stage_dim(i)

    def dt_rank(self, i: int) -> int:
        return math.ceil(self.stage_dim(i) / 16)

    def num_mixers(self, i: int) -> int:
        """Blocks of hybrid stage i that use the Mamba mixer: the first ceil(depth/2); the rest attend."""
        return (self.depths[i] + 1) // 2

    def is_attention(self, i: int, j: int) -> bool:
        return j >= self.num_mixers(i)

    def resolution(self, i: int) -> int:
        """H (= W) of the feature map entering stage i: the stem halves twice, each stage once (ceil)."""
        r = self.img_size
        for _ in range(2 + i):
            r = -(-r // 2)
        return r

    def padded_resolution(self, i: int) -> int:
        w = self.window_size[i]
        return -(-self.resolution(i) // w) * w

    def num_windows(self, i: int) -> int:
        """Windows per image in hybrid stage i (each is one sequence for the mixer and the attention)."""
        return (self.padded_resolution(i) // self.window_size[i]) ** 2

    def seq_len(self, i: int) -> int:
        """Tokens of one window of stage i: the scan length and the attention length."""
        return self.window_size[i] ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def _official(name: str, dim: int, in_dim: int, depths, layer_scale: float | None = None) -> MambaVisionConfig:
    return MambaVisionConfig(dim=dim, in_dim=in_dim, depths=depths, layer_scale=layer_scale, name=name)


ARCHS: dict[str, MambaVisionConfig] = {
    "mambavision_t": _official("mamba_vision_T", 80, 32, (1, 3, 8, 4)),
    "mambavision_t2": _official("mamba_vision_T2", 80, 32, (1, 3, 11, 4)),
    "mambavision_s": _official("mamba_vision_S", 96, 64, (3, 3, 7, 5)),
    "mambavision_b": _official("mamba_vision_B", 128, 64, (3, 3, 10, 5), layer_scale=1e-5),
}
RELEASED_FILES = {
    "mambavision_t": "mambavision_tiny_1k.pth.tar",
    "mambavision_t2": "mambavision_tiny2_1k.pth.tar",
    "mambavision_s": "mambavision_small_1k.pth.tar",
    "mambavision_b": "mambavision_base_1k.pth.tar",
}


# ------------------------------------------------------------------------------------- hooks
@dataclass
class HybridOps:
    """The replaceable operations of a hybrid block's mixer, attention or MLP. Default (None):
    plain FP linear, the dispatching selective scan, torch.matmul. Sequences are windows: B below
    is batch * windows, L = N = window**2 tokens (the module's `seq_len`).

    linear(name, module, x) -> y   name in {in_proj, x_proj, dt_proj, out_proj} (MambaVisionMixer),
                                   {qkv, proj} (Attention), {fc1, fc2} (Mlp); y includes the bias
    scan(direction, inputs) -> y   direction "fwd" only (the mixer is unidirectional), inputs a
                                   `ScanInputs` with z=None; y is (B, L, di) fp32
    matmul(name, a, b) -> a @ b    "qk": a = q (B, h, N, hd), b = k^T (B, h, hd, N), before the
                                   1/sqrt(hd) scale; "av": a = softmax probabilities (B, h, N, N), b = v
    """

    linear: object = field(default=None)
    scan: object = field(default=None)
    matmul: object = field(default=None)


class _Hooked(nn.Module):
    """A module whose linears (and scan / matmuls) go through `self.ops`. `stage` and `seq_len`
    (tokens of one window: the scan / attention length) size per-token quantizer tables."""

    def __init__(self, cfg: MambaVisionConfig, stage: int) -> None:
        super().__init__()
        self.stage = stage
        self.seq_len = cfg.seq_len(stage)
        self.ops = HybridOps()

    def _linear(self, name: str, x: Tensor) -> Tensor:
        mod = getattr(self, name)
        if self.ops.linear is not None:
            return self.ops.linear(name, mod, x)
        return F.linear(x, mod.weight, mod.bias)


def op_modules(model: "MambaVision") -> list[tuple[str, _Hooked]]:
    """(qualified name, module) of every module that holds `ops`, in forward order:
    levels.{2,3}.blocks.{j}.mixer and levels.{2,3}.blocks.{j}.mlp."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _Hooked)]


@contextmanager
def override_ops(model: "MambaVision", make: Callable[[str, _Hooked], dict]) -> Iterator[None]:
    """Temporarily replace fields of every op module's `HybridOps`; restore the previous ops on exit.

    `make(qualified_name, module)` returns the fields to replace, e.g. {"matmul": hook}; it sees the
    module's current ops, so hooks can wrap what is already installed."""
    saved = [(name, m, m.ops) for name, m in op_modules(model)]
    try:
        for name, m, ops in saved:
            m.ops = replace(ops, **make(name, m))
        yield
    finally:
        for _, m, ops in saved:
            m.ops = ops


# ------------------------------------------------------------------------------ conv stages
class PatchEmbed(nn.Module):
    """The convolutional stem (official `conv_down`, indices 0..5): two stride-2 3x3 convs."""

    def __init__(self, cfg: MambaVisionConfig) -> None:
        super().__init__()
        self.conv_down = nn.Sequential(
            nn.Conv2d(cfg.in_chans, cfg.in_dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(cfg.in_dim, eps=STEM_BN_EPS),
            nn.ReLU(),
            nn.Conv2d(cfg.in_dim, cfg.dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(cfg.dim, eps=STEM_BN_EPS),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_down(x)


class ConvBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = nn.BatchNorm2d(dim, eps=BN_EPS)
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm2 = nn.BatchNorm2d(dim, eps=BN_EPS)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm2(self.conv2(F.gelu(self.norm1(self.conv1(x)), approximate="tanh")))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + y


class Downsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(x)


# ---------------------------------------------------------------------------- hybrid stages
class MambaVisionMixer(_Hooked):
    """Official parameter names; token-major (B, L, dim) in and out."""

    def __init__(self, cfg: MambaVisionConfig, stage: int) -> None:
        super().__init__(cfg, stage)
        d, di, s, r = cfg.stage_dim(stage), cfg.d_inner(stage) // 2, cfg.d_state, cfg.dt_rank(stage)
        self.d_scan, self.d_state, self.dt_rank, self.d_conv = di, s, r, cfg.d_conv  # d_scan: the x half, scanned
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.x_proj = nn.Linear(di, r + 2 * s, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, s + 1, dtype=torch.float32).repeat(di, 1)))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(2 * di, d, bias=False)
        # official: Conv1d(..., bias=conv_bias // 2) with conv_bias=True, i.e. no bias
        self.conv1d_x = nn.Conv1d(di, di, cfg.d_conv, groups=di, bias=False)
        self.conv1d_z = nn.Conv1d(di, di, cfg.d_conv, groups=di, bias=False)

    def conv(self, x: Tensor, conv: nn.Conv1d) -> Tensor:
        """silu(depthwise conv) on (B, L, di) with 'same' padding: (k-1)//2 left, the rest right."""
        k = conv.weight.shape[-1]
        left = (k - 1) // 2
        xt = F.pad(x.transpose(1, 2), (left, k - 1 - left))
        return F.silu(F.conv1d(xt, conv.weight, None, groups=xt.shape[1])).transpose(1, 2)

    def ssm_inputs(self, u: Tensor) -> ScanInputs:
        """What the selective scan consumes, token-major; delta is pre-softplus with the dt bias added
        (a second time, on top of dt_proj's own bias, as the official delta_bias)."""
        dt_low, Bm, Cm = torch.split(self._linear("x_proj", u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self._linear("dt_proj", dt_low) + self.dt_proj.bias
        A = -torch.exp(self.A_log.float())
        return ScanInputs(u=u, delta=delta, A=A, Bm=Bm, Cm=Cm, Dskip=self.D.float(), z=None)

    def _scan(self, inputs: ScanInputs) -> Tensor:
        if self.ops.scan is not None:
            return self.ops.scan("fwd", inputs)
        return selective_scan(*inputs, delta_softplus=True)

    def forward(self, h: Tensor) -> Tensor:
        x, z = self._linear("in_proj", h).chunk(2, dim=-1)
        u = self.conv(x, self.conv1d_x)
        y = self._scan(self.ssm_inputs(u))
        return self._linear("out_proj", torch.cat([y.to(u.dtype), self.conv(z, self.conv1d_z)], dim=-1))


class Attention(_Hooked):
    """Multi-head self-attention over one window's tokens (timm-style qkv layout, no qk norm)."""

    def __init__(self, cfg: MambaVisionConfig, stage: int) -> None:
        super().__init__(cfg, stage)
        d = cfg.stage_dim(stage)
        self.num_heads = cfg.num_heads[stage]
        self.head_dim = d // self.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)

    def _matmul(self, name: str, a: Tensor, b: Tensor) -> Tensor:
        if self.ops.matmul is not None:
            return self.ops.matmul(name, a, b)
        return torch.matmul(a, b)

    def forward(self, x: Tensor) -> Tensor:
        Bw, N, C = x.shape
        q, k, v = self._linear("qkv", x).reshape(Bw, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (self._matmul("qk", q, k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = self._matmul("av", attn, v)
        return self._linear("proj", out.transpose(1, 2).reshape(Bw, N, C))


class Mlp(_Hooked):
    def __init__(self, cfg: MambaVisionConfig, stage: int) -> None:
        super().__init__(cfg, stage)
        d, hidden = cfg.stage_dim(stage), cfg.mlp_hidden(stage)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        return self._linear("fc2", F.gelu(self._linear("fc1", x)))


class HybridBlock(nn.Module):
    """The official `Block`: pre-norm mixer (Mamba or attention) and MLP, each with optional layer scale."""

    def __init__(self, cfg: MambaVisionConfig, stage: int, index: int) -> None:
        super().__init__()
        d = cfg.stage_dim(stage)
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.mixer = Attention(cfg, stage) if cfg.is_attention(stage, index) else MambaVisionMixer(cfg, stage)
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.mlp = Mlp(cfg, stage)
        ls = cfg.layer_scale
        self.gamma_1 = nn.Parameter(ls * torch.ones(d)) if ls is not None else None
        self.gamma_2 = nn.Parameter(ls * torch.ones(d)) if ls is not None else None

    @staticmethod
    def _scaled(y: Tensor, gamma: Tensor | None) -> Tensor:
        return y if gamma is None else gamma * y

    def forward(self, x: Tensor) -> Tensor:
        x = x + self._scaled(self.mixer(self.norm1(x)), self.gamma_1)
        return x + self._scaled(self.mlp(self.norm2(x)), self.gamma_2)


def to_windows(x: Tensor, w: int) -> Tensor:
    """(B, C, H, W) with H, W multiples of w -> (B * nH * nW, w*w, C); windows in (b, row, col)
    order, tokens row-major inside a window."""
    B, C, H, W = x.shape
    t = x.reshape(B, C, H // w, w, W // w, w).permute(0, 2, 4, 3, 5, 1)
    return t.reshape(B * (H // w) * (W // w), w * w, C)


def from_windows(t: Tensor, w: int, H: int, W: int) -> Tensor:
    """The inverse of `to_windows`: (B * nH * nW, w*w, C) -> (B, C, H, W)."""
    C = t.shape[-1]
    B = t.shape[0] // ((H // w) * (W // w))
    x = t.reshape(B, H // w, W // w, w, w, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, H, W)


class MambaVisionLayer(nn.Module):
    """One stage (`levels.i`): ConvBlocks (stages 0, 1) or windowed hybrid blocks, then the downsample."""

    def __init__(self, cfg: MambaVisionConfig, stage: int) -> None:
        super().__init__()
        d = cfg.stage_dim(stage)
        self.hybrid = stage not in CONV_STAGES
        self.window_size = cfg.window_size[stage]
        if self.hybrid:
            self.blocks = nn.ModuleList(HybridBlock(cfg, stage, j) for j in range(cfg.depths[stage]))
        else:
            self.blocks = nn.ModuleList(ConvBlock(d, cfg.layer_scale_conv) for _ in range(cfg.depths[stage]))
        self.downsample = Downsample(d) if stage < NUM_STAGES - 1 else None

    def forward(self, x: Tensor) -> Tensor:
        if self.hybrid:
            H, W = x.shape[-2:]
            w = self.window_size
            xp = F.pad(x, (0, (-W) % w, 0, (-H) % w))  # zeros right/bottom; they take part in scan and attention
            t = to_windows(xp, w)
            for blk in self.blocks:
                t = blk(t)
            x = from_windows(t, w, xp.shape[-2], xp.shape[-1])[:, :, :H, :W]
        else:
            for blk in self.blocks:
                x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class MambaVision(nn.Module):
    def __init__(self, cfg: MambaVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.levels = nn.ModuleList(MambaVisionLayer(cfg, i) for i in range(NUM_STAGES))
        self.norm = nn.BatchNorm2d(cfg.num_features, eps=BN_EPS)
        self.head = nn.Linear(cfg.num_features, cfg.num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official init: every Linear (dt_proj too, so its bias starts at 0) trunc-normal 0.02
        with zero bias; norms 1 / 0; convs keep PyTorch's default."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return self.norm(x).mean(dim=(-2, -1))

    def forward(self, x: Tensor) -> Tensor:
        c = self.cfg
        if x.dim() != 4 or x.shape[1] != c.in_chans or x.shape[-1] != c.img_size or x.shape[-2] != c.img_size:
            raise ValueError(f"expected images of shape (B, {c.in_chans}, {c.img_size}, {c.img_size}), got {tuple(x.shape)}")
        return self.head(self.forward_features(x))


def build_model(arch: str | MambaVisionConfig, **overrides) -> MambaVision:
    """A randomly initialised MambaVision from an ARCHS key, an official name, or a config."""
    cfg = resolve_arch(arch)
    if overrides:
        cfg = MambaVisionConfig(**{**cfg.to_dict(), **overrides})
    return MambaVision(cfg)


# ------------------------------------------------------------------------- checkpoint loading
def _checkpoint_error():
    from ..checkpoint import CheckpointError

    return CheckpointError


def resolve_arch(arch: str | MambaVisionConfig) -> MambaVisionConfig:
    """An ARCHS key (mambavision_t, _t2, _s, _b), an official name (mamba_vision_T, ...) or a config."""
    if isinstance(arch, MambaVisionConfig):
        return arch
    if arch in ARCHS:
        return ARCHS[arch]
    for cfg in ARCHS.values():
        if arch == cfg.name:
            return cfg
    raise _checkpoint_error()(
        f"unknown MambaVision architecture {arch!r}; known: {', '.join(ARCHS)} (or {', '.join(c.name for c in ARCHS.values())})"
    )


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


REQUIRED = ("patch_embed.conv_down.0.weight", "patch_embed.conv_down.3.weight", "levels.0.blocks.0.conv1.weight",
            "levels.2.blocks.0.mixer.A_log", "levels.2.blocks.0.mixer.in_proj.weight",
            "levels.2.blocks.0.mixer.conv1d_x.weight", "levels.2.blocks.0.mlp.fc1.weight", "norm.running_var", "head.weight")


def infer_config(sd: Mapping[str, Tensor], *, num_heads=None, window_size=None, img_size: int | None = None,
                 name_hint: str | None = None) -> MambaVisionConfig:
    """The MambaVisionConfig a state_dict was built with.

    From the shapes: in_chans, in_dim, dim (stem convs), depths (blocks per level), the mixer's
    d_state / d_conv / expand (levels.2.blocks.0.mixer), mlp_ratio (fc1), qkv bias, layer scale
    (gamma / gamma_1 present), num_classes (head). The mixer/attention layout is checked against the
    official rule (first ceil(depth/2) blocks Mamba). Not in the shapes: num_heads, window sizes and
    the input size; they come from the arguments, else from `name_hint` when it names an official
    arch, else the official values (all four released models share them: heads (2, 4, 8, 16),
    windows (8, 8, 14, 7), 224x224)."""
    Err = _checkpoint_error()
    missing = [k for k in REQUIRED if k not in sd]
    if missing:
        raise Err(f"not a MambaVision checkpoint: missing keys {missing} (it has {len(sd)} keys, e.g. {', '.join(list(sd)[:5])})")
    in_dim, in_chans = _shape(sd, "patch_embed.conv_down.0.weight")[:2]
    dim = _shape(sd, "patch_embed.conv_down.3.weight")[0]
    depths = []
    for i in range(NUM_STAGES):
        ids = {int(m.group(1)) for k in sd if (m := re.match(rf"levels\.{i}\.blocks\.(\d+)\.", k))}
        if not ids:
            raise Err(f"not a 4-stage MambaVision: no blocks in levels.{i}")
        if ids != set(range(max(ids) + 1)):
            raise Err(f"levels.{i} blocks are not numbered 0..{max(ids)}: missing {sorted(set(range(max(ids) + 1)) - ids)}")
        depths.append(max(ids) + 1)
    m0 = "levels.2.blocks.0.mixer."
    di, d_state = _shape(sd, m0 + "A_log")
    d_inner = _shape(sd, m0 + "in_proj.weight")[0]
    d2 = 4 * dim  # stage 2 width
    if d_inner != 2 * di or d_inner % d2:
        raise Err(f"{m0}in_proj.weight {_shape(sd, m0 + 'in_proj.weight')} / A_log {(di, d_state)}: "
                  f"expected in_proj rows = 2 * A_log rows = expand * {d2} (stage-2 width)")
    hidden = _shape(sd, "levels.2.blocks.0.mlp.fc1.weight")[0]
    hint = None
    if name_hint is not None:
        try:
            hint = resolve_arch(name_hint)
        except Err:
            hint = None
    base = hint or ARCHS["mambavision_t"]
    kw = dict(
        dim=dim, in_dim=in_dim, depths=tuple(depths),
        num_heads=tuple(num_heads) if num_heads is not None else base.num_heads,
        window_size=tuple(window_size) if window_size is not None else base.window_size,
        mlp_ratio=hidden / d2, img_size=img_size or base.img_size, in_chans=in_chans,
        num_classes=_shape(sd, "head.weight")[0],
        qkv_bias=any(re.fullmatch(r"levels\.\d\.blocks\.\d+\.mixer\.qkv\.bias", k) for k in sd),
        layer_scale=(base.layer_scale or 1e-5) if "levels.2.blocks.0.gamma_1" in sd else None,
        layer_scale_conv=1e-5 if "levels.0.blocks.0.gamma" in sd else None,
        d_state=d_state, d_conv=_shape(sd, m0 + "conv1d_x.weight")[-1], expand=d_inner // d2,
    )
    try:
        cfg = MambaVisionConfig(**kw)
    except ValueError as e:
        raise Err(f"inferred an invalid MambaVision architecture: {e}") from None
    bad = []
    for i in cfg.hybrid_stages:
        for j in range(cfg.depths[i]):
            attn = f"levels.{i}.blocks.{j}.mixer.qkv.weight" in sd
            if attn != cfg.is_attention(i, j):
                bad.append(f"levels.{i}.blocks.{j} is {'attention' if attn else 'Mamba'}")
    if bad:
        raise Err("mixer layout is not the official one (first ceil(depth/2) blocks of a hybrid stage Mamba, the rest "
                  "attention): " + "; ".join(bad[:4]))
    for arch in ARCHS.values():
        if MambaVisionConfig(**{**arch.to_dict(), "name": cfg.name}) == cfg:
            return arch
    return cfg


def _check_shapes(model: MambaVision, sd: Mapping[str, Tensor], source: str) -> None:
    bad = state_dict_mismatch(model, sd)
    if bad:
        c = model.cfg
        raise _checkpoint_error()(f"{source} does not match MambaVision architecture {c.name} (dim {c.dim}, in_dim {c.in_dim}, "
                                  f"depths {c.depths}, classes {c.num_classes}): " + bad)


def _read_checkpoint(path: Path) -> tuple[dict[str, Tensor], object]:
    """(state_dict, training args or None) of a MambaVision file, read with weights_only=True.

    Layouts, as the official `_load_checkpoint` takes them: the timm training checkpoint of the
    released `.pth.tar` files ({'state_dict': sd, 'epoch', 'arch', 'version', 'args': Namespace,
    optionally 'optimizer', 'state_dict_ema', ...}), {'model': sd}, or a bare state_dict; a
    'module.' prefix is stripped. 'state_dict_ema' is used only when it is the only model in the file."""
    from ..checkpoint import CheckpointError, read_checkpoint

    obj = read_checkpoint(path)
    args = obj.get("args") if isinstance(obj, Mapping) else None
    sd = obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(obj.get(key), Mapping):
                sd = obj[key]
                break
    if not isinstance(sd, Mapping) or not sd or not any(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no state_dict (a {type(obj).__name__}); expected the released "
                              "{'state_dict': sd, ...}, {'model': sd} or a bare state_dict")
    non_tensor = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if non_tensor:
        raise CheckpointError(f"{path} is not a MambaVision state_dict: non-tensor entries {non_tensor[:5]} "
                              f"(top-level keys: {', '.join(map(str, list(sd)[:8]))})")
    if sd and all(str(k).startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd), args


def load_mambavision_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The model state_dict of a MambaVision checkpoint file (released `.pth.tar` layout or plain),
    read safely (weights_only=True; argparse.Namespace args allowed)."""
    return _read_checkpoint(Path(path))[0]


def _hints(train_args: object) -> tuple[int | None, str | None]:
    """(img_size, model name) from the timm training-args Namespace a checkpoint stores, when it says."""
    if not isinstance(train_args, argparse.Namespace):
        return None, None
    size = getattr(train_args, "input_size", None) or getattr(train_args, "img_size", None)
    img = size[-1] if isinstance(size, (list, tuple)) and size else size
    model = getattr(train_args, "model", None)
    return (int(img) if isinstance(img, int) else None), (model if isinstance(model, str) else None)


def load_mambavision(src: str | Path | Mapping[str, Tensor], arch: str | MambaVisionConfig | None = None, *,
                     img_size: int | None = None) -> MambaVision:
    """A MambaVision in eval mode from a checkpoint file or a state_dict, loaded with strict=True.

    arch None infers the architecture (`infer_config`, using the file's training args for the model
    name and input size when present); an ARCHS key, official name or config overrides it, and a
    mismatch is a CheckpointError naming the keys and shapes."""
    Err = _checkpoint_error()
    if isinstance(src, Mapping):
        sd, args, source = dict(src), None, "state_dict"
    else:
        sd, args = _read_checkpoint(Path(src))
        source = str(src)
    img_hint, name_hint = _hints(args)
    try:
        if arch is None:
            cfg = infer_config(sd, img_size=img_size or img_hint, name_hint=name_hint)
        else:
            cfg = resolve_arch(arch)
            if img_size is not None:
                cfg = replace(cfg, img_size=img_size)
    except Err as e:
        raise Err(f"{source}: {e}") from None
    with torch.device("meta"):  # shapes first: a wrong file fails before any memory is spent
        _check_shapes(MambaVision(cfg), sd, source)
    model = MambaVision(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()
