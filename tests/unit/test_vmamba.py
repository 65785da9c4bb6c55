"""VMamba (VSSM): official state_dict keys and shapes, strict loading, config inference and its errors,
and our no-flip four-direction SS2D against a test-only reference that follows the official forward
literally (cross_scan by flatten/transpose/flip/cat -> the grouped selective scan on the K*D stacked
channels -> cross_merge), from SS2D up to the logits of VMamba-T/S/B."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ouro.calib.models.vim import MixerOps
from ouro.calib.models.vmamba import (
    DIRECTIONS,
    SS2D,
    VMAMBA_ARCHS,
    VSSM,
    StackedLinear,
    VMambaConfig,
    VMambaStateDictError,
    direction_order,
    infer_vmamba_config,
    load_vmamba_state_dict,
)
from ouro.calib.scan import selective_scan_ref

FP32_ATOL = 1e-5  # one SS2D, unit-scale activations: our scan (chunked) and sum order vs the literal official one
FP32_RTOL = 1e-4
LOGIT_RTOL = 1e-4  # issue 14: logits match the official forward to 1e-4 relative (max |diff| / max |ref|)
SMALL = VMambaConfig(depths=(1, 2, 1), dims=(16, 32, 48), img_size=32, num_classes=10, d_state=2, ssm_ratio=2.0,
                     name="small-test")
# Every option the keys can express, on one small model: gate (forward type without _noz), conv bias, fixed
# dt rank, no MLP, patch embed v1, PatchMerging (downsample v1), d_conv 5, odd grid (36 / 4 = 9 -> 5 -> 3).
VARIANT = VMambaConfig(depths=(2, 1, 1), dims=(16, 24, 40), img_size=36, patch_size=4, num_classes=7, d_state=3,
                       ssm_ratio=1.5, dt_rank=3, d_conv=5, conv_bias=True, gate=True, mlp_ratio=0.0,
                       patch_embed="v1", downsample="v1", name="variant-test")


# ------------------------------------------------------------------------- official key set
def official_keys(cfg: VMambaConfig) -> dict[str, tuple[int, ...]]:
    """(key, shape) of an official VSSM (MzeroMiko/VMamba classification/models/vmamba.py, SS2D __initv2__,
    ln2d or ln norms, no posembed, no gmlp), written from the official constructors."""
    E, C = cfg.dims[0], cfg.in_chans
    keys: dict[str, tuple[int, ...]] = {}
    if cfg.patch_embed == "v2":  # _make_patch_embed_v2: Conv, (Permute), LN, (Permute), GELU, Conv, (Permute), LN
        s = cfg.patch_size // 2
        keys.update({"patch_embed.0.weight": (E // 2, C, s + 1, s + 1), "patch_embed.0.bias": (E // 2,),
                     "patch_embed.2.weight": (E // 2,), "patch_embed.2.bias": (E // 2,),
                     "patch_embed.5.weight": (E, E // 2, s + 1, s + 1), "patch_embed.5.bias": (E,),
                     "patch_embed.7.weight": (E,), "patch_embed.7.bias": (E,)})
    else:  # _make_patch_embed: Conv, (Permute), LN
        p = cfg.patch_size
        keys.update({"patch_embed.0.weight": (E, C, p, p), "patch_embed.0.bias": (E,),
                     "patch_embed.2.weight": (E,), "patch_embed.2.bias": (E,)})
    for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
        di, N = int(cfg.ssm_ratio * dim), cfg.d_state
        R = cfg.dt_rank or math.ceil(dim / 16)
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            keys.update({b + "norm.weight": (dim,), b + "norm.bias": (dim,),
                         b + "op.out_norm.weight": (di,), b + "op.out_norm.bias": (di,),
                         b + "op.in_proj.weight": ((2 * di if cfg.gate else di), dim),
                         b + "op.conv2d.weight": (di, 1, cfg.d_conv, cfg.d_conv),
                         b + "op.x_proj_weight": (4, R + 2 * N, di),
                         b + "op.out_proj.weight": (dim, di),
                         b + "op.A_logs": (4 * di, N), b + "op.Ds": (4 * di,),
                         b + "op.dt_projs_weight": (4, di, R), b + "op.dt_projs_bias": (4, di)})
            if cfg.conv_bias:
                keys[b + "op.conv2d.bias"] = (di,)
            if cfg.mlp_ratio > 0:
                h = int(dim * cfg.mlp_ratio)
                keys.update({b + "norm2.weight": (dim,), b + "norm2.bias": (dim,), b + "mlp.fc1.weight": (h, dim),
                             b + "mlp.fc1.bias": (h,), b + "mlp.fc2.weight": (dim, h), b + "mlp.fc2.bias": (dim,)})
        if i + 1 < cfg.num_stages:
            d = f"layers.{i}.downsample."
            out = cfg.dims[i + 1]
            if cfg.downsample == "v1":  # PatchMerging2D
                keys.update({d + "reduction.weight": (out, 4 * dim), d + "norm.weight": (4 * dim,), d + "norm.bias": (4 * dim,)})
            else:  # _make_downsample(_v3): (Permute), Conv, (Permute), LN
                k = 2 if cfg.downsample == "v2" else 3
                keys.update({d + "1.weight": (out, dim, k, k), d + "1.bias": (out,), d + "3.weight": (out,), d + "3.bias": (out,)})
    F_ = cfg.dims[-1]
    keys.update({"classifier.norm.weight": (F_,), "classifier.norm.bias": (F_,),
                 "classifier.head.weight": (cfg.num_classes, F_), "classifier.head.bias": (cfg.num_classes,)})
    return keys


def meta_state_dict(cfg: VMambaConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return VSSM(cfg).state_dict()


def shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# The released models, from the official README (params) and configs (forward type v05_noz, d_state 1).
RELEASED = {"vmamba_tiny": (276, 30), "vmamba_small": (402, 50), "vmamba_base": (402, 89)}


@pytest.mark.parametrize("arch", list(VMAMBA_ARCHS))
def test_official_keys_and_shapes(arch):
    cfg = VMAMBA_ARCHS[arch]
    sd = meta_state_dict(cfg)
    assert shapes(sd) == official_keys(cfg)
    n_keys, mparams = RELEASED[arch]
    assert len(sd) == n_keys
    assert round(sum(v.numel() for v in sd.values()) / 1e6) == mparams


def test_released_tiny_shapes_by_hand():
    """A few VMamba-T shapes worked out by hand from vmambav2v_tiny_224.yaml (dims 96..768, ssm_ratio 1,
    d_state 1, dt_rank ceil(dim/16), noz, 3x3 depthwise conv without bias)."""
    sd = shapes(meta_state_dict(VMAMBA_ARCHS["vmamba_tiny"]))
    assert sd["patch_embed.0.weight"] == (48, 3, 3, 3) and sd["patch_embed.5.weight"] == (96, 48, 3, 3)
    assert sd["layers.2.blocks.7.op.in_proj.weight"] == (384, 384)  # noz: d_inner rows, not 2 * d_inner
    assert sd["layers.2.blocks.7.op.x_proj_weight"] == (4, 24 + 2, 384)
    assert sd["layers.3.blocks.1.op.dt_projs_weight"] == (4, 768, 48)
    assert sd["layers.0.blocks.0.op.A_logs"] == (4 * 96, 1)
    assert sd["layers.0.blocks.0.op.conv2d.weight"] == (96, 1, 3, 3) and "layers.0.blocks.0.op.conv2d.bias" not in sd
    assert sd["layers.2.downsample.1.weight"] == (768, 384, 3, 3) and not any(k.startswith("layers.3.downsample") for k in sd)
    assert sd["classifier.head.weight"] == (1000, 768)
    assert VMAMBA_ARCHS["vmamba_tiny"].grids == (56, 28, 14, 7)


@pytest.mark.parametrize("cfg", [SMALL, VARIANT], ids=["small", "variant"])
def test_small_configs_keys(cfg):
    assert shapes(meta_state_dict(cfg)) == official_keys(cfg)


def test_released_small_is_s2l15_ratio2():
    s, b = VMAMBA_ARCHS["vmamba_small"], VMAMBA_ARCHS["vmamba_base"]
    assert (s.depths, s.dims, s.ssm_ratio) == ((2, 2, 15, 2), (96, 192, 384, 768), 2.0)
    assert (b.depths, b.dims, b.ssm_ratio) == ((2, 2, 15, 2), (128, 256, 512, 1024), 2.0)
    assert {c.forward_type for c in VMAMBA_ARCHS.values()} == {"v05_noz"}


# ------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw,match", [
    (dict(depths=(2, 2), dims=(8,)), "equal length"),
    (dict(depths=(), dims=()), "non-empty"),
    (dict(depths=(0, 1), dims=(8, 16)), "depth >= 1"),
    (dict(ssm_ratio=0.0), "no SSM channels"),
    (dict(d_conv=4), "odd"),
    (dict(patch_embed="v3"), "patch_embed must be one of"),
    (dict(downsample="none"), "downsample must be one of"),
    (dict(patch_size=3), "even patch_size"),
    (dict(dt_rank=0), "dt_rank"),
    (dict(mlp_ratio=-1.0), "mlp_ratio"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        VMambaConfig(**kw)


def test_config_round_trips_through_json():
    import json

    assert VMambaConfig(**json.loads(json.dumps(VARIANT.to_dict()))) == VARIANT
    with pytest.raises(AttributeError):
        VARIANT.d_state = 4  # frozen


# ------------------------------------------------------------------------- inference + strict loading
@pytest.mark.parametrize("arch", list(VMAMBA_ARCHS))
def test_infer_released(arch):
    assert infer_vmamba_config(meta_state_dict(VMAMBA_ARCHS[arch])) == VMAMBA_ARCHS[arch]


@pytest.mark.parametrize("cfg", [
    SMALL, VARIANT,
    VMambaConfig(depths=(1, 1), dims=(16, 40), img_size=32, d_state=4, ssm_ratio=1.0, downsample="v2", gate=True, mlp_ratio=2.0),
    VMambaConfig(depths=(3,), dims=(24,), img_size=16, patch_size=2, in_chans=1, num_classes=5, d_state=16, ssm_ratio=2.0),
    VMambaConfig(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), img_size=64, patch_size=8, conv_bias=True),
], ids=["small", "variant", "v2-down-gate", "one-stage", "patch8"])
def test_infer_config(cfg):
    got = infer_vmamba_config(meta_state_dict(cfg), img_size=cfg.img_size)
    assert VMambaConfig(**{**got.to_dict(), "name": cfg.name}) == cfg


def test_infer_names_released_at_other_img_size():
    got = infer_vmamba_config(meta_state_dict(VMAMBA_ARCHS["vmamba_small"]), img_size=384)
    assert got.name == "vssm1_small_0229" and got.img_size == 384


def _sd(cfg: VMambaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return VSSM(cfg).state_dict()


def test_strict_load_round_trip():
    sd = _sd(SMALL)
    m = load_vmamba_state_dict(sd, img_size=32)
    assert m.cfg == VMambaConfig(**{**SMALL.to_dict(), "name": "custom"})
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    assert not m.training


@pytest.mark.parametrize("edit,match", [
    ("extra", r"1 unexpected keys, e.g. \['layers.0.blocks.0.op.gamma'\]"),
    ("missing", r"1 missing keys, e.g. \['layers.1.blocks.1.op.Ds'\]"),
    ("shape", r"layers.2.blocks.0.op.out_norm.weight: state_dict \(5,\) vs model \(96,\)"),
])
def test_strict_mismatch_names_keys(edit, match):
    sd = _sd(SMALL)
    if edit == "extra":
        sd["layers.0.blocks.0.op.gamma"] = torch.ones(3)
    elif edit == "missing":
        del sd["layers.1.blocks.1.op.Ds"]
    else:
        sd["layers.2.blocks.0.op.out_norm.weight"] = torch.ones(5)
    with pytest.raises(VMambaStateDictError, match=match):
        load_vmamba_state_dict(sd, img_size=32)


def test_arch_mismatch():
    with pytest.raises(VMambaStateDictError, match=r"does not match VMamba architecture vssm1_tiny_0230s.*shape mismatches"):
        load_vmamba_state_dict(_sd(SMALL), "vmamba_tiny")
    with pytest.raises(VMambaStateDictError, match="unknown VMamba architecture 'vmamba_huge'"):
        load_vmamba_state_dict(_sd(SMALL), "vmamba_huge")


def _vim_like() -> dict[str, torch.Tensor]:
    return {"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "layers.0.mixer.A_log": torch.zeros(16, 4)}


@pytest.mark.parametrize("make,match", [
    (_vim_like, r"not a VMamba \(VSSM\) state_dict \(it looks like a Vim checkpoint\): missing keys \['patch_embed.0.weight'"),
    (lambda: {"fc.weight": torch.zeros(2, 2)}, r"not a VMamba \(VSSM\) state_dict: missing keys"),
    (lambda: {**_sd(SMALL), "layers.0.blocks.0.norm.running_mean": torch.zeros(16)}, r"BatchNorm norm layers \('bn'\) is not supported"),
    (lambda: {**_sd(SMALL), "layers.0.blocks.0.op.x_proj_bias": torch.zeros(4, 6)}, "x_proj_bias is not supported"),
    (lambda: {k: v for k, v in _sd(SMALL).items() if "layers.1.blocks.0." not in k}, r"stage 1: blocks are not numbered 0..n-1 \(found \[1\]\)"),
    (lambda: {k: v for k, v in _sd(SMALL).items() if "op.out_norm" not in k}, "only the LayerNorm out norm is supported"),
    (lambda: {**_sd(SMALL), "layers.1.blocks.0.op.A_logs": torch.zeros(4 * 48, 2)}, r"inconsistent ssm_ratio .* stage 1 has 48 for dim 32"),
    (lambda: {**_sd(SMALL), "layers.1.blocks.0.op.dt_projs_weight": torch.zeros(4, 64, 7)}, r"dt ranks \[1, 7, 3\]"),
    (lambda: {**_sd(SMALL), "layers.0.blocks.0.op.in_proj.weight": torch.zeros(40, 16)}, "has 40 rows: expected d_inner 32"),
    (lambda: {k: v for k, v in _sd(SMALL).items() if "downsample" not in k}, "downsample 'none' is not supported"),
])
def test_not_vmamba_errors(make, match):
    with pytest.raises(VMambaStateDictError, match=match):
        load_vmamba_state_dict(make(), img_size=32)


# ------------------------------------------------------------------------- the official forward, literally
def ref_linear2d(x, w, b=None):
    """Linear2d (channel-first linear): conv2d with the (out, in) weight as 1x1 kernels."""
    return F.conv2d(x, w[:, :, None, None], b)


def ref_ln2d(x, w, b, eps=1e-5):
    """LayerNorm2d: permute to channel-last, layer_norm, permute back."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


