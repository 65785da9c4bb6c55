"""The Vim family (hustvl/Vim, bimamba v2, middle CLS token): checkpoints, hook points, units, export, Gen.

Checkpoint files (ouro.calib.checkpoint reads them safely): the official training dicts of
`vim/main.py` (model, model_ema, optimizer, lr_scheduler, epoch, scaler, args = argparse.Namespace),
`{'model': sd}`, `{'state_dict': sd}` or a bare state_dict; keys as in the official `models_mamba.py`.

Architecture inference (no guessing beyond what the shapes cannot say):
    embed_dim, in_chans, patch_size  patch_embed.proj.weight (E, C, p, p)
    depth                            number of layers.{i}. blocks
    d_inner, d_state                 layers.0.mixer.A_log (d_inner, S); expand = d_inner / E
    d_conv                           layers.0.mixer.conv1d.weight (d_inner, 1, k)
    num_classes                      head.weight (K, E)
    grid                             pos_embed (1, grid**2 + 1, E)   (one middle CLS token)
    stride, img_size                 grid = (img - p) // stride + 1 has several solutions; in order:
                                     the training args (`input_size`, `..._patch16_stride8_224_...`
                                     model name) when the file carries them; an `img_size` hint;
                                     a standard image size (224, 384, ...) reached with stride p or
                                     p/2 (the official patch16_stride8 variants: 27x27 at 224);
                                     else non-overlapping patches, img = grid * p.

Quantization: one hook point per block, the mixer `layers.{i}.mixer` (QuantState key `layers.{i}`),
with the linears in_proj, x_proj, x_proj_b, dt_proj, dt_proj_b, out_proj (each its own kind) and
the scans "fwd" and "bwd" (reverse), both over the model's token sequence (patches with the CLS
token in the middle, L = grid**2 + 1). One calibration unit per block: Block(hidden, residual) ->
(mixer output, residual); the loss compares the mixer outputs. Export: the model itself (fp16:
linear inputs cast to the fp16 weights, the residual stream and RMSNorms kept in fp32, as the model).
"""
from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..data import DEMO_CHECKPOINT, DEMO_CARD, DEMO_CONFIG
from ..models.vim import ARCHS, Block, VimConfig, VisionMamba
from ..models.keys import state_dict_mismatch
from .base import CheckpointError, DemoSpec, GenLayout, HookPoint, LinearSite, ModelFamily, ScanSite, Unit, register_family

__all__ = ["VimFamily", "VIM", "infer_config", "resolve_arch", "load_state_dict", "REQUIRED", "BIMAMBA_V2"]

STANDARD_IMG_SIZES = (224, 384, 256, 448, 512, 192, 160, 128)
REQUIRED = ("patch_embed.proj.weight", "pos_embed", "cls_token", "norm_f.weight", "head.weight",
            "layers.0.norm.weight", "layers.0.mixer.in_proj.weight", "layers.0.mixer.A_log", "layers.0.mixer.conv1d.weight",
            "layers.0.mixer.x_proj.weight", "layers.0.mixer.dt_proj.weight", "layers.0.mixer.out_proj.weight")
BIMAMBA_V2 = ("A_b_log", "conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.weight", "D_b")
_NAME_RE = re.compile(r"patch(\d+)(?:_stride(\d+))?_(\d+)")
LINEARS = (("in_proj", None), ("x_proj", None), ("x_proj_b", None), ("dt_proj", "fwd"), ("dt_proj_b", "bwd"), ("out_proj", None))
"""The mixer's linears in forward order, with the scan direction whose delta each produces."""


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


def _hints_from_args(train_args: object) -> tuple[int | None, int | None]:
    """(img_size, stride) from an official training args Namespace, when it says."""
    if train_args is None:
        return None, None
    img = getattr(train_args, "input_size", None)
    stride = None
    m = _NAME_RE.search(str(getattr(train_args, "model", "")))
    if m:
        stride = int(m.group(2) or m.group(1))
        img = img or int(m.group(3))
    return (int(img) if isinstance(img, int) else None), stride


