"""OuroMamba-Gen: implicit attention (fast vs loop), neighbourhood state and CLS handling, losses,
the optimisation loop on a tiny random-weight Vim, storage and the `gen` CLI entry."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ouro.calib.gen import (
    GenConfig,
    contrastive_loss,
    gen_losses,
    gen_losses_ref,
    generate,
    implicit_attention,
    implicit_attention_ref,
    load_synthetic_dir,
    neighbourhood_state,
    neighbourhood_weights,
    record_scans,
    save_synthetic_dir,
)
from ouro.calib.gen.attention import effective_topk, neighbourhood_mask, patch_token_index
from ouro.calib.models.vim import VimConfig, VisionMamba
from ouro.calib.scan import selective_scan_ref

ATTN_ATOL = 1e-5  # fp32 attention entries of magnitude ~10: fast cumulative form vs product loop
ATTN_RTOL = 1e-5
STATE_ATOL = 1e-5  # box filter vs explicit neighbourhood loop
LOGIT_ATOL = 1e-5  # checkpointed gen forward vs model.forward
TINY = VimConfig(embed_dim=32, depth=2, img_size=32, patch_size=8, stride=8, num_classes=10)  # 4x4 grid, CLS at 8
TINY_MEAN, TINY_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


pytestmark = pytest.mark.usefixtures("one_thread")


def _ssm(B=2, grid=3, D=5, S=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = grid * grid + 1
    dt = F.softplus(torch.randn(B, L, D, generator=g))
    A = -torch.exp(torch.randn(D, S, generator=g))
    Bm, Cm = torch.randn(B, L, S, generator=g), torch.randn(B, L, S, generator=g)
    u = torch.randn(B, L, D, generator=g)
    return dt, A, Bm, Cm, u


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return VisionMamba(TINY).eval()


# ------------------------------------------------------------------------------ implicit attention
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("method", ["factored", "direct"])
@pytest.mark.parametrize("chunk_elems", [1, 50, 1 << 20])  # 1 channel per chunk, a few, all at once
def test_implicit_attention_fast_equals_loop(reverse, method, chunk_elems):
    dt, A, Bm, Cm, _ = _ssm()
    ref = implicit_attention_ref(dt, A, Bm, Cm, reverse=reverse)
    kw = dict(reverse=reverse, method=method, chunk_elems=chunk_elems)
    fast = implicit_attention(dt, A, Bm, Cm, channel_mean=False, **kw)
    torch.testing.assert_close(fast, ref, atol=ATTN_ATOL, rtol=ATTN_RTOL)
    mean = implicit_attention(dt, A, Bm, Cm, **kw)
    torch.testing.assert_close(mean, ref.mean(1), atol=ATTN_ATOL, rtol=ATTN_RTOL)
    # causal structure: forward attends to s <= t, reverse to s >= t
    strict = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)
    assert ref[..., strict.T if reverse else strict].abs().max() == 0


@pytest.mark.parametrize("reverse", [False, True])
def test_implicit_attention_reproduces_the_scan(reverse):
    """y_t = sum_s alpha[t, s] u_s (the scan without D and gate)."""
    dt, A, Bm, Cm, u = _ssm(seed=1)
    alpha = implicit_attention(dt, A, Bm, Cm, reverse=reverse, channel_mean=False)
    y = selective_scan_ref(u, dt, A, Bm, Cm, delta_softplus=False, reverse=reverse)
    torch.testing.assert_close(torch.einsum("bdts,bsd->btd", alpha, u), y, atol=ATTN_ATOL, rtol=ATTN_RTOL)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("p", [1, 3, 5])
def test_enhanced_attention_is_the_attention_of_h_p(reverse, p):
    """C_t . h_p(t) = sum_s alpha_p[t, s] u_s, with h_p built from the scan's real states."""
    grid, cls = 3, 4
    dt, A, Bm, Cm, u = _ssm(seed=2)
    _, st = selective_scan_ref(u, dt, A, Bm, Cm, delta_softplus=False, reverse=reverse, return_states=True)
    hp = neighbourhood_state(st.h, dt, grid, cls, p)
    rows = patch_token_index(grid, cls)
    W = neighbourhood_weights(dt, grid, cls, p)
    ap = implicit_attention(dt, A, Bm, Cm, reverse=reverse, mix=W, rows=rows, channel_mean=False, chunk_elems=40)
    yp = torch.einsum("btds,bts->btd", hp[:, rows], Cm[:, rows])
    torch.testing.assert_close(torch.einsum("bdts,bsd->btd", ap, u), yp, atol=1e-4, rtol=1e-4)
    apm = implicit_attention(dt, A, Bm, Cm, reverse=reverse, mix=W, rows=rows)
    torch.testing.assert_close(apm, ap.mean(1), atol=ATTN_ATOL, rtol=ATTN_RTOL)


