"""Write random-weight checkpoints in a model family's official file format, to test the loader and the
pipeline at real size without the released weights.

    python tools/make_official_ckpt.py vmamba_tiny -o vmamba_tiny.pth                 # {'model': sd}
    python tools/make_official_ckpt.py vmamba_base -o vmamba_base.pth --format full   # the training dict
    python tools/make_official_ckpt.py mambavision_t -o mambavision_tiny_1k.pth.tar --format full

Shapes, key names and orders are the official ones; the values are random. VMamba: the official
initialisation (the model's own constructor). MambaVision: its official initialisation spread out
(BatchNorm statistics, norm weights, biases, layer scales, A / D / dt bias) so that a forward pass
exercises every branch: the official init leaves BatchNorms at identity, biases at zero and layer
scales at 1e-5. --format full writes the whole dict the family's training script saves (optimizer
state after one step on zero gradients, so every state tensor exists, scheduler, AMP scaler, EMA
weights, ...): about 4x the size of the weights (VMamba-B: about 1.4 GB).

Each family has its own function below and its entry in MAKERS; add a family there.
"""
from __future__ import annotations

import argparse
import math
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ouro.calib.models.mambavision import ARCHS as MAMBAVISION_ARCHS
from ouro.calib.models.mambavision import MambaVision, MambaVisionConfig, MambaVisionMixer
from ouro.calib.models.mambavision import resolve_arch as resolve_mambavision_arch
from ouro.calib.models.vmamba import VMAMBA_ARCHS, VSSM, VMambaConfig

FORMATS = ("model", "full")


# ---------------------------------------------------------------------------------- VMamba
class YacsCfgNode(dict):
    """Stand-in for yacs.config.CfgNode, pickled under that name when yacs is not installed: a dict
    subclass whose instance __dict__ holds the same four flags as the real one, so the pickle carries
    `GLOBAL yacs.config.CfgNode` exactly as a file from VMamba's main.py does."""

    def __init__(self, init: dict | None = None) -> None:
        super().__init__({k: YacsCfgNode(v) if isinstance(v, dict) else v for k, v in (init or {}).items()})
        self.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(), "__renamed_keys__": {}, "__new_allowed__": False})


def _cfgnode_class() -> type:
    """yacs.config.CfgNode when installed, else the stand-in registered as that module path."""
    try:
        from yacs.config import CfgNode  # type: ignore[import-not-found]

        return CfgNode
    except ImportError:
        mod = sys.modules.setdefault("yacs.config", types.ModuleType("yacs.config"))
        sys.modules.setdefault("yacs", types.ModuleType("yacs")).config = mod
        YacsCfgNode.__module__, YacsCfgNode.__qualname__, YacsCfgNode.__name__ = "yacs.config", "CfgNode", "CfgNode"
        mod.CfgNode = YacsCfgNode
        return YacsCfgNode


def vmamba_config_node(cfg: VMambaConfig, arch: str):
    """The parts of VMamba's `config` (classification/config.py, the yaml of the release) a reader may use."""
    vssm = {"PATCH_SIZE": cfg.patch_size, "IN_CHANS": cfg.in_chans, "DEPTHS": list(cfg.depths), "EMBED_DIM": cfg.dims[0],
            "SSM_D_STATE": cfg.d_state, "SSM_RATIO": cfg.ssm_ratio, "SSM_RANK_RATIO": 2.0,
            "SSM_DT_RANK": "auto" if cfg.dt_rank is None else cfg.dt_rank, "SSM_ACT_LAYER": "silu",
            "SSM_CONV": cfg.d_conv, "SSM_CONV_BIAS": cfg.conv_bias, "SSM_DROP_RATE": 0.0, "SSM_INIT": "v0",
            "SSM_FORWARDTYPE": cfg.forward_type, "MLP_RATIO": cfg.mlp_ratio, "MLP_ACT_LAYER": "gelu",
            "MLP_DROP_RATE": 0.0, "PATCH_NORM": True, "NORM_LAYER": "ln2d", "DOWNSAMPLE": cfg.downsample,
            "PATCHEMBED": cfg.patch_embed, "POSEMBED": False, "GMLP": False}
    node = {"MODEL": {"TYPE": "vssm", "NAME": cfg.name, "NUM_CLASSES": cfg.num_classes, "DROP_PATH_RATE": 0.2, "VSSM": vssm},
            "DATA": {"IMG_SIZE": cfg.img_size, "DATASET": "imagenet", "BATCH_SIZE": 128},
            "TRAIN": {"EPOCHS": 300, "BASE_LR": 5e-4, "WEIGHT_DECAY": 0.05, "WARMUP_EPOCHS": 20},
            "OUTPUT": f"output/{arch}", "TAG": "random-weights"}
    return _cfgnode_class()(node)