def ref_cross_scan(x):
    """csm_triton cross_scan_fwd, scans=0, channel-first in and out: (B, D, H, W) -> (B, 4, D, L)."""
    y = torch.stack([x.flatten(2, 3), x.transpose(2, 3).flatten(2, 3)], dim=1)
    return torch.cat([y, torch.flip(y, dims=[-1])], dim=1)


def ref_cross_merge(ys):
    """csm_triton cross_merge_fwd, scans=0: (B, 4, D, H, W) -> (B, D, L)."""
    B, K, D, H, W = ys.shape
    y = ys.view(B, K, D, -1)
    y = y[:, 0:2] + y[:, 2:4].flip(dims=[-1]).view(B, 2, D, -1)
    return y[:, 0] + y[:, 1].view(B, -1, W, H).transpose(2, 3).contiguous().view(B, D, -1)


def ref_selective_scan(u, delta, A, Bs, Cs, Ds, delta_bias):
    """csms6s selective_scan_torch (the official scan's definition): u, delta (B, K*D, L) stacked by
    direction; A (K*D, N); Bs, Cs (B, K, N, L), one per direction, shared by its D channels."""
    Bsz, K, N, L = Bs.shape
    KD = u.shape[1]
    delta = F.softplus(delta + delta_bias[..., None])
    Bx = Bs.view(Bsz, K, 1, N, L).repeat(1, 1, KD // K, 1, 1).view(Bsz, KD, N, L)
    Cx = Cs.view(Bsz, K, 1, N, L).repeat(1, 1, KD // K, 1, 1).view(Bsz, KD, N, L)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    dBu = torch.einsum("bdl,bdnl,bdl->bdln", delta, Bx, u)
    h = A.new_zeros(Bsz, KD, N)
    ys = []
    for i in range(L):
        h = dA[:, :, i] * h + dBu[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", h, Cx[:, :, :, i]))
    return torch.stack(ys, dim=2) + u * Ds.unsqueeze(-1)


def ref_ss2d(sd, p, x, cfg: VMambaConfig):
    """SS2D.forwardv2 + forward_corev2 (v05: no_einsum, cross2d), channel-first: (B, C, H, W) -> same."""
    x = ref_linear2d(x, sd[p + "in_proj.weight"])
    if cfg.gate:
        x, z = x.chunk(2, dim=1)
        z = F.silu(z)
    D = x.shape[1]
    x = F.silu(F.conv2d(x, sd[p + "conv2d.weight"], sd.get(p + "conv2d.bias"), padding=(cfg.d_conv - 1) // 2, groups=D))
    B, _, H, W = x.shape
    L, K, N = H * W, 4, cfg.d_state
    R = sd[p + "dt_projs_weight"].shape[-1]
    xs = ref_cross_scan(x)
    x_dbl = F.conv1d(xs.view(B, -1, L), sd[p + "x_proj_weight"].view(-1, D, 1), groups=K)
    dts, Bs, Cs = torch.split(x_dbl.view(B, K, -1, L), [R, N, N], dim=2)
    dts = F.conv1d(dts.contiguous().view(B, -1, L), sd[p + "dt_projs_weight"].view(K * D, -1, 1), groups=K)
    ys = ref_selective_scan(xs.view(B, -1, L), dts.view(B, -1, L), -sd[p + "A_logs"].float().exp(), Bs.contiguous(),
                            Cs.contiguous(), sd[p + "Ds"].float(), sd[p + "dt_projs_bias"].view(-1).float())
    y = ref_cross_merge(ys.view(B, K, -1, H, W)).view(B, -1, H, W)
    y = ref_ln2d(y, sd[p + "out_norm.weight"], sd[p + "out_norm.bias"])
    if cfg.gate:
        y = y * z
    return ref_linear2d(y, sd[p + "out_proj.weight"])


def ref_vssm(sd, cfg: VMambaConfig, x):
    """VSSM.forward with norm_layer ln2d (channel_first): patch embed, stages, classifier."""
    s = cfg.patch_size // 2
    if cfg.patch_embed == "v2":
        x = F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=s, padding=1)
        x = F.gelu(ref_ln2d(x, sd["patch_embed.2.weight"], sd["patch_embed.2.bias"]))
        x = F.conv2d(x, sd["patch_embed.5.weight"], sd["patch_embed.5.bias"], stride=s, padding=1)
        x = ref_ln2d(x, sd["patch_embed.7.weight"], sd["patch_embed.7.bias"])
    else:
        x = F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=cfg.patch_size)
        x = ref_ln2d(x, sd["patch_embed.2.weight"], sd["patch_embed.2.bias"])
    for i, depth in enumerate(cfg.depths):
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            x = x + ref_ss2d(sd, b + "op.", ref_ln2d(x, sd[b + "norm.weight"], sd[b + "norm.bias"]), cfg)
            if cfg.mlp_ratio > 0:
                h = ref_ln2d(x, sd[b + "norm2.weight"], sd[b + "norm2.bias"])
                h = F.gelu(ref_linear2d(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
                x = x + ref_linear2d(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        d = f"layers.{i}.downsample."
        if i + 1 == cfg.num_stages:
            break
        if cfg.downsample == "v1":  # PatchMerging2D, channel-first
            H, W = x.shape[-2:]
            x = F.pad(x, (0, W % 2, 0, H % 2))
            x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], 1)
            x = ref_linear2d(ref_ln2d(x, sd[d + "norm.weight"], sd[d + "norm.bias"]), sd[d + "reduction.weight"])
        else:
            kw = dict(stride=2) if cfg.downsample == "v2" else dict(stride=2, padding=1)
            x = ref_ln2d(F.conv2d(x, sd[d + "1.weight"], sd[d + "1.bias"], **kw), sd[d + "3.weight"], sd[d + "3.bias"])
    x = ref_ln2d(x, sd["classifier.norm.weight"], sd["classifier.norm.bias"])
    return F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), sd["classifier.head.weight"], sd["classifier.head.bias"])


def randomise_(model: VSSM, seed: int = 0) -> VSSM:
    """Make every parameter matter: unit-gain linears (the official init's std 0.02 leaves the branches
    near zero), random A, D, dt biases, norms and biases (the init has A = -1..-N, D = 1, norms 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_logs":
                p.copy_(0.5 * r)
            elif leaf == "Ds" or (leaf == "weight" and p.dim() == 1):  # D skip, norm weights
                p.copy_(1 + 0.3 * r)
            elif leaf in ("bias", "dt_projs_bias"):
                p.copy_(0.2 * r)
            elif leaf == "dt_projs_weight" or p.dim() == 2 or leaf == "x_proj_weight":
                p.copy_(r / math.sqrt(p.shape[-1]))
    return model.eval()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = LOGIT_RTOL) -> float:
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err <= rtol, f"logits differ by {err:.2e} of max |ref| (allowed {rtol:.0e})"
    return err


def test_official_scan_is_our_reference_per_direction(one_thread):
    """The official grouped scan on K*D stacked channels = our selective_scan_ref on each direction."""
    torch.manual_seed(0)
    B, K, D, N, L = 2, 4, 5, 3, 11
    u, delta = torch.randn(B, K * D, L), torch.randn(B, K * D, L)
    A, Bs, Cs = -torch.rand(K * D, N) - 0.1, torch.randn(B, K, N, L), torch.randn(B, K, N, L)
    Ds, bias = torch.randn(K * D), torch.randn(K * D)
    ref = ref_selective_scan(u, delta, A, Bs, Cs, Ds, bias).view(B, K, D, L)
    for k in range(K):
        sl = slice(k * D, (k + 1) * D)
        ours = selective_scan_ref(u[:, sl].mT, (delta[:, sl] + bias[sl, None]).mT, A[sl], Bs[:, k].mT, Cs[:, k].mT, Ds[sl])
        torch.testing.assert_close(ours, ref[:, k].mT, atol=FP32_ATOL, rtol=FP32_RTOL)


def _mixer(cfg: VMambaConfig, stage: int = 0, seed: int = 0) -> tuple[SS2D, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = randomise_(VSSM(cfg), seed)
    blk = model.layers[stage].blocks[0]
    return blk.op, {k[len(f"layers.{stage}.blocks.0.op."):]: v for k, v in model.state_dict().items()
                    if k.startswith(f"layers.{stage}.blocks.0.op.")}


@pytest.mark.parametrize("cfg", [SMALL, VARIANT], ids=["noz", "gate-convbias"])
@pytest.mark.parametrize("H,W", [(1, 1), (1, 6), (5, 1), (3, 5), (6, 4), (7, 7)])
def test_ss2d_matches_official_cross_scan(one_thread, cfg, H, W):
    """Our directions (views + one transposed copy, reverse=True instead of flips, merge back by
    transpose) equal cross_scan -> grouped scan -> cross_merge on random inputs, square or not."""
    m, sd = _mixer(cfg)
    x = torch.randn(2, H, W, m.d_model)
    with torch.no_grad():
        ours = m(x)
        ref = ref_ss2d(sd, "", x.permute(0, 3, 1, 2), cfg).permute(0, 2, 3, 1)
    torch.testing.assert_close(ours, ref, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("swap", [(0, 2), (1, 3), (0, 1)], ids=["row-fwd/bwd", "col-fwd/bwd", "row/col"])
def test_direction_parameters_matter(one_thread, swap):
    """Guard for the equivalence test: swapping two directions' parameters changes the output, so a
    model that mixed up the directions' parameters or orders would fail it."""
    m, sd = _mixer(SMALL)
    x = torch.randn(1, 4, 5, m.d_model)
    with torch.no_grad():
        ref = ref_ss2d(sd, "", x.permute(0, 3, 1, 2), SMALL).permute(0, 2, 3, 1)
        a, b = swap
        for name in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias"):
            t = getattr(m, name)
            t[[a, b]] = t[[b, a]].clone()
        assert (m(x) - ref).abs().max() > 1e-3


def test_scan_operands_follow_each_directions_order(one_thread):
    """What ops.scan receives: row directions on the row-major tokens, column directions on the
    column-major ones (direction_order), reverse flags as DIRECTIONS; u is shared, not copied per direction."""
    m, _ = _mixer(SMALL)
    seen: dict[str, tuple] = {}

    def scan(direction, inputs):
        seen[direction] = inputs
        d = next(d for d in DIRECTIONS if d.name == direction)
        return selective_scan_ref(*inputs, reverse=d.reverse)

    m.ops = MixerOps(scan=scan)
    H, W = 3, 4
    with torch.no_grad():
        m(torch.randn(2, H, W, m.d_model))
    assert list(seen) == ["row_fwd", "col_fwd", "row_bwd", "col_bwd"]
    u_row, u_col = seen["row_fwd"].u, seen["col_fwd"].u
    assert torch.equal(u_col, u_row[:, direction_order("col_fwd", H, W)])
    assert torch.equal(direction_order("row_bwd", H, W), torch.arange(H * W))
    assert seen["row_bwd"].u is u_row and seen["col_bwd"].u is u_col  # the reversed directions reuse the layout
    assert direction_order("col_bwd", H, W).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    for d in DIRECTIONS:
        assert seen[d.name].z is None and seen[d.name].A.shape == (m.d_inner, SMALL.d_state)
    with pytest.raises(ValueError, match="unknown VMamba scan direction 'fwd'"):
        direction_order("fwd", H, W)


def test_every_linear_goes_through_ops(one_thread):
    """Names and modules given to ops.linear: in_proj, x_proj_k / dt_proj_k (views of the official
    stacked Parameters), out_proj, fc1, fc2; replacing one direction's projection changes only it."""
    torch.manual_seed(0)
    model = randomise_(VSSM(SMALL))
    blk = model.layers[0].blocks[0]
    calls: list[tuple[str, object]] = []

    def linear(name, module, x):
        calls.append((name, module))
        return F.linear(x, module.weight, module.bias)

    blk.op.ops = MixerOps(linear=linear)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    names = [n for n, _ in calls]
    assert names == ["in_proj", "x_proj_0", "dt_proj_0", "x_proj_1", "dt_proj_1", "x_proj_2", "dt_proj_2",
                     "x_proj_3", "dt_proj_3", "out_proj", "fc1", "fc2"]
    assert {n: m for n, m in calls} == blk.linears()
    xp = blk.op.x_proj[3]
    assert isinstance(xp, StackedLinear) and xp.bias is None
    assert xp.weight.data_ptr() == blk.op.x_proj_weight[3].data_ptr() and xp.weight._base is blk.op.x_proj_weight
    assert torch.equal(blk.op.dt_proj[1].bias, blk.op.dt_projs_bias[1]) and (xp.in_features, xp.out_features) == (32, 1 + 4)

    def zero_one(name, module, x):
        w = torch.zeros_like(module.weight) if name == "x_proj_1" else module.weight
        return F.linear(x, w, module.bias)

    blk.op.ops = MixerOps(linear=zero_one)
    with torch.no_grad():
        assert (model(x) - ref).abs().max() > 1e-4


def test_stacked_linear_gradients_reach_the_official_parameter():
    m, _ = _mixer(SMALL)
    m(torch.randn(1, 2, 3, m.d_model)).sum().backward()
    for name in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"):
        g = getattr(m, name).grad
        assert g is not None and all(g[k].abs().sum() > 0 for k in range(4)), name


@pytest.mark.parametrize("cfg", [SMALL, VARIANT], ids=["small", "variant"])
def test_model_matches_official_small(one_thread, cfg):
    torch.manual_seed(1)
    model = randomise_(VSSM(cfg), seed=1)
    x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    sizes = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda mod, args: sizes.append(tuple(args[0].shape[1:3])))
    with torch.no_grad():
        assert_logits_close(model(x), ref_vssm(model.state_dict(), cfg, x))
    assert sizes == [(g, g) for g in cfg.grids]


@pytest.mark.parametrize("arch", ["vmamba_tiny", "vmamba_small", pytest.param("vmamba_base", marks=pytest.mark.slow)])
def test_released_logits_match_official(one_thread, arch):
    """Random-weight checkpoint of a released architecture: our loader (config inferred from the keys)
    and forward vs the literal official forward on the same state_dict, one 224 x 224 image."""
    torch.manual_seed(0)
    sd = randomise_(VSSM(VMAMBA_ARCHS[arch])).state_dict()
    model = load_vmamba_state_dict(sd)
    assert model.cfg == VMAMBA_ARCHS[arch]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_logits_close(model(x), ref_vssm(sd, model.cfg, x))


def test_input_shape_error():
    with torch.device("meta"):
        m = VSSM(SMALL)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\), got \(1, 3, 28, 28\)"):
        m(torch.zeros(1, 3, 28, 28, device="meta"))


