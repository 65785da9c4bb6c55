"""The MambaVision family (NVlabs `mamba_vision.py`, hybrid Mamba-Transformer): checkpoints, hook points,
units, export, Gen.

Checkpoint files (read safely by ouro.calib.checkpoint): the released `.pth.tar` (timm's training
checkpoint: {'state_dict': sd, 'args': argparse.Namespace, ...}), {'model': sd} or a bare state_dict.
The training args' `model` name and `input_size` / `img_size` are hints for the architecture.
Architecture inference and errors: `ouro.calib.models.mambavision.infer_config`.

Quantization sites (what every method sees). Only the two hybrid stages (levels.2, levels.3) hold
hook points; their sequences are windows (batch x windows on the batch axis, window**2 tokens,
row-major inside a window), so per-token tables (OuroMamba S_I(t), PTQ4VM PTS, theta(t)) index the
position inside the window.
    mixer (MambaVisionMixer)  hook point `levels.{i}.blocks.{j}.mixer`: linears in_proj, x_proj,
                 dt_proj (produces the delta of scan "fwd"), out_proj; one unidirectional scan "fwd"
                 (layout "window", d_inner = the x half, no gate z: 6-input SelectiveScan node, an empty
                 z in the plugin graph), quantized like Vim's (delta, B, C, A, D per the recipe)
    mixer (Attention)  hook point `levels.{i}.blocks.{j}.mixer`: linears qkv and proj at the recipe's
                 formats; matmuls "qk" (q @ k^T) and "av" (softmax @ v): both operands 8-bit symmetric
                 per tensor, min-max, for every method (ouro.calib.quant.matmul); softmax in FP
    mlp          hook point `levels.{i}.blocks.{j}.mlp`: linears fc1, fc2 at the recipe's formats
Not quantized by any method, kept floating point (fp32, or fp16 with --fp16): the convolutional stem,
the two conv stages (ConvBlocks: 3x3 convs + BatchNorm), the downsampling convs, the mixer's depthwise
conv1d_x / conv1d_z, every LayerNorm / BatchNorm, the head. Decision for the conv stages: FP, not
weight-only. The stem and conv stages hold 6-7 % of the T/T2/S/B weights (the downsampling convs
another 6-8 %) but run at the two highest resolutions, where the quantizer contract of this toolchain
has no conv path (the OutlierLinear plugin is a GEMM, the QDQ
graph's weight-only convs would be DequantizeLinear + FP Conv, no speed-up on either target), and the
OuroMamba paper quantizes the Mamba/attention blocks only; VMamba's patch embed and 2-D convs are FP
for the same reason (recipes' EXCLUDED_MODULES).

Calibration units: one per hybrid block (levels.{2,3}.blocks.{j}: x -> x + mixer(LN x) + MLP(LN x),
on windows (B * windows, L, C)); the loss compares the block's residual branches, output - input, as
VMamba's; after stage 2's last block the FP glue (merge windows, cut the padding, downsample, pad,
re-window for stage 3) feeds stage 3. The conv stages before them are FP and run once (the captured
input of the first unit). A unit's minibatches draw windows, not images.

Gen (OuroMamba-Gen, ouro.calib.gen.grid): each window is a w x w patch grid (`gen_layout`: tokens
row-major, zero-padded tokens count as patches); the mixer scan's implicit attention and the attention
blocks' explicit attention (head-averaged softmax rows, neighbourhood-aggregated with uniform weights)
each give a patch-contrastive term per window, averaged over the windows of an image.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.mambavision import (
    ARCHS,
    REQUIRED,
    HybridBlock,
    MambaVision,
    MambaVisionConfig,
    MambaVisionMixer,
    _check_shapes,
    _hints,
    from_windows,
    infer_config,
    to_windows,
)
from .base import (
    CheckpointError,
    DemoSpec,
    GenLayout,
    HookPoint,
    LinearSite,
    MatmulSite,
    ModelFamily,
    ScanSite,
    Unit,
    register_family,
)

__all__ = ["MambaVisionFamily", "MAMBAVISION", "DEMO_CONFIG", "SCAN_DIRECTION", "WINDOW_LAYOUT"]

DEMO_CONFIG = MambaVisionConfig(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(8, 8, 4, 2),
                                img_size=64, num_classes=10, name="mambavision_demo_digits")
"""The MambaVision demo model's architecture (tools/train_demo.py --family mambavision trains it; its card
records it): 64x64 digits, one 4x4 window in stage 2 (16 tokens), one 2x2 window in stage 3 (4 tokens)."""
SCAN_DIRECTION = "fwd"
WINDOW_LAYOUT = "window"
"""The scan's token layout: the tokens of one window, row-major (`models.mambavision.to_windows`)."""


class _StageGlue:
    """The FP glue after hybrid stage i's last block: windows -> image (padding cut) -> downsample ->
    padded, re-windowed for stage i + 1."""

    def __init__(self, model: MambaVision, stage: int) -> None:
        c = model.cfg
        self.layer = model.levels[stage]
        self.w, self.hp, self.h = c.window_size[stage], c.padded_resolution(stage), c.resolution(stage)
        self.w_next = c.window_size[stage + 1]

    def __call__(self, state):
        x = from_windows(state[0], self.w, self.hp, self.hp)[:, :, : self.h, : self.h]
        x = self.layer.downsample(x)
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (-W) % self.w_next, 0, (-H) % self.w_next))
        return (to_windows(x, self.w_next),)


