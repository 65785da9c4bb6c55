"""Baselines (ouro.calib.baselines): LtSQ, skewness condition, TGQ grouping, PTQ4VM smoothing and PTS,
determinism of every baseline's calibration, QuantState round trip, the comparison table writer."""
from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from ouro.calib.baselines.ptq4vm import PTSQuant, pts_init, smooth_scale_init, weight_scale_init
from ouro.calib.baselines.qmamba import (
    AbarQuant,
    TGQQuant,
    ltsq_fake_quant,
    ltsq_levels,
    ltsq_quant_ref,
    quantized_scan,
    skewness_statistic,
    tgq_group_index,
    use_ltsq,
)
from ouro.calib.models.vim import VimConfig, build_model
from ouro.calib.quant import QuantMode, calibrate, load_quant_state, save_quant_state
from ouro.calib.scan import TemporalGroupQuant, selective_scan_ref
from ouro.recipes import ActFormat, CalibConfig, Granularity, get_preset

SMOOTH_RTOL = 1e-5  # fp32 reassociation of (x/sigma)(W sigma)^T vs x W^T
SMOOTH_ATOL = 1e-5
TINY = VimConfig(embed_dim=32, depth=2, img_size=32, patch_size=8, stride=8, num_classes=10)  # L = 17
N_IMAGES = 8
BASELINES = ("minmax", "percentile", "ptq4vm", "qmamba")


# ------------------------------------------------------------------------------------- LtSQ
def test_ltsq_levels_hand_computed():
    # u = 1, s = 0.5, 2 bits: u - s * 2**-k for k = 0..3
    assert torch.equal(ltsq_levels(1.0, 0.5, 2), torch.tensor([0.5, 0.75, 0.875, 0.9375]))


def test_ltsq_codes_and_clipping():
    u, s = torch.tensor(1.0), torch.tensor(0.5)
    x = torch.tensor([0.2, 0.5, 0.75, 0.88, 0.99, 1.0, 1.3])
    # (u-x)/s = 1.6, 1, .5, .24, .02, 0, <0 -> -log2 = -.68, 0, 1, 2.06, 5.6, inf, inf -> clamp [0, 3]
    assert torch.equal(ltsq_quant_ref(x, u, s, 2), torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 3.0, 3.0]))
    xq = ltsq_fake_quant(x, u, s, 2)
    assert torch.allclose(xq, torch.tensor([0.5, 0.5, 0.75, 0.875, 0.9375, 0.9375, 0.9375]))


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_ltsq_idempotent_on_levels_and_fine_near_upper(bits):
    lv = ltsq_levels(0.99, 0.4, bits)
    assert torch.allclose(ltsq_fake_quant(lv, torch.tensor(0.99), torch.tensor(0.4), bits), lv, rtol=0, atol=1e-7)
    gaps = lv[:16].diff()  # beyond ~2**-20 of the span, fp32 cannot tell the levels from u
    assert bool((gaps[1:] < gaps[:-1]).all()), "LtSQ intervals must shrink toward the upper bound"