@pytest.mark.parametrize("reverse", [False, True])
def test_implicit_attention_large_decay_uses_every_tier(reverse):
    """Channels with a long cumulative decay leave the float32 (|A dc| > 80) and float64 (> 600)
    factored forms for the direct one; the results stay finite and equal the loop."""
    dt, A, Bm, Cm, _ = _ssm(D=6, seed=4)
    dt = dt * torch.tensor([0.1, 1.0, 30.0, 60.0, 200.0, 400.0])  # per channel: spans all three tiers
    A = A.clamp(max=-0.5)
    ref = implicit_attention_ref(dt, A, Bm, Cm, reverse=reverse)
    x = dt.clone().requires_grad_(True)
    got = implicit_attention(x, A, Bm, Cm, reverse=reverse, channel_mean=False)
    torch.testing.assert_close(got, ref, atol=ATTN_ATOL, rtol=ATTN_RTOL)
    got.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(implicit_attention(dt, A, Bm, Cm, reverse=reverse), ref.mean(1), atol=ATTN_ATOL, rtol=ATTN_RTOL)


def test_implicit_attention_is_differentiable_with_checkpointing():
    dt, A, Bm, Cm, _ = _ssm(seed=3)
    grads = []
    for ck in (False, True):
        x = dt.clone().requires_grad_(True)
        implicit_attention(x, A, Bm, Cm, chunk_elems=60, use_checkpoint=ck).pow(2).sum().backward()
        grads.append(x.grad)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[1], grads[0])


def test_implicit_attention_shape_errors_name_the_sizes():
    dt, A, Bm, Cm, _ = _ssm()
    with pytest.raises(ValueError, match=r"A \(D=5"):
        implicit_attention(dt, A[:3], Bm, Cm)
    with pytest.raises(ValueError, match="mix and rows"):
        implicit_attention(dt, A, Bm, Cm, mix=torch.zeros(2, 9, 10))
    with pytest.raises(ValueError, match="factored, direct"):
        implicit_attention(dt, A, Bm, Cm, method="fft")


# ------------------------------------------------------------------------- neighbourhood and CLS
def _loop_state(h, dt, grid, cls, p):
    tok = patch_token_index(grid, cls)
    w = dt.mean(-1)
    out = h.clone()
    for i in range(grid * grid):
        acc = torch.zeros_like(h[:, 0])
        for j in range(grid * grid):
            if abs(i // grid - j // grid) <= p // 2 and abs(i % grid - j % grid) <= p // 2:
                acc += w[:, tok[j], None, None] * h[:, tok[j]]
        out[:, tok[i]] = acc
    return out


@pytest.mark.parametrize("grid,cls", [(4, 8), (4, 0), (4, 16), (3, 4)])
@pytest.mark.parametrize("p", [1, 3, 5])
def test_neighbourhood_state_matches_loop_and_skips_cls(grid, cls, p):
    g = torch.Generator().manual_seed(grid + cls + p)
    L, D, S = grid * grid + 1, 3, 2
    h = torch.randn(2, L, D, S, generator=g, requires_grad=True)
    dt = F.softplus(torch.randn(2, L, D, generator=g))
    hp = neighbourhood_state(h, dt, grid, cls, p)
    torch.testing.assert_close(hp, _loop_state(h.detach(), dt, grid, cls, p), atol=STATE_ATOL, rtol=STATE_ATOL)
    assert torch.equal(hp[:, cls], h[:, cls])  # CLS row unchanged
    # CLS is never a neighbour: its state reaches no patch
    rows = patch_token_index(grid, cls)
    (gh,) = torch.autograd.grad(hp[:, rows].sum(), h)
    assert gh[:, cls].abs().max() == 0


def test_neighbourhood_window_counts_and_weights():
    m = neighbourhood_mask(4, 3)
    counts = m.sum(1).view(4, 4)
    assert counts[0, 0] == 4 and counts[0, 1] == 6 and counts[1, 1] == 9  # corner, edge, interior
    assert neighbourhood_mask(4, 5).sum(1).view(4, 4)[1, 1] == 16 and neighbourhood_mask(4, 1).sum() == 16
    dt = F.softplus(torch.randn(2, 17, 6))
    W = neighbourhood_weights(dt, 4, 8, 3)
    assert W.shape == (2, 16, 17)
    assert W[:, :, 8].abs().max() == 0  # CLS column (token 8)
    # patch 8 on the grid (row 2, col 0) is token 9; its own weight is mean_d dt of token 9
    torch.testing.assert_close(W[:, 8, 9], dt[:, 9].mean(-1))
    assert W[:, 8, 3].abs().max() == 0  # token 3 = patch (0, 3): outside the 3x3 window of (2, 0)
    with pytest.raises(ValueError, match="odd"):
        neighbourhood_mask(4, 4)
    with pytest.raises(ValueError, match="4x4 patch grid"):
        neighbourhood_weights(dt[:, :16], 4, 8, 3)


# ---------------------------------------------------------------------------------- contrastive
def test_contrastive_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 6, 5, generator=g)
    tau, k = 0.3, 2
    got = contrastive_loss(f, k, tau)
    fn = F.normalize(f[0], dim=-1)
    sim = fn @ fn.T
    losses = []
    for t in range(6):
        others = [s for s in range(6) if s != t]
        pos = sorted(others, key=lambda s: -sim[t, s])[:k]
        num = sum(torch.exp(sim[t, s] / tau) for s in pos)
        den = sum(torch.exp(sim[t, s] / tau) for s in others)
        losses.append(-torch.log(num / den))
    torch.testing.assert_close(got, torch.stack(losses).mean().view(1))
    with pytest.raises(ValueError, match="negatives"):
        contrastive_loss(f, 5, tau)
    assert effective_topk(12, 196) == 12 and effective_topk(12, 16) == 3