def _img_and_stride(grid: int, patch: int, img_hint: int | None, stride_hint: int | None) -> tuple[int, int]:
    if stride_hint:
        return (grid - 1) * stride_hint + patch, stride_hint
    if img_hint:
        if grid == 1:
            return img_hint, patch
        if (img_hint - patch) % (grid - 1) == 0 and img_hint >= patch:
            return img_hint, (img_hint - patch) // (grid - 1)
        raise CheckpointError(f"img_size {img_hint} with patch {patch} cannot give a {grid}x{grid} patch grid (pos_embed)")
    for stride in (patch, patch // 2):
        img = (grid - 1) * stride + patch
        if stride >= 1 and img in STANDARD_IMG_SIZES:
            return img, stride
    return grid * patch, patch


def infer_config(state_dict: Mapping[str, Tensor], *, img_size: int | None = None, stride: int | None = None) -> VimConfig:
    """The VimConfig a (bimamba-v2, middle-CLS) Vim state_dict was built with; see the module doc.
    `img_size` / `stride` resolve the image size vs stride ambiguity when the shapes cannot."""
    sd = state_dict
    missing = [k for k in REQUIRED if k not in sd]
    if missing:
        present = ", ".join(list(sd)[:6])
        raise CheckpointError(f"not a Vim checkpoint: missing keys {missing} (it has {len(sd)} keys, e.g. {present})")
    v2_missing = [f"layers.0.mixer.{k}" for k in BIMAMBA_V2 if f"layers.0.mixer.{k}" not in sd]
    if v2_missing:
        raise CheckpointError(f"not a bimamba-v2 Vim (separate backward parameters): missing keys {v2_missing}")
    E, C, ph, pw = _shape(sd, "patch_embed.proj.weight")
    if ph != pw:
        raise CheckpointError(f"patch_embed.proj.weight {(E, C, ph, pw)}: only square patches are supported")
    if _shape(sd, "cls_token") != (1, 1, E):
        raise CheckpointError(f"cls_token has shape {_shape(sd, 'cls_token')}, expected (1, 1, {E}) (one middle CLS token)")
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    depth = max(layer_ids) + 1
    if layer_ids != set(range(depth)):
        raise CheckpointError(f"layers are not numbered 0..{depth - 1}: missing blocks {sorted(set(range(depth)) - layer_ids)}")
    d_inner, S = _shape(sd, "layers.0.mixer.A_log")
    if d_inner % E:
        raise CheckpointError(f"layers.0.mixer.A_log {(d_inner, S)}: d_inner {d_inner} is not a multiple of embed dim {E}")
    d_conv = _shape(sd, "layers.0.mixer.conv1d.weight")[-1]
    n_tok = _shape(sd, "pos_embed")[1] - 1
    grid = math.isqrt(max(n_tok, 0))
    if n_tok < 1 or grid * grid != n_tok:
        raise CheckpointError(f"pos_embed {_shape(sd, 'pos_embed')}: {n_tok} patch tokens (+1 CLS) is not a square grid")
    img, st = _img_and_stride(grid, ph, img_size, stride)
    try:
        cfg = VimConfig(embed_dim=E, depth=depth, img_size=img, patch_size=ph, stride=st, in_chans=C,
                        num_classes=_shape(sd, "head.weight")[0], d_state=S, d_conv=d_conv, expand=d_inner // E)
    except ValueError as e:
        raise CheckpointError(f"inferred an invalid architecture: {e}") from None
    want_xproj = (cfg.dt_rank + 2 * S, d_inner)
    if _shape(sd, "layers.0.mixer.x_proj.weight") != want_xproj:
        raise CheckpointError(f"layers.0.mixer.x_proj.weight {_shape(sd, 'layers.0.mixer.x_proj.weight')}: expected {want_xproj} "
                              f"(dt_rank = ceil({E}/16) = {cfg.dt_rank}, d_state {S})")
    return _named(cfg)


def _named(cfg: VimConfig) -> VimConfig:
    """Give an inferred config the official name when it is one of ARCHS."""
    for arch in ARCHS.values():
        if VimConfig(**{**arch.to_dict(), "name": cfg.name}) == cfg:
            return arch
    return cfg


def _resolve(arch: str) -> VimConfig | None:
    if arch in ARCHS:
        return ARCHS[arch]
    m = re.match(r"vim_(tiny|small|base)_", arch)
    n = _NAME_RE.search(arch)
    if m and n:
        base = ARCHS[f"vim_{m.group(1)}"]
        patch = int(n.group(1))
        return VimConfig(**{**base.to_dict(), "patch_size": patch, "stride": int(n.group(2) or patch),
                            "img_size": int(n.group(3)), "name": arch})
    return None


def resolve_arch(arch: str | VimConfig) -> VimConfig:
    """An ARCHS key (vim_tiny, vim_small, vim_base), an official model name (including the
    `..._patch16_stride8_224_...` variants), or a VimConfig."""
    if isinstance(arch, VimConfig):
        return arch
    cfg = _resolve(arch)
    if cfg is None:
        raise CheckpointError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)} or an official vim_*_patchP[_strideS]_IMG_* name")
    return cfg


def _check_shapes(model: VisionMamba, sd: Mapping[str, Tensor], cfg: VimConfig, source: str) -> None:
    bad = state_dict_mismatch(model, sd)
    if bad:
        raise CheckpointError(f"{source} does not match architecture {cfg.name} "
                              f"(embed {cfg.embed_dim}, depth {cfg.depth}, patch {cfg.patch_size}, stride {cfg.stride}, "
                              f"img {cfg.img_size}, classes {cfg.num_classes}): " + bad)


