"""The VMamba family (MzeroMiko/VMamba `VSSM`, SS2D blocks): checkpoints, hook points, units, export, Gen.

Checkpoint files (read safely by ouro.calib.checkpoint): `{'model': sd}` and the full training dict
of VMamba's `main.py` (`utils.save_checkpoint_ema`: model, optimizer, lr_scheduler, max_accuracy,
scaler, epoch, config, model_ema, max_accuray_ema). Its `config` is a yacs `CfgNode` (a dict
subclass); the weights-only load reads it as a plain OrderedDict (allow-listed under the name
`yacs.config.CfgNode`: building an OrderedDict runs no code), and `DATA.IMG_SIZE` in it is the
input size hint. Architecture inference and errors: `ouro.calib.models.vmamba.infer_vmamba_config`.

Quantization sites (what every method sees; the methods' docstrings say what each quantizes):
    hook point   each block's SS2D `layers.{s}.blocks.{j}.op` (QuantState key `layers.{s}.blocks.{j}`)
    linears      in_proj, then per direction k: x_proj_k (kind x_proj), dt_proj_k (kind dt_proj,
                 produces direction k's delta), out_proj, and the block's MLP fc1, fc2 (called through
                 the same ops). Inputs are (B, L, C) with L = grid_s**2 of the block's stage.
    scans        row_fwd, col_fwd, row_bwd, col_bwd (`DIRECTIONS`), d_state and d_inner of the stage;
                 layout "row" (row-major tokens) or "col" (column-major: the one transposed copy of u
                 shared by col_fwd and col_bwd); the *_bwd scans run with reverse=True on the same layout.
Per-token tables (OuroMamba S_I(t), PTQ4VM PTS, theta(t)) and OuroMamba's outlier windows therefore
follow each tensor's own token order: row-major for in_proj, out_proj, fc1, fc2 and the row
directions, column-major for x_proj/dt_proj/scan of the column directions; a reversed direction
indexes its tables by layout position (as Vim's backward branch), its recurrence runs backwards.
Not quantized by any method (the shared exclusion list, `ouro.recipes.EXCLUDED_MODULES`): the
patch embed, the 2-D depthwise conv (conv2d), every LayerNorm (the SS2D out_norm included), the
downsampling convs and the classifier.

Calibration units: one per VSSBlock (x -> x + SS2D(LN(x)) + MLP(...), channel-last (B, H, W, C));
the loss compares the block's residual branches, output - input (as Vim's compares its mixer
output); after a stage's last block the FP downsample layer feeds the next stage.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.vmamba import (
    DIRECTIONS,
    REQUIRED,
    VMAMBA_ARCHS,
    VSSM,
    VMambaConfig,
    VSSBlock,
    direction_order,
    load_vmamba_state_dict,
)
from .base import DemoSpec, GenLayout, HookPoint, LinearSite, ModelFamily, ScanSite, Unit, register_family

__all__ = ["VMambaFamily", "VMAMBA", "DEMO_CONFIG", "YACS_CFGNODE"]

DEMO_CONFIG = VMambaConfig(depths=(2, 2, 2), dims=(32, 64, 128), img_size=32, patch_size=4, num_classes=10,
                           d_state=1, ssm_ratio=2.0, conv_bias=False, gate=False, mlp_ratio=4.0,
                           patch_embed="v2", downsample="v3", name="vmamba_demo_digits")
"""The VMamba demo model's architecture (tools/train_demo.py --family vmamba trains it; its card records it):
the released forward type (v05_noz, d_state 1, patch embed v2, downsample v3), 32x32 digits, 8x8 tokens."""
YACS_CFGNODE = "yacs.config.CfgNode"


class _CfgNodeAsOrderedDict:
    """Reads a pickled yacs CfgNode as an OrderedDict (its items; the node's flags are dropped)."""

    def __new__(cls, *args):
        return OrderedDict()


def _get(node, *keys):
    for k in keys:
        if not isinstance(node, Mapping) or k not in node:
            return None
        node = node[k]
    return node


class _Downsample:
    """The FP glue after a stage's last block: (x,) -> (downsample(x),)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, state):
        return (self.layer(state[0]),)


class VMambaFamily(ModelFamily):
    name = "vmamba"
    label = "VMamba"
    order = 1
    config_type = VMambaConfig
    model_type = VSSM
    archs = VMAMBA_ARCHS
    safe_globals = ((_CfgNodeAsOrderedDict, YACS_CFGNODE),)
    demo = DemoSpec("vmamba_demo.pth", "vmamba_demo.json", DEMO_CONFIG)

    def config_from_dict(self, d: Mapping) -> VMambaConfig:
        return VMambaConfig(**d)

    def resolve_arch(self, arch: str) -> VMambaConfig | None:
        """A VMAMBA_ARCHS key (vmamba_tiny, vmamba_small, vmamba_base) or an official name (vssm1_tiny_0230s, ...)."""
        if arch in VMAMBA_ARCHS:
            return VMAMBA_ARCHS[arch]
        return next((c for c in VMAMBA_ARCHS.values() if c.name == arch), None)

    def claims(self, sd: Mapping[str, Tensor]) -> bool:
        return all(k in sd for k in REQUIRED)

    def why_not(self, sd: Mapping[str, Tensor]) -> str:
        return f"not a VMamba (VSSM) state_dict: missing keys {[k for k in REQUIRED if k not in sd]}"

    def file_hints(self, obj: object) -> dict:
        """img_size from the training config's DATA.IMG_SIZE (the full training dict), when present."""
        img = _get(obj, "config", "DATA", "IMG_SIZE")
        return {"img_size": int(img) if isinstance(img, int) and not isinstance(img, bool) else None}

    def load_state_dict(self, sd, cfg=None, *, source="state_dict", hints=None, img_size=None, device=None) -> VSSM:
        hint = (hints or {}).get("img_size")
        return load_vmamba_state_dict(sd, cfg, img_size=img_size or (hint if cfg is None else None), source=source,
                                      device=device)

    # -- quantization
    def hook_points(self, model: VSSM) -> list[HookPoint]:
        c = model.cfg
        points: list[HookPoint] = []
        for s, layer in enumerate(model.layers):
            g = c.grids[s]
            L, di, N = g * g, c.d_inner(s), c.d_state
            for j, blk in enumerate(layer.blocks):
                op = blk.op
                linears = [LinearSite("in_proj", "in_proj", op.in_proj, L)]
                for d in DIRECTIONS:
                    linears += [LinearSite(f"x_proj_{d.k}", "x_proj", op.x_proj[d.k], L),
                                LinearSite(f"dt_proj_{d.k}", "dt_proj", op.dt_proj[d.k], L, delta_for=d.name)]
                linears.append(LinearSite("out_proj", "out_proj", op.out_proj, L))
                if blk.mlp is not None:
                    linears += [LinearSite("fc1", "fc1", blk.mlp.fc1, L), LinearSite("fc2", "fc2", blk.mlp.fc2, L)]
                scans = tuple(ScanSite(d.name, d.reverse, L, di, N, d.order) for d in DIRECTIONS)
                n = len(points)
                points.append(HookPoint(n, f"layers.{s}.blocks.{j}.op", f"layers.{s}.blocks.{j}", op, n, tuple(linears), scans))
        return points

    def units(self, model: VSSM) -> list[Unit]:
        out = []
        last = len(model.layers) - 1
        for s, layer in enumerate(model.layers):
            for j, blk in enumerate(layer.blocks):
                post = _Downsample(layer.downsample) if j == len(layer.blocks) - 1 and s < last else None
                out.append(Unit(f"layers.{s}.blocks.{j}", blk, post))
        return out

    def entry(self, model: VSSM) -> VSSBlock:
        return model.layers[0].blocks[0]

    def unit_target(self, inputs, outputs) -> Tensor:
        return outputs[0] - inputs[0]  # the block's residual branches (SS2D and MLP)

    def unit_stream(self, outputs) -> Tensor:
        return outputs[0]

    def work_numel(self, cfg: VMambaConfig) -> int:
        return max(g * g * max(cfg.d_inner(s), cfg.mlp_hidden(s), cfg.dims[s]) for s, g in enumerate(cfg.grids))

    # -- export
    def export_module(self, model: VSSM, fp16: bool = False) -> nn.Module:
        return _Fp16VSSM(model) if fp16 else model

    # -- Gen
    def gen_layout(self, model: VSSM, point: HookPoint, scan: ScanSite) -> GenLayout:
        """Every token is a patch of its stage's grid; a direction's layout is `direction_order`."""
        g = int(round(scan.seq_len ** 0.5))
        return GenLayout((g, g), direction_order(scan.direction, g, g))


class _Fp16VSSM(nn.Module):
    """fp16 export: the half model with every LayerNorm computed on its fp16 input (VMamba has no fp32
    residual stream; the scans return fp32, cast back to the fp16 activations)."""

    def __init__(self, model: VSSM) -> None:
        super().__init__()
        self.model = model
        self.cfg = model.cfg

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


VMAMBA = register_family(VMambaFamily())