# ------------------------------------------------------------------------- instrumented forward
def test_record_scans_exposes_states_and_restores_the_fast_path():
    model = _tiny_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = model(x)
        with record_scans(model, states=True) as recs:
            y1 = model(x)
    assert [(r.layer, r.direction) for r in recs] == [(0, "fwd"), (0, "bwd"), (1, "fwd"), (1, "bwd")]
    assert recs[0].h.shape == (2, 17, 64, 16) and recs[0].dt.shape == (2, 17, 64)
    assert all(b.mixer.ops.scan is None for b in model.layers)
    torch.testing.assert_close(y1, y0, atol=LOGIT_ATOL, rtol=LOGIT_ATOL)
    # reverse states: the first token's state has seen the whole sequence, the last only itself
    r = recs[1]
    h_last = r.dt[:, -1, :, None] * r.Bm[:, -1, None, :] * r.u[:, -1, :, None]
    torch.testing.assert_close(r.h[:, -1], h_last)


def test_gen_forward_matches_model_forward():
    model = _tiny_model()
    x = torch.randn(3, 3, 32, 32)
    cfg = GenConfig(mean=TINY_MEAN, std=TINY_STD)
    lc, lo, logits = gen_losses(model, x, torch.tensor([0, 1, 2]), cfg)
    torch.testing.assert_close(logits, model(x), atol=LOGIT_ATOL, rtol=LOGIT_ATOL)
    assert lc.shape == lo.shape == (3,) and torch.isfinite(lc).all()
    lcr, lor, logits_r = gen_losses_ref(model, x, torch.tensor([0, 1, 2]), cfg)
    torch.testing.assert_close(logits_r, model(x), atol=LOGIT_ATOL, rtol=LOGIT_ATOL)


# ------------------------------------------------------------------------------ optimisation loop
def test_loss_decreases_and_images_are_finite_and_in_range():
    model = _tiny_model()
    cfg = GenConfig(iterations=12, lr=0.1, batch_size=2, mean=TINY_MEAN, std=TINY_STD)
    res = generate(model, 3, seed=0, config=cfg, progress=False)
    first, last = res.history[0], res.history[-1]
    assert last["L"] < 0.8 * first["L"], (first, last)
    assert last["LO"] < first["LO"] and last["LC"] < first["LC"]
    x = res.images
    assert x.shape == (3, 3, 32, 32) and torch.isfinite(x).all()
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert x.min() >= lo and x.max() <= hi
    assert not any(p.requires_grad is False for p in model.parameters())  # parameters restored


def test_generation_is_deterministic_under_seed():
    model = _tiny_model()
    cfg = GenConfig(iterations=2, batch_size=2, mean=TINY_MEAN, std=TINY_STD)
    a = generate(model, 3, seed=7, config=cfg, progress=False)
    b = generate(model, 3, seed=7, config=cfg, progress=False)
    c = generate(model, 3, seed=8, config=cfg, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)


