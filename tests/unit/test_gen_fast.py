"""OuroMamba-Gen's fast path vs its twins, and runs that survive interruption.

features.state_attention (blocked factorisation, factored backward) vs state_attention_ref (one exp
per pair); features.enhanced_rows vs the dense neighbour matrix; gen_losses vs gen_losses_ref (the
previous implementation); per-image seeding; resuming an interrupted `gen` folder; Ctrl-C.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ouro.calib.gen import (
    GenConfig,
    enhanced_attention,
    gen_losses,
    gen_losses_ref,
    generate,
    generate_to_folder,
    implicit_attention,
    initial_images,
    neighbourhood_weights,
    state_attention,
    state_attention_ref,
)
from ouro.calib.gen import features as fe
from ouro.calib.gen.attention import patch_token_index
from ouro.calib.files import atomic_write
from ouro.calib.models.vim import VimConfig, VisionMamba
from tools.vim_checkpoints import TINY, write_checkpoint

E_ATOL = 2e-6  # E entries are O(1) sums of D positive fp32 terms; the _ref is fp64
E_RTOL = 1e-5
GRAD_ATOL = 1e-5
FEAT_RTOL = 1e-5  # enhanced rows: fast vs dense neighbour matrix / implicit_attention (fp32 both)
FEAT_ATOL = 1e-5
LOSS_RTOL = 1e-4  # the bar: L^C and L^O of gen_losses within 1e-4 relative of gen_losses_ref
XGRAD_RTOL = 1e-3  # d(L^C + L^O)/dx, fast vs _ref (per-element, relative to the largest)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

pytestmark = pytest.mark.usefixtures("one_thread")


def _dt(B=2, L=17, D=6, S=3, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = F.softplus(torch.randn(B, L, D, generator=g)) * scale
    A = -torch.exp(torch.randn(D, S, generator=g))
    return dt, A


# -------------------------------------------------------------------------------- state attention
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("block,channel_chunk", [(1, 6), (3, 2), (5, 4), (64, 6)])
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: long in-block decays, the sub-block pass runs
def test_state_attention_equals_ref_values_and_gradients(reverse, block, channel_chunk, scale):
    dt, A = _dt(scale=scale)
    x = dt.clone().requires_grad_(True)
    E = state_attention(x, A, reverse=reverse, block=block, channel_chunk=channel_chunk)
    xr = dt.double().clone().requires_grad_(True)
    Er = state_attention_ref(xr, A.double(), reverse=reverse)
    torch.testing.assert_close(E, Er.float(), atol=E_ATOL * scale, rtol=E_RTOL)
    g = torch.randn_like(E)
    (gx,) = torch.autograd.grad((E * g).sum(), x)
    (gr,) = torch.autograd.grad((Er * g.double()).sum(), xr)
    torch.testing.assert_close(gx, gr.float(), atol=GRAD_ATOL, rtol=E_RTOL * 10)


def test_sub_block_pass_is_exercised_and_exact():
    """With decays beyond DIAG_LIMIT inside a block, those (block, channel) pairs go to the sub-block pass."""
    dt, A = _dt(L=17, D=4, scale=50.0, seed=3)
    T, nb = fe.block_size(17, 8)
    c, dtD = fe._cumulative(dt, T, nb, 4)
    tab = fe._Chunk(c, dtD, A, ("test",))
    assert tab.unsafe, "the case must have in-block decays past the limit"
    E = torch.cat([fe._forward(dt[b:b + 1], A, T, nb, 4, 4) for b in range(2)])
    torch.testing.assert_close(E, state_attention_ref(dt, A), atol=E_ATOL * 50, rtol=E_RTOL)


def test_state_attention_refuses_bad_input():
    dt, A = _dt()
    with pytest.raises(ValueError, match=r"dt must be \(B, L, D\)"):
        state_attention(dt, A[:3])
    with pytest.raises(NotImplementedError, match="A must not require grad"):
        state_attention(dt, A.clone().requires_grad_(True))


# ------------------------------------------------------------------------------- enhanced features
@pytest.mark.parametrize("grid,cls,p", [(4, 8, 3), (4, 0, 5), (3, 4, 1), (5, 12, 3)])
def test_enhanced_rows_equal_the_dense_neighbour_matrix(grid, cls, p):
    L = grid * grid + 1
    dt, A = _dt(L=L, D=5, S=3, seed=grid + p)
    g = torch.Generator().manual_seed(1)
    Bm, Cm = torch.randn(2, L, 3, generator=g), torch.randn(2, L, 3, generator=g)
    E = state_attention_ref(dt, A)  # (B, S, L_k, L_s)
    W = neighbourhood_weights(dt, grid, cls, p)  # (B, P, L_k)
    tok = patch_token_index(grid, cls)
    dense = torch.einsum("btk,bnks,btn,bsn->bts", W, E, Cm[:, tok], Bm)
    torch.testing.assert_close(fe.enhanced_rows(E, dt, Bm, Cm, grid, cls, p), dense, atol=FEAT_ATOL, rtol=FEAT_RTOL)


@pytest.mark.parametrize("reverse", [False, True])
def test_enhanced_attention_equals_previous_implicit_attention(reverse):
    grid, cls, L = 4, 8, 17
    dt, A = _dt(L=L, D=7, S=4, seed=5)
    g = torch.Generator().manual_seed(2)
    Bm, Cm = torch.randn(2, L, 4, generator=g), torch.randn(2, L, 4, generator=g)
    rows = patch_token_index(grid, cls)
    old = implicit_attention(dt, A, Bm, Cm, reverse=reverse, mix=neighbourhood_weights(dt, grid, cls, 5), rows=rows)
    new = enhanced_attention(dt, A, Bm, Cm, reverse=reverse, grid=grid, cls_position=cls, p=5, block=5)
    torch.testing.assert_close(new, old, atol=FEAT_ATOL, rtol=FEAT_RTOL)


# ------------------------------------------------------------------------------------------ losses
def _model(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    return VisionMamba(cfg).eval()


@pytest.mark.parametrize("checkpoint", [False, True])
def test_gen_losses_equal_the_ref_within_1e4(checkpoint):
    model = _model(VimConfig(embed_dim=48, depth=3, img_size=40, patch_size=8, stride=8, num_classes=10))  # 5x5 grid
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = GenConfig(mean=MEAN, std=STD, checkpoint=checkpoint, attn_block=8)
    x0 = torch.randn(3, 3, 40, 40)
    t = torch.tensor([1, 4, 7])
    res = {}
    for name, fn in (("fast", gen_losses), ("ref", gen_losses_ref)):
        x = x0.clone().requires_grad_(True)
        lc, lo, logits = fn(model, x, t, cfg)
        (gx,) = torch.autograd.grad((lc + lo).sum(), x)
        res[name] = (lc.detach(), lo.detach(), logits.detach(), gx)
    (lc, lo, lg, gx), (lcr, lor, lgr, gxr) = res["fast"], res["ref"]
    torch.testing.assert_close(lc, lcr, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(lo, lor, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(lg, lgr, rtol=1e-5, atol=1e-5)
    assert (gx - gxr).abs().max() <= XGRAD_RTOL * gxr.abs().max()


# -------------------------------------------------------------------------------------- generation
def test_each_image_depends_only_on_seed_and_index():
    model = _model()
    cfg = GenConfig(iterations=2, batch_size=2, mean=MEAN, std=STD)
    x0, t0 = initial_images(model, [0, 1, 2], seed=5, init_std=1.0)
    x2, t2 = initial_images(model, [2], seed=5, init_std=1.0)
    assert torch.equal(x0[2:], x2) and torch.equal(t0[2:], t2)  # the start depends on (seed, index) only
    a = generate(model, 3, seed=5, config=cfg, progress=False)
    b = generate(model, 3, seed=5, config=cfg.replace(batch_size=1), progress=False)  # other mini-batches
    torch.testing.assert_close(a.images, b.images, atol=1e-4, rtol=1e-4)  # same optimisation per image
    c = generate(model, 3, seed=5, config=cfg, progress=False)
    assert torch.equal(a.images, c.images) and torch.equal(a.targets, c.targets)  # bitwise under the same partition


def test_resume_gives_the_uninterrupted_images(tmp_path):
    model = _model()
    cfg = GenConfig(iterations=2, batch_size=1, mean=MEAN, std=STD)
    ref, _ = generate_to_folder(model, 3, tmp_path / "ref", seed=2, config=cfg, progress=False)

    calls = []

    def stop_after_first(b, idx, x, t):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second mini-batch is being written

    from ouro.calib.gen import generate as gen_mod
    from ouro.calib.gen.storage import GenFolder

    real_write = GenFolder.write_batch

    def write_then_maybe_stop(self, b, idx, x, t):
        stop_after_first(b, idx, x, t)
        real_write(self, b, idx, x, t)

    GenFolder.write_batch = write_then_maybe_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_to_folder(model, 3, tmp_path / "run", seed=2, config=cfg, progress=False)
    finally:
        GenFolder.write_batch = real_write
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["batch_00000.npz", "gen.json", "img_00000.png"]  # nothing half-written, no images.npz
    res, resumed = generate_to_folder(model, 3, tmp_path / "run", seed=2, config=cfg, progress=False)
    assert resumed == 1
    assert torch.equal(res.images, ref.images) and torch.equal(res.targets, ref.targets)
    with np.load(tmp_path / "run" / "images.npz") as a, np.load(tmp_path / "ref" / "images.npz") as b:
        assert np.array_equal(a["images"], b["images"])
    assert not list((tmp_path / "run").glob("batch_*")) and not list((tmp_path / "run").glob(".*.tmp"))
    assert gen_mod is not None


def test_gen_files_writer_leaves_nothing_on_interrupt(tmp_path):
    """Gen's folder is written through the one atomic writer (ouro.calib.files.atomic_write)."""
    def writer(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.npz", writer)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_then_rerun_of_the_gen_command(tmp_path):
    """`ouro-export gen` interrupted by SIGINT after its first mini-batch, rerun: resumes, same images."""
    ckpt = write_checkpoint(tmp_path / "tiny.pth", TINY)
    (tmp_path / "g.toml").write_text("iterations = 40\nbatch_size = 1\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ouro.exporter.cli", "gen", str(ckpt), "-n", "3", "--config", str(tmp_path / "g.toml"), "--device", "cpu"]
    subprocess.run(cmd + ["-o", str(tmp_path / "ref")], check=True, env=env, capture_output=True, timeout=600)
    p = subprocess.Popen(cmd + ["-o", str(tmp_path / "run")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not (tmp_path / "run" / "batch_00000.npz").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err.decode()[-2000:]
    assert not (tmp_path / "run" / "images.npz").exists() and not list((tmp_path / "run").glob(".*.tmp"))
    r = subprocess.run(cmd + ["-o", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resumed after" in r.stdout, r.stdout + r.stderr[-2000:]
    with np.load(tmp_path / "run" / "images.npz") as a, np.load(tmp_path / "ref" / "images.npz") as b:
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["targets"], b["targets"])
    for i in range(3):
        assert (tmp_path / "run" / f"img_{i:05d}.png").read_bytes() == (tmp_path / "ref" / f"img_{i:05d}.png").read_bytes()


def test_gen_request_rejects_bad_count(tmp_path):
    from ouro.calib.gen.cli import GenRequest, GenUsageError

    with pytest.raises(GenUsageError, match="--num-images"):
        GenRequest(num_images=0, output=tmp_path / "o")
    assert not (tmp_path / "o").exists()