def vmamba_checkpoint(arch: str | VMambaConfig, fmt: str = "model", seed: int = 0) -> dict:
    """{'model': sd}, or (fmt 'full') the dict of VMamba's utils.save_checkpoint_ema: model, optimizer,
    lr_scheduler, max_accuracy, scaler, epoch, config (a yacs CfgNode), model_ema, max_accuray_ema (sic)."""
    cfg = VMAMBA_ARCHS[arch] if isinstance(arch, str) else arch
    name = arch if isinstance(arch, str) else cfg.name
    torch.manual_seed(seed)
    model = VSSM(cfg)
    sd = model.state_dict()
    if fmt == "model":
        return {"model": sd}
    # utils/optimizer.py set_weight_decay: 1-D params and biases without weight decay; AdamW
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1 or n.endswith(".bias")]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=5e-4, eps=1e-8,
                            betas=(0.9, 0.999), weight_decay=0.05)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates step / exp_avg / exp_avg_sq for every parameter; zero gradients leave the weights unchanged
    epoch = 299
    lr_scheduler = {"t_initial": 280 * 1251, "lr_min": 5e-6, "warmup_t": 20 * 1251, "warmup_lr_init": 5e-7,
                    "t_in_epochs": False, "cycle_limit": 1, "param_group_field": "lr", "base_values": [5e-4, 5e-4],
                    "metric": None, "noise_range_t": None, "noise_seed": 42}
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}
    return {"model": sd, "optimizer": opt.state_dict(), "lr_scheduler": lr_scheduler, "max_accuracy": 0.0,
            "scaler": scaler, "epoch": epoch, "config": vmamba_config_node(cfg, name),
            "model_ema": {k: v.clone() for k, v in sd.items()}, "max_accuray_ema": 0.0}


# ----------------------------------------------------------------------------- MambaVision
def mambavision_random_state_dict(arch: str | MambaVisionConfig, seed: int = 0) -> dict[str, Tensor]:
    """Random MambaVision weights (ARCHS key, official name or config), official keys, spread out
    (module doc) so that every branch of the forward matters."""
    cfg = resolve_mambavision_arch(arch)
    torch.manual_seed(seed)
    model = MambaVision(cfg)
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(shape, lo: float, hi: float) -> Tensor:
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    def normal(shape, std: float) -> Tensor:
        return torch.randn(shape, generator=g) * std

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(rnd(c, 0.5, 1.5))
                m.bias.copy_(normal(c, 0.1))
                m.running_mean.copy_(normal(c, 0.1))
                m.running_var.copy_(rnd(c, 0.5, 1.5))
                m.num_batches_tracked.fill_(1000)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(rnd(m.weight.shape, 0.5, 1.5))
                m.bias.copy_(normal(m.bias.shape, 0.1))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(normal(m.weight.shape, 1 / math.sqrt(m.in_features)))
                if m.bias is not None:
                    m.bias.copy_(normal(m.bias.shape, 0.1))
            if isinstance(m, MambaVisionMixer):
                m.A_log.add_(normal(m.A_log.shape, 0.3))
                m.D.copy_(rnd(m.D.shape, 0.5, 1.5))
                m.dt_proj.bias.copy_(normal(m.dt_proj.bias.shape, 0.5))  # softplus(delta) of order 1: the scan matters
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "gamma_1", "gamma_2")):
                p.copy_(rnd(p.shape, 0.05, 0.5))
    return model.state_dict()


def mambavision_checkpoint(arch: str | MambaVisionConfig, fmt: str = "model", seed: int = 0) -> dict:
    """{'state_dict': sd} (the key the official `_load_checkpoint` reads first), or (fmt 'full') the
    dict timm's CheckpointSaver writes from MambaVision's train.py: epoch, arch (= args.model),
    state_dict, optimizer, version 2, args (an argparse.Namespace), amp_scaler, state_dict_ema."""
    cfg = resolve_mambavision_arch(arch)
    sd = mambavision_random_state_dict(cfg, seed)
    if fmt == "model":
        return {"state_dict": sd}
    if fmt != "full":
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model = MambaVision(cfg)
    model.load_state_dict(sd)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.05)  # the release trains with LAMB: same state keys
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # creates every state tensor; it moves only this copy (decay), the file keeps `sd`
    g = torch.Generator().manual_seed(seed + 2)
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in sd.items()}
    args = argparse.Namespace(model=cfg.name, input_size=[cfg.in_chans, cfg.img_size, cfg.img_size],
                              num_classes=cfg.num_classes, model_ema=True, opt="lamb", seed=seed)
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}
    return {"epoch": 309, "arch": cfg.name, "state_dict": sd, "optimizer": opt.state_dict(), "version": 2,
            "args": args, "amp_scaler": scaler, "state_dict_ema": ema}


# ---------------------------------------------------------------------------------- registry
MAKERS: dict[str, Callable[[str, str, int], dict]] = {
    **{arch: vmamba_checkpoint for arch in VMAMBA_ARCHS},
    **{arch: mambavision_checkpoint for arch in MAMBAVISION_ARCHS},
}
"""Architecture name -> function(arch, format, seed) returning the object to torch.save."""
WEIGHT_KEYS = ("model", "state_dict")
"""Where the families' files keep the weights (VMamba: 'model', MambaVision: 'state_dict')."""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch", choices=sorted(MAKERS))
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--format", choices=FORMATS, default="model", help="model: {'model': sd}; full: the training dict")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace an existing file")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.force:
        ap.error(f"{args.out} exists; pass --force to replace it")
    obj = MAKERS[args.arch](args.arch, args.format, args.seed)
    tmp = args.out.with_name(args.out.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(args.out)
    sd = next(obj[k] for k in WEIGHT_KEYS if k in obj)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.out}: {args.arch}, {args.format} format, {n / 1e6:.1f} M parameters, {args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