def test_loss_weights_select_terms():
    model = _tiny_model()
    x = torch.randn(2, 3, 32, 32)
    lc, _, _ = gen_losses(model, x, torch.tensor([0, 1]), GenConfig(w_contrastive=0.0, mean=TINY_MEAN, std=TINY_STD))
    assert lc.abs().max() == 0  # L^C is skipped entirely when its weight is 0
    noise = generate(model, 2, 0, GenConfig(iterations=0, mean=TINY_MEAN, std=TINY_STD), progress=False)
    assert noise.images.shape == (2, 3, 32, 32) and noise.history == []


# ---------------------------------------------------------------------------------------- storage
def test_save_and_load_synthetic_dir(tmp_path):
    model = _tiny_model()
    res = generate(model, 3, 0, GenConfig(iterations=1, mean=TINY_MEAN, std=TINY_STD), progress=False)
    out = save_synthetic_dir(res, tmp_path / "synth")
    assert sorted(p.name for p in out.iterdir()) == ["images.npz", "img_00000.png", "img_00001.png", "img_00002.png"]
    assert torch.equal(load_synthetic_dir(out), res.images)
    (out / "images.npz").unlink()
    from_png = load_synthetic_dir(out, mean=TINY_MEAN, std=TINY_STD)
    assert (from_png - res.images).abs().max() <= 0.5 / 255 / 0.25 + 1e-6  # 8-bit PNG rounding
    with pytest.raises(FileExistsError, match="--force"):
        save_synthetic_dir(res, out)
    with pytest.raises(ValueError, match="mean and std"):
        load_synthetic_dir(out)
    with pytest.raises(FileNotFoundError):
        load_synthetic_dir(tmp_path / "missing")


def test_config_validation_and_toml(tmp_path):
    with pytest.raises(ValueError, match="odd"):
        GenConfig(neighbourhood=4)
    with pytest.raises(ValueError, match="tau"):
        GenConfig(tau=0)
    f = tmp_path / "gen.toml"
    f.write_text("[gen]\niterations = 7\ntau = 0.5\nmean = [0.5]\nstd = [0.5]\n")
    cfg = GenConfig.from_toml(f)
    assert cfg.iterations == 7 and cfg.tau == 0.5 and cfg.mean == (0.5,) and cfg.lr == GenConfig().lr
    f.write_text("iterationz = 7\n")
    with pytest.raises(ValueError, match="iterationz"):
        GenConfig.from_toml(f)


def test_gen_main_writes_folder_resumes_and_refuses_another_run(tmp_path):
    from ouro.calib.gen import GenFolderError
    import dataclasses

    from ouro.calib.gen.cli import GenRequest, gen_config, gen_main

    cfgf = tmp_path / "gen.toml"
    cfgf.write_text("iterations = 1\nbatch_size = 2\nmean = [0.5]\nstd = [0.25]\n")
    args = GenRequest(num_images=2, output=tmp_path / "out", config=gen_config(str(cfgf)))
    assert gen_main(_tiny_model(), args) == 0
    with np.load(tmp_path / "out" / "images.npz") as z:
        assert z["images"].shape == (2, 3, 32, 32) and z["targets"].shape == (2,)
    assert gen_main(_tiny_model(), args) == 0  # the same run again: already complete, nothing rewritten
    with pytest.raises(GenFolderError, match="another generation run.*seed"):
        gen_main(_tiny_model(), dataclasses.replace(args, seed=1))
    assert gen_main(_tiny_model(), dataclasses.replace(args, seed=1, force=True)) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(GenFolderError, match="not empty"):
        gen_main(_tiny_model(), dataclasses.replace(args, output=tmp_path / "other"))


def test_checkpointing_is_automatic_by_activation_size():
    from ouro.calib.gen.losses import Checkpointing, checkpointing, use_checkpoint
    from ouro.calib.models.vim import ARCHS

    class _M:  # only .cfg is read
        def __init__(self, cfg):
            self.cfg = cfg

    assert checkpointing(_M(TINY), 16, GenConfig()) == Checkpointing(False, False)
    assert checkpointing(_M(ARCHS["vim_small"]), 8, GenConfig()) == Checkpointing(False, True)  # the readout only
    assert checkpointing(_M(ARCHS["vim_small"]), 16, GenConfig()) == Checkpointing(True, True)
    assert checkpointing(_M(TINY), 16, GenConfig(checkpoint=True)) == Checkpointing(True, True)
    assert not use_checkpoint(_M(ARCHS["vim_small"]), 16, GenConfig(checkpoint=False))
    assert use_checkpoint(_M(ARCHS["vim_small"]), 16, GenConfig(), ref=True)