def test_ltsq_gradients_reach_bounds():
    u = torch.tensor(1.0, requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    ltsq_fake_quant(torch.rand(100) * 0.5 + 0.5, u, s, 4).sum().backward()
    assert u.grad is not None and s.grad is not None and torch.isfinite(u.grad) and torch.isfinite(s.grad)


def _abar_with_step_medians(medians: list[float]) -> torch.Tensor:
    """(B=1, L, D=3, S=1): step t holds {m_t - 0.01, m_t, m_t + 0.01}, so median(Abar_t) = m_t."""
    m = torch.tensor(medians).reshape(1, -1, 1, 1)
    return torch.cat([m - 0.01, m, m + 0.01], dim=2)


def test_skewness_condition():
    a = _abar_with_step_medians([0.95, 0.90, 0.88])  # mean of medians = 0.91
    assert skewness_statistic(a).item() == pytest.approx(0.91, abs=1e-6)
    assert use_ltsq(a, 0.9) is True
    assert use_ltsq(a, 0.92) is False
    assert use_ltsq(a, 1.0) is False  # tau = 1: never LtSQ (Abar <= 1)
    assert use_ltsq(a, 0.0) is True  # tau = 0: always LtSQ


@pytest.mark.parametrize("medians,tau,expect", [([0.95, 0.93], 0.9, "ltsq"), ([0.5, 0.6], 0.9, "uniform")])
def test_abar_quantizer_choice(medians, tau, expect):
    q = AbarQuant(ActFormat(4, symmetric=False, granularity=Granularity.TENSOR, log2=True), tau=tau, p=0.01)
    q.mode = QuantMode.OBSERVE
    q(_abar_with_step_medians(medians))
    q.init_from_stats(CalibConfig())
    assert q.choice()["quantizer"] == expect
    q.mode = QuantMode.QUANT
    y = q(torch.rand(2, 3, 4, 5) * 0.3 + 0.7)
    assert torch.isfinite(y).all()


# -------------------------------------------------------------------------------------- TGQ
@pytest.mark.parametrize("L,g", [(23, 10), (20, 10), (17, 10), (7, 10), (197, 10), (5, 1)])
def test_tgq_group_index(L, g):
    G = TemporalGroupQuant.num_groups(L, g)
    fwd = tgq_group_index(L, g)
    assert fwd.tolist() == [t // g for t in range(L)]
    assert int(fwd.max()) == G - 1
    sizes = torch.bincount(fwd, minlength=G).tolist()
    assert sizes == [g] * (L // g) + ([L % g] if L % g else [])  # only the last group may be short
    bwd = tgq_group_index(L, g, reverse=True)
    assert bwd.tolist() == [(L - 1 - t) // g for t in range(L)]


@pytest.mark.parametrize("reverse", [False, True])
def test_tgq_in_the_recurrence_uses_scan_order_groups(reverse):
    """The scan hands TGQ the step index in scan order; the last partial group gets its own scale."""
    B, L, D, S, g = 2, 23, 3, 2, 10
    torch.manual_seed(0)
    u, delta, z = torch.randn(B, L, D), torch.randn(B, L, D), torch.randn(B, L, D)
    A = -torch.rand(D, S) - 0.5
    Bm, Cm = torch.randn(B, L, S), torch.randn(B, L, S)
    q = TGQQuant(ActFormat(8, symmetric=False, granularity=Granularity.STEP_GROUP, group=g), L=L, p=0.0)
    q.mode = QuantMode.OBSERVE
    steps: list[int] = []

    def rec(h, i):
        steps.append(i)
        return q.hook(h, i)

    selective_scan_ref(u, delta, A, Bm, Cm, None, z, reverse=reverse, h_quant=rec)
    assert steps == list(range(L))
    assert sorted(q._by_group) == [0, 1, 2]
    assert [len(q._by_group[k]) for k in range(3)] == [10, 10, 3]
    q.init_from_stats(CalibConfig())
    # group scales cover exactly the range of h over that group's steps
    _, st = selective_scan_ref(u, delta, A, Bm, Cm, None, z, reverse=reverse, return_states=True)
    gi = tgq_group_index(L, g, reverse)
    for k in range(3):
        hk = st.h[:, gi == k]
        assert q.scale[k].item() == pytest.approx(((hk.max() - hk.min()) / 255).item(), rel=1e-5)
    q.mode = QuantMode.QUANT
    y = selective_scan_ref(u, delta, A, Bm, Cm, None, z, reverse=reverse, h_quant=q.hook)
    y_fp = selective_scan_ref(u, delta, A, Bm, Cm, None, z, reverse=reverse)
    assert torch.allclose(y, y_fp, atol=0.05 * y_fp.abs().max().item())


@pytest.mark.parametrize("reverse", [False, True])
def test_quantized_scan_matches_reference(reverse):
    """The fast twin used for tuning == selective_scan_ref with the same hooks (forward bit-exact)."""
    B, L, D, S = 2, 13, 4, 3
    g = torch.Generator().manual_seed(1)
    u, delta, z = (torch.randn(B, L, D, generator=g) for _ in range(3))
    A = -torch.rand(D, S, generator=g) - 0.5
    Bm, Cm = torch.randn(B, L, S, generator=g), torch.randn(B, L, S, generator=g)
    Dskip = torch.randn(D, generator=g)
    tgq = TemporalGroupQuant(6, 5, torch.full((3,), 0.05), torch.full((3,), 31.0))
    abar = lambda a: ltsq_fake_quant(a, torch.tensor(1.0), torch.tensor(0.6), 4)  # noqa: E731
    args = (u, delta, A, Bm, Cm, Dskip, z)
    y_ref = selective_scan_ref(*args, reverse=reverse, abar_quant=abar, h_quant=tgq)
    y = quantized_scan(*args, reverse=reverse, abar_quant=abar, h_quant=tgq)
    assert torch.equal(y, y_ref)
    d1 = delta.clone().requires_grad_(True)
    d2 = delta.clone().requires_grad_(True)
    selective_scan_ref(u, d1, A, Bm, Cm, Dskip, z, reverse=reverse, abar_quant=abar, h_quant=tgq).sum().backward()
    quantized_scan(u, d2, A, Bm, Cm, Dskip, z, reverse=reverse, abar_quant=abar, h_quant=tgq).sum().backward()
    assert torch.allclose(d1.grad, d2.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- PTQ4VM
def test_smoothing_equivalence_before_quantization():
    torch.manual_seed(0)
    x = torch.randn(4, 17, 64) * torch.linspace(0.1, 20, 64)  # channel outliers
    W = torch.randn(48, 64)
    b = torch.randn(48)
    sigma = smooth_scale_init(x.abs().reshape(-1, 64).amax(0), W, alpha=0.5)
    assert sigma.shape == (64,) and bool((sigma > 0).all())
    y_ref = F.linear(x, W, b)
    y_smooth = F.linear(x / sigma, W * sigma, b)
    assert torch.allclose(y_smooth, y_ref, rtol=SMOOTH_RTOL, atol=SMOOTH_ATOL * y_ref.abs().max().item())
    # sigma balances the per-channel maxima: max|X_j| / sigma_j == max|W_:j| * sigma_j at alpha = 0.5
    lhs = (x / sigma).abs().reshape(-1, 64).amax(0)
    rhs = (W * sigma).abs().amax(0)
    assert torch.allclose(lhs, rhs, rtol=1e-4)


def test_pts_init_per_token_grid():
    torch.manual_seed(0)
    x = torch.randn(8, 17, 32) * torch.linspace(0.5, 5, 17).reshape(1, 17, 1) + 0.3
    s, z = pts_init(x, bits=4)
    assert s.shape == (1, 17, 1) and z.shape == (1, 17, 1)
    assert bool((s > 0).all())
    assert torch.equal(z, z.round()) and bool((z >= 0).all()) and bool((z <= 15).all())
    assert s[0, -1, 0] > s[0, 0, 0]  # wider tokens get wider steps
    w = torch.randn(10, 32)
    sw = weight_scale_init(w, bits=4)
    assert sw.shape == (10, 1) and bool((sw <= w.abs().amax(1, keepdim=True) / 7 + 1e-7).all())


def test_pts_quantizer_is_asymmetric_per_token():
    q = PTSQuant(ActFormat(4, symmetric=False, smoothing=True), L=17, K=32, alpha=0.5)
    q.mode = QuantMode.OBSERVE
    x = torch.randn(4, 17, 32).abs()  # all-positive: asymmetric grid starts at 0
    q(x)
    q.bind(torch.randn(8, 32), None)
    q.init_from_stats(CalibConfig())
    q.mode = QuantMode.QUANT
    xq = q(x) * q.sigma
    assert xq.shape == x.shape
    assert (xq - x).abs().max() < (q.scale * q.sigma.max()).max()  # within one step of the token's grid


# ----------------------------------------------------------------------- calibration (tiny model)
def _tiny_calibrate(method: str, preset: str, seed: int):
    torch.manual_seed(1234)
    model = build_model(TINY).eval()
    x = torch.randn(N_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    recipe = get_preset(preset, method).with_(calib={"steps": 2, "batch_size": 4})
    q = calibrate(model, recipe, lambda m: m(x), seed=seed, progress=False)
    with torch.no_grad():
        return model, q, x, q(x)


@lru_cache(maxsize=None)
def _tiny_calibrated(method: str, preset: str):
    """One shared calibration per (method, preset) for the tests that only inspect the result."""
    return _tiny_calibrate(method, preset, seed=0)


@pytest.mark.parametrize("method,preset", [("minmax", "w4a4"), ("percentile", "w4a4"), ("ptq4vm", "w4a4"), ("qmamba", "w6a4")])
def test_calibration_deterministic_under_seed(method, preset):
    _, q1, _, y1 = _tiny_calibrated(method, preset)
    _, q2, _, y2 = _tiny_calibrate(method, preset, seed=0)
    assert torch.equal(y1, y2)
    assert torch.isfinite(y1).all()
    assert q1.method_info["method"] == method


@pytest.mark.parametrize("method,preset", [("ptq4vm", "w4a4"), ("qmamba", "w6a4")])
def test_quant_state_round_trip_bit_exact(method, preset, tmp_path):
    model, q, x, y = _tiny_calibrated(method, preset)
    p = save_quant_state(q, tmp_path / "q.safetensors")
    q2 = load_quant_state(model, p)
    with torch.no_grad():
        assert torch.equal(q2(x), y)
    assert q2.method_info == json.loads(json.dumps(q.method_info))


def test_qmamba_reports_ltsq_choice_per_ssm():
    _, q, _, _ = _tiny_calibrated("qmamba", "w6a4")
    choices = q.method_info["abar_quantizers"]
    assert len(choices) == 2 * TINY.depth  # one per layer and direction
    assert all(c["quantizer"] in ("ltsq", "uniform") and c["tau"] == 0.9 for c in choices)
    assert all((c["quantizer"] == "ltsq") == (c["skew_stat"] > c["tau"]) for c in choices)


def test_ptq4vm_quantizes_linear_layers_only():
    _, q, _, _ = _tiny_calibrated("ptq4vm", "w4a4")
    for blk in q.module.layers:
        assert len(blk.mixer.quant.ssm) == 0
        assert set(blk.mixer.quant.act) == {"in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj"}


# ---------------------------------------------------------------------------------- compare
def test_compare_outputs(tmp_path):
    from ouro.calib.compare import CompareResult, CompareRow, format_table, method_presets, write_outputs

    assert method_presets("qmamba") == ["w8a8", "w6a6", "w4a8", "w4a4", "w6a4"]
    assert method_presets("minmax") == ["w8a8", "w6a6", "w4a8", "w4a4"]
    rows = [
        CompareRow("ptq4vm", "w4a4", "real", 128, 4, 4, 90.5, -7.5, 1.0, 21.3),
        CompareRow("minmax", "w4a4", "real", 128, 4, 4, None, None, 0.1, error="RuntimeError: boom"),
    ]
    res = CompareResult("demo", "real", 128, 497, 98.0, 0, rows, 3.0)
    md = format_table(res)
    assert "| ptq4vm | real | 128 | 4/4 | 90.50 | -7.50 | 21.3 |" in md and "error: RuntimeError: boom" in md
    paths = write_outputs(res, tmp_path / "cmp")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.stat().st_size > 0 for p in paths)
    assert json.loads(paths[0].read_text())["rows"][0]["wa"] == "W4A4"


def test_logit_sqnr():
    from ouro.calib.metrics import sqnr_db as logit_sqnr_db

    fp = torch.tensor([[3.0, 4.0]])
    assert logit_sqnr_db(fp, fp) == float("inf")
    assert logit_sqnr_db(fp, fp + torch.tensor([[0.05, 0.0]])) == pytest.approx(40.0, abs=1e-4)  # ||fp|| = 5, ||err|| = 0.05