def load_state_dict(sd: Mapping[str, Tensor], arch: str | VimConfig | None = None, *, source: str = "state_dict",
                    img_size: int | None = None, stride: int | None = None,
                    device: torch.device | str | None = None) -> VisionMamba:
    """Build the Vim for `sd` (inferred, or `arch`) and load it with strict=True, in eval mode."""
    try:
        cfg = infer_config(sd, img_size=img_size, stride=stride) if arch is None else resolve_arch(arch)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    with torch.device("meta"):  # keys and shapes first: a wrong file fails before any memory is spent
        _check_shapes(VisionMamba(cfg), sd, cfg, source)
    with torch.device(device or "cpu"):
        model = VisionMamba(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------ export / Gen helpers
class _Fp16Head(nn.Module):
    """fp16 export wrapper: the model keeps its residual stream and norms in fp32 (by design), so the
    fp32 features are cast to the fp16 head's dtype (the linears' inputs are cast by the exporter)."""

    def __init__(self, model: VisionMamba) -> None:
        super().__init__()
        self.model = model
        self.cfg = model.cfg

    def forward(self, x: Tensor) -> Tensor:
        feats = self.model.forward_features(x)
        return self.model.head(feats.to(self.model.head.weight.dtype))


# ------------------------------------------------------------------------------ the family
class VimFamily(ModelFamily):
    name = "vim"
    label = "Vim"
    order = 0
    config_type = VimConfig
    model_type = VisionMamba
    archs = ARCHS
    safe_globals = (argparse.Namespace,)
    demo = DemoSpec(DEMO_CHECKPOINT, DEMO_CARD, DEMO_CONFIG)

    def resolve_arch(self, arch: str) -> VimConfig | None:
        return _resolve(arch)

    def claims(self, sd: Mapping[str, Tensor]) -> bool:
        return all(k in sd for k in REQUIRED)

    def why_not(self, sd: Mapping[str, Tensor]) -> str:
        missing = [k for k in REQUIRED if k not in sd]
        return f"not a Vim checkpoint: missing keys {missing}"

    def file_hints(self, obj: object) -> dict:
        img, stride = _hints_from_args(obj.get("args") if isinstance(obj, Mapping) else None)
        return {"img_size": img, "stride": stride}

    def load_state_dict(self, sd, cfg=None, *, source="state_dict", hints=None, img_size=None, device=None) -> VisionMamba:
        hints = dict(hints or {})
        return load_state_dict(sd, cfg, source=source, img_size=img_size or hints.get("img_size"), stride=hints.get("stride"),
                               device=device)

    # -- quantization
    def hook_points(self, model: VisionMamba) -> list[HookPoint]:
        c = model.cfg
        L = c.seq_len
        points = []
        for i, blk in enumerate(model.layers):
            m = blk.mixer
            linears = tuple(LinearSite(name, name, getattr(m, name), L, delta_for=d) for name, d in LINEARS)
            scans = tuple(ScanSite(d, d == "bwd", L, c.d_inner, c.d_state) for d in ("fwd", "bwd"))
            points.append(HookPoint(i, f"layers.{i}.mixer", f"layers.{i}", m, i, linears, scans))
        return points

    def units(self, model: VisionMamba) -> list[Unit]:
        return [Unit(f"layers.{i}", blk) for i, blk in enumerate(model.layers)]

    def entry(self, model: VisionMamba) -> Block:
        return model.layers[0]

    def unit_target(self, inputs, outputs) -> Tensor:
        return outputs[0]  # the mixer output (not the residual)

    def unit_stream(self, outputs) -> Tensor:
        out, residual = outputs
        return residual + out.float()

    def work_numel(self, cfg: VimConfig) -> int:
        return cfg.seq_len * cfg.d_inner

    # -- export
    def export_module(self, model: VisionMamba, fp16: bool = False) -> nn.Module:
        return _Fp16Head(model) if fp16 else model

    # -- Gen
    def gen_layout(self, model: VisionMamba, point: HookPoint, scan: ScanSite) -> GenLayout:
        """Tokens in the model's order: the grid's patches row-major with the CLS token inserted at
        cls_position (not a patch: -1); both directions share it (the backward scan is `reverse`)."""
        c = model.cfg
        cpu = torch.device("cpu")  # index metadata: on the CPU whatever the default device
        pos = torch.arange(c.seq_len, device=cpu) - (torch.arange(c.seq_len, device=cpu) > c.cls_position).long()
        pos[c.cls_position] = -1
        return GenLayout((c.grid, c.grid), pos)


    def gen_losses(self, model: VisionMamba, x: Tensor, targets: Tensor, cfg):
        """The fast blocked form (ouro.calib.gen.losses.gen_losses); equal to the generic one."""
        from ..gen.losses import gen_losses

        return gen_losses(model, x, targets, cfg)


VIM = register_family(VimFamily())