# ------------------------------------------------------------------------- tools/make_official_ckpt.py
def _load_tool(name: str):
    """A script under tools/ as a module (tests/tools/scripts.py)."""
    from tools.scripts import repo_tool

    return repo_tool(name)


def _tool():
    return _load_tool("make_official_ckpt")


# utils/utils.py save_checkpoint_ema of MzeroMiko/VMamba (with EMA, as main.py trains by default)
OFFICIAL_TRAINING_KEYS = {"model", "optimizer", "lr_scheduler", "max_accuracy", "scaler", "epoch", "config",
                          "model_ema", "max_accuray_ema"}


def test_tool_writes_released_arch(tmp_path):
    out = tmp_path / "vmamba_tiny.pth"
    _tool().main(["vmamba_tiny", "-o", str(out)])
    obj = torch.load(out, map_location="cpu", weights_only=True)
    assert set(obj) == {"model"}
    assert shapes(obj["model"]) == official_keys(VMAMBA_ARCHS["vmamba_tiny"])
    assert load_vmamba_state_dict(obj["model"]).cfg == VMAMBA_ARCHS["vmamba_tiny"]


def test_tool_full_training_dict(tmp_path):
    """The full dict: its `config` is pickled as yacs.config.CfgNode (a dict subclass), which a plain
    weights_only load refuses; read as an OrderedDict (allow-listed under that name) it loads safely."""
    from collections import OrderedDict

    tool = _tool()
    path = tmp_path / "full.pth"
    torch.save(tool.vmamba_checkpoint(SMALL, "full"), path)
    with pytest.raises(Exception, match="yacs.config.CfgNode"):
        torch.load(path, map_location="cpu", weights_only=True)

    class CfgNodeAsOrderedDict:
        def __new__(cls, *args):
            return OrderedDict()

    with torch.serialization.safe_globals([(CfgNodeAsOrderedDict, "yacs.config.CfgNode")]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    assert set(obj) == OFFICIAL_TRAINING_KEYS
    assert obj["config"]["MODEL"]["VSSM"]["SSM_FORWARDTYPE"] == "v05_noz" and obj["config"]["MODEL"]["VSSM"]["DEPTHS"] == [1, 2, 1]
    n_params = len(list(VSSM(SMALL).parameters()))
    assert len(obj["optimizer"]["state"]) == n_params and {"exp_avg", "exp_avg_sq", "step"} <= set(obj["optimizer"]["state"][0])
    for key in ("model", "model_ema"):
        assert load_vmamba_state_dict(obj[key], img_size=32).cfg.depths == (1, 2, 1)
    assert all(torch.equal(obj["model"][k], obj["model_ema"][k]) for k in obj["model"])


# ------------------------------------------------------------------------- the VMamba demo model
DEMO_TARGET_TOP1 = 95.0  # as the Vim demo (issue 3)
DEMO_MAX_BYTES = 5 * 1024 * 1024


def _demo_files():
    from pathlib import Path

    import ouro.calib

    root = Path(ouro.calib.__file__).resolve().parent / "demo"
    return root / "vmamba_demo.pth", root / "vmamba_demo.json"


def test_vmamba_demo_checkpoint_and_card(one_thread):
    """The shipped demo: official format, architecture inferred from its keys = the card's, and the FP
    test top-1 the card reports, measured again here."""
    import json

    from ouro.calib.data import SPLIT_SIZES, evaluate_top1, load_digits_split

    ckpt, card_path = _demo_files()
    card = json.loads(card_path.read_text())
    assert ckpt.stat().st_size < DEMO_MAX_BYTES
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(obj) == {"model"}
    cfg = VMambaConfig(**card["config"])
    model = load_vmamba_state_dict(obj["model"], img_size=cfg.img_size)
    assert VMambaConfig(**{**model.cfg.to_dict(), "name": cfg.name}) == cfg
    assert cfg.forward_type == "v05_noz" and cfg.d_state == 1 and (cfg.patch_embed, cfg.downsample) == ("v2", "v3")
    x, y = load_digits_split("test")
    top1 = evaluate_top1(model, x, y, progress=False)
    assert abs(top1 - card["fp_test_top1"]) <= 100.0 / SPLIT_SIZES["test"] + 1e-9
    assert top1 >= DEMO_TARGET_TOP1


def test_train_demo_families():
    """tools/train_demo.py: one loop, a DemoFamily per family; the Vim demo's config is still the shipped one."""
    import json

    td = _load_tool("train_demo")
    assert {"vim", "vmamba"} <= set(td.FAMILIES)
    vim, vmamba = td.FAMILIES["vim"](), td.FAMILIES["vmamba"]()
    from ouro.calib.data import demo_card

    assert vim.config.to_dict() == demo_card()["config"]
    assert vmamba.config.to_dict() == json.loads(_demo_files()[1].read_text())["config"]
    model = vmamba.build()
    groups = td.param_groups(model, 0.05, vmamba.no_decay)
    no_decay = {id(p) for p in groups[1]["params"]}
    named = dict(model.named_parameters())
    assert id(named["layers.0.blocks.0.op.Ds"]) in no_decay and id(named["classifier.head.bias"]) in no_decay
    assert id(named["layers.0.blocks.0.op.A_logs"]) not in no_decay  # 2-D: decayed, as VMamba's set_weight_decay
