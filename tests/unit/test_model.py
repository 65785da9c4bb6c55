"""Vim model: official state_dict format, architecture inference, checkpoint loading and its errors,
and the no-flip backward direction vs the official flip -> causal conv -> scan -> flip."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ouro.calib.checkpoint import CheckpointError, infer_config, load_checkpoint, resolve_arch
from ouro.calib.models.vim import ARCHS, MambaMixer, VimConfig, VisionMamba
from ouro.calib.scan import selective_scan_ref

FP32_ATOL = 1e-5  # fast scan + reordered flips vs the official-order reference, fp32
FP32_RTOL = 1e-4
SMALL = VimConfig(embed_dim=32, depth=2, img_size=32, patch_size=8, stride=8, num_classes=10, name="small-test")

# The official key set of one block, from hustvl/Vim vim/models_mamba.py (create_block -> Block with
# RMSNorm, no bias) and mamba-1p1p1 mamba_simple.py Mamba(bimamba_type="v2"): (name, shape) for
# d_model E, d_inner 2E, d_state 16, d_conv 4, dt_rank ceil(E/16).
def official_block_keys(i: int, E: int) -> dict[str, tuple[int, ...]]:
    di, r, S = 2 * E, math.ceil(E / 16), 16
    m = f"layers.{i}.mixer."
    return {
        m + "A_log": (di, S), m + "D": (di,),
        m + "in_proj.weight": (2 * di, E),
        m + "conv1d.weight": (di, 1, 4), m + "conv1d.bias": (di,),
        m + "x_proj.weight": (r + 2 * S, di),
        m + "dt_proj.weight": (di, r), m + "dt_proj.bias": (di,),
        m + "A_b_log": (di, S), m + "D_b": (di,),
        m + "conv1d_b.weight": (di, 1, 4), m + "conv1d_b.bias": (di,),
        m + "x_proj_b.weight": (r + 2 * S, di),
        m + "dt_proj_b.weight": (di, r), m + "dt_proj_b.bias": (di,),
        m + "out_proj.weight": (E, di),
        f"layers.{i}.norm.weight": (E,),
    }


def official_keys(E: int, depth: int = 24, tokens: int = 197, patch: int = 16, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    keys = {
        "patch_embed.proj.weight": (E, 3, patch, patch), "patch_embed.proj.bias": (E,),
        "cls_token": (1, 1, E), "pos_embed": (1, tokens, E),
        "norm_f.weight": (E,), "head.weight": (classes, E), "head.bias": (classes,),
    }
    for i in range(depth):
        keys.update(official_block_keys(i, E))
    return keys


def meta_state_dict(cfg: VimConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return VisionMamba(cfg).state_dict()


def shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def save(tmp_path: Path, obj, name: str = "ckpt.pth") -> Path:
    p = tmp_path / name
    torch.save(obj, p)
    return p


# ---------------------------------------------------------------------------------- format
def test_block_keys_are_the_official_ones():
    sd = meta_state_dict(ARCHS["vim_tiny"])
    block0 = {k: v for k, v in shapes(sd).items() if k.startswith("layers.0.")}
    assert block0 == official_block_keys(0, 192)
    assert len(block0) == 17


@pytest.mark.parametrize("arch,E", [("vim_tiny", 192), ("vim_small", 384), ("vim_base", 768)])
def test_official_keys_and_shapes(arch, E):
    sd = meta_state_dict(ARCHS[arch])
    assert shapes(sd) == official_keys(E)
    assert len(sd) == 7 + 24 * 17
    assert infer_config(sd) == ARCHS[arch]


@pytest.mark.parametrize("arch", ["vim_tiny", "vim_small", pytest.param("vim_base", marks=pytest.mark.slow)])  # base: 400 MB file
def test_round_trip_official_archs(tmp_path, arch):
    torch.manual_seed(0)
    model = VisionMamba(ARCHS[arch])
    path = save(tmp_path, {"model": model.state_dict()})
    loaded = load_checkpoint(path)
    assert loaded.cfg == ARCHS[arch]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("wrap", ["model", "state_dict", "bare", "module_prefix", "ema_only"])
def test_container_formats(tmp_path, wrap):
    torch.manual_seed(0)
    model = VisionMamba(SMALL)
    sd = model.state_dict()
    obj = {"model": {"model": sd}, "state_dict": {"state_dict": sd}, "bare": sd,
           "module_prefix": {"model": {"module." + k: v for k, v in sd.items()}}, "ema_only": {"model_ema": sd, "epoch": 3}}[wrap]
    loaded = load_checkpoint(save(tmp_path, obj), arch=SMALL)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x), atol=0, rtol=0)


def test_official_training_dict(tmp_path):
    """The full dict vim/main.py saves: model, model_ema, optimizer, lr_scheduler, epoch, scaler, args."""
    torch.manual_seed(0)
    cfg = VimConfig(embed_dim=32, depth=2, img_size=64, patch_size=16, stride=8, num_classes=7)
    model = VisionMamba(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    opt.step()
    args = argparse.Namespace(model="vim_tiny_patch16_stride8_64_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                              input_size=64, lr=5e-4, epochs=300, data_path="/data/imagenet", mixup=0.8, smoothing=0.1)
    ckpt = {"model": model.state_dict(), "model_ema": model.state_dict(), "optimizer": opt.state_dict(),
            "lr_scheduler": {"base_lr": 5e-4, "last_epoch": 3}, "epoch": 3,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}, "args": args}
    loaded = load_checkpoint(save(tmp_path, ckpt))
    assert (loaded.cfg.stride, loaded.cfg.img_size, loaded.cfg.patch_size) == (8, 64, 16)
    assert loaded.cfg.num_classes == 7


# ---------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("cfg", [
    VimConfig(embed_dim=192, depth=24, patch_size=16, stride=8, img_size=224),  # official patch16_stride8: 27x27
    VimConfig(embed_dim=384, depth=24, patch_size=16, stride=16, img_size=384),
    VimConfig(embed_dim=96, depth=6, img_size=32, patch_size=8, stride=8, num_classes=10),  # the demo shape
    VimConfig(embed_dim=64, depth=4, img_size=32, patch_size=4, stride=4, num_classes=10, d_state=8),
    VimConfig(embed_dim=40, depth=3, img_size=48, patch_size=16, stride=16, in_chans=1, num_classes=5, d_conv=3, expand=3),
], ids=["tiny-stride8", "small-384", "demo", "patch4-dstate8", "odd"])
def test_infer_config(cfg):
    got = infer_config(meta_state_dict(cfg))
    assert VimConfig(**{**got.to_dict(), "name": cfg.name}) == cfg


def test_infer_config_stride8_grid():
    sd = meta_state_dict(resolve_arch("vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"))
    assert tuple(sd["pos_embed"].shape) == (1, 27 * 27 + 1, 384)
    cfg = infer_config(sd)
    assert (cfg.patch_size, cfg.stride, cfg.img_size, cfg.cls_position) == (16, 8, 224, 364)


def test_img_size_hint_resolves_overlap():
    cfg = VimConfig(embed_dim=32, depth=1, img_size=32, patch_size=8, stride=4, num_classes=10)  # 7x7 grid
    sd = meta_state_dict(cfg)
    assert infer_config(sd).stride == 8  # without a hint: non-overlapping patches
    got = infer_config(sd, img_size=32)
    assert (got.stride, got.img_size) == (4, 32)


def test_arch_override(tmp_path):
    torch.manual_seed(0)
    path = save(tmp_path, {"model": VisionMamba(SMALL).state_dict()})
    assert load_checkpoint(path, arch=SMALL).cfg == SMALL


# ---------------------------------------------------------------------------------- bad checkpoints
def test_not_a_vim(tmp_path):
    path = save(tmp_path, {"model": {"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}})
    with pytest.raises(CheckpointError, match=r"not a Vim checkpoint: missing keys \['patch_embed.proj.weight'"):
        load_checkpoint(path)


def test_not_bimamba_v2(tmp_path):
    sd = VisionMamba(SMALL).state_dict()
    sd = {k: v for k, v in sd.items() if not any(b in k for b in ("A_b_log", "conv1d_b", "x_proj_b", "dt_proj_b", "D_b"))}
    with pytest.raises(CheckpointError, match=r"bimamba-v2.*layers.0.mixer.A_b_log"):
        load_checkpoint(save(tmp_path, sd))


def test_non_tensor_entries(tmp_path):
    with pytest.raises(CheckpointError, match="non-tensor entries"):
        load_checkpoint(save(tmp_path, {"model": {"a": 1, "b": "x"}}))


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated(tmp_path, keep):
    path = save(tmp_path, {"model": VisionMamba(SMALL).state_dict()})
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_corrupt_bytes(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipfile", [True, False])
def test_code_executing_pickle_is_refused(tmp_path, zipfile):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": VisionMamba(SMALL).state_dict(), "x": _Evil(marker)}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(CheckpointError, match=r"refusing to load .*system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_arch_mismatch_names_keys_and_shapes(tmp_path):
    sd = VisionMamba(VimConfig(**{**SMALL.to_dict(), "embed_dim": 48})).state_dict()
    with pytest.raises(CheckpointError, match=r"does not match architecture small-test.*patch_embed.proj.weight: checkpoint \(48, 3, 8, 8\) vs model \(32, 3, 8, 8\)"):
        load_checkpoint(save(tmp_path, sd), arch=SMALL)


def test_arch_mismatch_official_name(tmp_path):
    path = save(tmp_path, {"model": VisionMamba(SMALL).state_dict()})
    with pytest.raises(CheckpointError, match=r"vim_tiny.*shape mismatches.*missing keys.*layers.2"):
        load_checkpoint(path, arch="vim_tiny")


def test_unknown_arch(tmp_path):
    path = save(tmp_path, {"model": VisionMamba(SMALL).state_dict()})
    with pytest.raises(CheckpointError, match="unknown architecture 'vim_huge'"):
        load_checkpoint(path, arch="vim_huge")


@pytest.mark.parametrize("edit", ["extra", "missing"])
def test_strict_loading(tmp_path, edit):
    sd = VisionMamba(SMALL).state_dict()
    if edit == "extra":
        sd["layers.0.mixer.gamma"] = torch.ones(3)
        match = r"unexpected keys, e.g. \['layers.0.mixer.gamma'\]"
    else:
        del sd["layers.1.mixer.D_b"]
        match = r"missing keys, e.g. \['layers.1.mixer.D_b'\]"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(save(tmp_path, sd), arch=SMALL)


def test_gap_in_layer_numbering(tmp_path):
    sd = VisionMamba(VimConfig(**{**SMALL.to_dict(), "depth": 3})).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("layers.1.")}
    with pytest.raises(CheckpointError, match=r"missing blocks \[1\]"):
        load_checkpoint(save(tmp_path, sd))


# ---------------------------------------------------------------------------------- no-flip equivalence
def _official_inner(m: MambaMixer, xz: torch.Tensor, sfx: str) -> torch.Tensor:
    """mamba_inner_fn_no_out_proj on (B, 2*d_inner, L): causal conv1d + SiLU, x_proj, dt_proj
    (bias as delta_bias), selective scan with softplus, D skip and SiLU(z) gate; returns (B, L, d_inner)."""
    cfg = m.cfg
    conv, x_proj, dt_proj = getattr(m, "conv1d" + sfx), getattr(m, "x_proj" + sfx), getattr(m, "dt_proj" + sfx)
    A = -torch.exp(getattr(m, "A_log" if not sfx else "A_b_log").float())
    Dskip = getattr(m, "D" + sfx).float()
    L = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=cfg.d_conv - 1, groups=cfg.d_inner)[..., :L])
    x_dbl = F.linear(x.transpose(1, 2), x_proj.weight)
    dt, Bm, Cm = torch.split(x_dbl, [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
    delta = dt @ dt_proj.weight.t() + dt_proj.bias.float()
    return selective_scan_ref(x.transpose(1, 2), delta, A, Bm, Cm, Dskip, z.transpose(1, 2), delta_softplus=True)


def official_mixer(m: MambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """bimamba v2 as the official Mamba.forward: flip xz, run the causal path, flip the result back."""
    xz = (hidden @ m.in_proj.weight.t()).transpose(1, 2)
    out = _official_inner(m, xz, "")
    out_b = _official_inner(m, xz.flip([-1]), "_b")
    return F.linear((out + out_b.flip([1])) / 2, m.out_proj.weight)


def official_forward(model: VisionMamba, x: torch.Tensor) -> torch.Tensor:
    """VisionMamba.forward_features + head as the official code: middle CLS at M // 2, abs pos embed,
    fused add + RMSNorm (prenorm, residual in fp32), final add + norm_f, head on the CLS token."""
    def rms(v, w, eps):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w

    t = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    M = t.shape[1]
    pos = M // 2
    t = torch.cat((t[:, :pos], model.cls_token.expand(t.shape[0], -1, -1), t[:, pos:]), dim=1) + model.pos_embed
    hidden, residual = t, None
    for blk in model.layers:
        residual = hidden.float() if residual is None else residual + hidden.float()
        hidden = official_mixer(blk.mixer, rms(residual, blk.norm.weight, blk.norm.eps))
    out = rms(residual + hidden.float(), model.norm_f.weight, model.norm_f.eps)
    return model.head(out[:, pos])


def _randomise(model: VisionMamba, seed: int = 0) -> VisionMamba:
    """Non-trivial A, D, norms and conv kernels (the init has A = -(1..S), D = 1, weights 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "A_b_log")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.5)
            elif name.endswith(("norm.weight", "norm_f.weight", ".D", ".D_b")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "conv1d" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("L", [1, 2, 7, 17])
def test_no_flip_mixer_matches_official(L):
    torch.manual_seed(0)
    m = _randomise(VisionMamba(SMALL)).layers[0].mixer
    hidden = torch.randn(3, L, SMALL.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(m(hidden), official_mixer(m, hidden), atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("cfg", [SMALL, VimConfig(embed_dim=48, depth=3, img_size=40, patch_size=16, stride=8, num_classes=6)],
                         ids=["small", "overlap-odd-grid"])
def test_no_flip_model_matches_official(cfg):
    torch.manual_seed(1)
    model = _randomise(VisionMamba(cfg))
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(model, x), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_backward_branch_is_not_the_forward_one():
    """Guard for the equivalence tests: flipping matters, so a model that ignored the backward
    parameters or the direction would fail them."""
    torch.manual_seed(0)
    m = _randomise(VisionMamba(SMALL)).layers[0].mixer
    hidden = torch.randn(2, 9, SMALL.embed_dim)
    with torch.no_grad():
        ref = official_mixer(m, hidden)
        m.conv1d_b.weight.copy_(m.conv1d_b.weight.flip(-1))
        assert (m(hidden) - ref).abs().max() > 1e-3