class MambaVisionFamily(ModelFamily):
    name = "mambavision"
    label = "MambaVision"
    order = 2
    config_type = MambaVisionConfig
    model_type = MambaVision
    archs = ARCHS
    safe_globals = (argparse.Namespace,)
    demo = DemoSpec("mambavision_demo.pth", "mambavision_demo.json", DEMO_CONFIG)

    def config_from_dict(self, d: Mapping) -> MambaVisionConfig:
        return MambaVisionConfig(**d)

    def resolve_arch(self, arch: str) -> MambaVisionConfig | None:
        """An ARCHS key (mambavision_t, _t2, _s, _b) or an official name (mamba_vision_T, ...)."""
        if arch in ARCHS:
            return ARCHS[arch]
        return next((c for c in ARCHS.values() if c.name == arch), None)

    def claims(self, sd: Mapping[str, Tensor]) -> bool:
        return all(k in sd for k in REQUIRED)

    def why_not(self, sd: Mapping[str, Tensor]) -> str:
        return f"not a MambaVision state_dict: missing keys {[k for k in REQUIRED if k not in sd]}"

    def file_hints(self, obj: object) -> dict:
        img, model = _hints(obj.get("args") if isinstance(obj, Mapping) else None)
        return {"img_size": img, "model": model}

    def load_state_dict(self, sd, cfg=None, *, source="state_dict", hints=None, img_size=None, device=None) -> MambaVision:
        h = dict(hints or {})
        try:
            if cfg is None:
                cfg = infer_config(sd, img_size=img_size or h.get("img_size"), name_hint=h.get("model"))
            elif img_size is not None:
                cfg = replace(cfg, img_size=img_size)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
        with torch.device("meta"):  # shapes first: a wrong file fails before any memory is spent
            _check_shapes(MambaVision(cfg), sd, source)
        model = self.build(cfg, device)
        model.load_state_dict(sd, strict=True)
        return model.eval()

    # -- quantization
    def hook_points(self, model: MambaVision) -> list[HookPoint]:
        c = model.cfg
        points: list[HookPoint] = []
        unit = 0
        for i in c.hybrid_stages:
            L = c.seq_len(i)
            for j, blk in enumerate(model.levels[i].blocks):
                mixer, base = blk.mixer, f"levels.{i}.blocks.{j}"
                if isinstance(mixer, MambaVisionMixer):
                    linears = (LinearSite("in_proj", "in_proj", mixer.in_proj, L), LinearSite("x_proj", "x_proj", mixer.x_proj, L),
                               LinearSite("dt_proj", "dt_proj", mixer.dt_proj, L, delta_for=SCAN_DIRECTION),
                               LinearSite("out_proj", "out_proj", mixer.out_proj, L))
                    scans = (ScanSite(SCAN_DIRECTION, False, L, mixer.d_scan, mixer.d_state, WINDOW_LAYOUT),)
                    matmuls: tuple[MatmulSite, ...] = ()
                else:
                    linears = (LinearSite("qkv", "qkv", mixer.qkv, L), LinearSite("proj", "proj", mixer.proj, L))
                    scans = ()
                    matmuls = (MatmulSite("qk", L), MatmulSite("av", L, attention=True))
                n = len(points)
                points.append(HookPoint(n, f"{base}.mixer", f"{base}.mixer", mixer, unit, linears, scans, matmuls))
                mlp = blk.mlp
                points.append(HookPoint(n + 1, f"{base}.mlp", f"{base}.mlp", mlp, unit,
                                        (LinearSite("fc1", "fc1", mlp.fc1, L), LinearSite("fc2", "fc2", mlp.fc2, L))))
                unit += 1
        return points

    def units(self, model: MambaVision) -> list[Unit]:
        c = model.cfg
        out = []
        last = c.hybrid_stages[-1]
        for i in c.hybrid_stages:
            blocks = model.levels[i].blocks
            for j, blk in enumerate(blocks):
                post = _StageGlue(model, i) if j == len(blocks) - 1 and i < last else None
                out.append(Unit(f"levels.{i}.blocks.{j}", blk, post))
        return out

    def entry(self, model: MambaVision) -> HybridBlock:
        return model.levels[model.cfg.hybrid_stages[0]].blocks[0]

    def unit_target(self, inputs, outputs) -> Tensor:
        return outputs[0] - inputs[0]  # the block's residual branches (mixer and MLP)

    def unit_stream(self, outputs) -> Tensor:
        return outputs[0]

    def work_numel(self, cfg: MambaVisionConfig) -> int:
        return max(cfg.num_windows(i) * max(cfg.seq_len(i) * max(3 * cfg.stage_dim(i), cfg.mlp_hidden(i)),
                                            cfg.num_heads[i] * cfg.seq_len(i) ** 2) for i in cfg.hybrid_stages)

    # -- export
    def export_module(self, model: MambaVision, fp16: bool = False) -> nn.Module:
        """The model itself (fp16: the half model; BatchNorm/LayerNorm on fp16, the scan returns fp32 and
        the mixer casts it back)."""
        return model

    # -- Gen
    def gen_layout(self, model: MambaVision, point: HookPoint, site) -> GenLayout:
        """A window is a w x w grid, tokens row-major (the scan's and the attention's layout alike)."""
        w = int(round(site.seq_len ** 0.5))
        if w * w != site.seq_len:
            raise ValueError(f"{point.path}: {site.seq_len} tokens are not a square window")
        return GenLayout((w, w), torch.arange(w * w, device="cpu"))


MAMBAVISION = register_family(MambaVisionFamily())
