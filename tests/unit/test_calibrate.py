"""calibrate(): determinism, block-wise chain, loss selection, FP model untouched, clean errors."""
from __future__ import annotations

import pytest
import torch

from ouro.calib import calibrate
from ouro.calib.models import VimConfig, build_model
from ouro.calib.quant import (
    ChannelWeightQuantizer,
    OutlierActQuantizer,
    QuantMode,
    iter_quant_ops,
    iter_quantizers,
    set_quant_mode,
)
from ouro.calib.quant.calibrate import capture_block_inputs
from ouro.recipes import get_preset

TINY = VimConfig(embed_dim=16, depth=2, img_size=16, patch_size=4, stride=4, num_classes=5, name="tiny-test")
W8A8_MIN_COSINE = 0.99  # logits cosine of W8A8 vs FP on the random tiny model
FAST = {"steps": 2, "batch_size": 4, "grid_points": 20}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    x = torch.randn(8, 3, 16, 16)

    def loop(m):
        for i in range(0, 8, 4):
            m(x[i : i + 4])

    return model, x, loop


def test_deterministic_and_fp_model_untouched(setup):
    model, x, loop = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = get_preset("w4a4").with_(calib=FAST)
    q1 = calibrate(model, r, loop, seed=3, progress=False)
    q2 = calibrate(model, r, loop, seed=3, progress=False)
    with torch.no_grad():
        assert torch.equal(q1(x), q2(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model.layers[0].mixer, "quant")
    assert len(q1.calib_losses) == TINY.depth and q1.recipe == r


def test_installs_expected_quantizers(setup):
    model, _, loop = setup
    q = calibrate(model, get_preset("w4a4").with_(calib=FAST), loop, progress=False)
    ops = dict(iter_quant_ops(q))
    assert sorted(ops) == list(range(TINY.depth))
    o = ops[0]
    assert sorted(o.act) == sorted(o.weight) == sorted(["in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj"])
    assert sorted(o.ssm) == sorted(f"{n}_{d}" for n in ("delta", "B", "C", "A", "D") for d in ("fwd", "bwd"))
    assert isinstance(o.ssm["delta_fwd"], OutlierActQuantizer) and o.ssm["delta_fwd"].k_sigma == 4.0
    assert isinstance(o.ssm["A_bwd"], ChannelWeightQuantizer)
    assert all(bool(w.frozen) for w in o.weight.values())
    assert o.act["in_proj"].static_scale.shape == (1, TINY.seq_len, 1)


def test_w8a8_close_to_fp(setup):
    model, x, loop = setup
    q = calibrate(model, get_preset("w8a8").with_(calib=FAST), loop, progress=False)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model(x), q(x)).mean()
    assert cos > W8A8_MIN_COSINE
    set_quant_mode(q, QuantMode.FP)  # all quantizers off: exactly the FP model
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=1e-5)


def test_tuning_reduces_block_loss(setup):
    model, _, loop = setup
    r0 = get_preset("w4a4").with_(calib={**FAST, "steps": 0})
    r1 = get_preset("w4a4").with_(calib={**FAST, "steps": 15, "lr_act": 2e-2, "lr_weight": 2e-2})
    x0 = capture_block_inputs(model, loop)
    fp_out, _ = model.layers[0](x0, None)
    losses = []
    for r in (r0, r1):
        q = calibrate(model, r, loop, progress=False)
        out, _ = q.module.layers[0](x0, None)
        losses.append(float((1 - torch.nn.functional.cosine_similarity(fp_out, out, dim=-1)).mean().detach()))
    assert losses[1] < losses[0]


def test_mse_loss_selectable(setup, monkeypatch):
    """calib.loss = "mse" makes every tuning step use the MSE loss (and never the cosine one), and the
    recorded block losses are that loss's values."""
    from ouro.calib.quant import LOSSES
    from ouro.recipes import LossKind

    model, _, loop = setup
    calls = {k: [] for k in LossKind}
    for kind, fn in dict(LOSSES).items():
        def spy(fp, q, kind=kind, fn=fn):
            v = fn(fp, q)
            calls[kind].append(float(v.detach()))
            return v

        monkeypatch.setitem(LOSSES, kind, spy)
    q = calibrate(model, get_preset("w4a4").with_(calib={**FAST, "loss": "mse"}), loop, progress=False)
    assert len(calls[LossKind.MSE]) == FAST["steps"] * TINY.depth and not calls[LossKind.COSINE]
    assert list(q.calib_losses) == calls[LossKind.MSE][FAST["steps"] - 1 :: FAST["steps"]]


def test_h_operand_refused_for_ouromamba(setup):
    model, _, loop = setup
    r = get_preset("w4a4").with_(ssm_operands=("delta", "h"))
    with pytest.raises(NotImplementedError, match="h stays FP"):
        calibrate(model, r, loop, progress=False)


def test_empty_forward_loop_is_an_error(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="ran no images"):
        calibrate(model, get_preset("w4a4"), lambda m: None, progress=False)


def test_calibrated_theta_policy_runs(setup):
    model, x, loop = setup
    q = calibrate(model, get_preset("w4a4").with_(threshold_policy="calibrated", calib=FAST), loop, progress=False)
    th = [m.theta for _, m in iter_quantizers(q) if isinstance(m, OutlierActQuantizer)]
    assert th and all(bool((t > 0).all()) for t in th)
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


def test_delta_before_bias_option(setup, tmp_path):
    from ouro.calib.quant import load_quant_state, save_quant_state
    from ouro.recipes import OuroMambaParams

    model, x, loop = setup
    r = get_preset("w4a4").with_(method_params=OuroMambaParams(delta_before_bias=True), calib=FAST)
    q = calibrate(model, r, loop, progress=False)
    d = q.module.layers[0].mixer.quant.ssm["delta_fwd"]
    assert d.applied_in_linear
    save_quant_state(q, tmp_path / "q.safetensors")
    q2 = load_quant_state(model, tmp_path / "q.safetensors")
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
