"""QuantState: bit-exact reload, packed int4 codes, refusals naming both sides."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ouro.calib import calibrate
from ouro.calib.models import VimConfig, build_model
from ouro.calib.quant import QuantStateError, load_quant_state, save_quant_state
from ouro.recipes import RECIPE_VERSION, get_preset

TINY = VimConfig(embed_dim=16, depth=2, img_size=16, patch_size=4, stride=4, num_classes=5, name="tiny-test")
FAST = {"steps": 2, "batch_size": 4, "grid_points": 20}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    x = torch.randn(8, 3, 16, 16)
    q = calibrate(model, get_preset("w4a4").with_(calib=FAST), lambda m: m(x), progress=False)
    path = tmp_path_factory.mktemp("qs") / "q.safetensors"
    save_quant_state(q, path)
    return model, q, x, path


def test_reload_is_bit_exact(saved):
    model, q, x, path = saved
    q2 = load_quant_state(model, path)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    assert q2.recipe == q.recipe


def test_file_layout(saved):
    _, _, _, path = saved
    t = load_file(str(path))
    w = t["layers.0.weight.in_proj.codes.int4"]
    assert w.dtype == torch.uint8 and w.shape == (2 * TINY.d_inner, TINY.embed_dim // 2)
    assert t["layers.0.act.in_proj.static_scale"].dtype == torch.float32
    with safe_open(str(path), framework="pt") as f:
        h = json.loads(f.metadata()["ouro"])
    assert h["recipe_version"] == RECIPE_VERSION and h["method"] == "ouromamba" and h["arch"]["embed_dim"] == 16
    assert "package_version" in h


def test_wrong_arch_refused_naming_both(saved):
    _, _, _, path = saved
    other = build_model(VimConfig(embed_dim=32, depth=2, img_size=16, patch_size=4, stride=4, num_classes=5, name="other"))
    with pytest.raises(QuantStateError, match=r"'tiny-test'.*'other'.*embed_dim: file 16 vs model 32"):
        load_quant_state(other, path)


def test_wrong_recipe_version_refused(saved, tmp_path):
    model, _, _, path = saved
    t = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        h = json.loads(f.metadata()["ouro"])
    h["recipe_version"] = RECIPE_VERSION + 1
    bad = tmp_path / "bad.safetensors"
    save_file(t, str(bad), metadata={"ouro": json.dumps(h)})
    with pytest.raises(QuantStateError, match=rf"recipe version {RECIPE_VERSION + 1} .* recipe version {RECIPE_VERSION}"):
        load_quant_state(model, bad)


def test_missing_and_foreign_files(saved, tmp_path):
    model, _, _, _ = saved
    with pytest.raises(QuantStateError, match="does not exist"):
        load_quant_state(model, tmp_path / "none.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(plain))
    with pytest.raises(QuantStateError, match="not an ouro QuantState"):
        load_quant_state(model, plain)


def test_cli_save_and_load_calib(saved, tmp_path, capsys):
    """--save-calib writes the run's QuantState, and --load-calib reuses it without data or
    calibration: written again, it is the same file content, tensor for tensor."""
    from PIL import Image

    from ouro.exporter.cli import main

    model, _, _, _ = saved
    ckpt, calib, recipe = tmp_path / "tiny.pth", tmp_path / "calib", tmp_path / "fast.toml"
    torch.save({"model": model.state_dict()}, ckpt)
    calib.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()).save(calib / f"{i}.png")
    recipe.write_text(get_preset("w4a4").with_(name="fast", calib=FAST).to_toml())
    state, again = tmp_path / "q.safetensors", tmp_path / "again.safetensors"
    assert main([str(ckpt), "--recipe", str(recipe), "--calib-dir", str(calib), "--save-calib", str(state)]) == 0
    out = capsys.readouterr().out
    assert "calibrate" in out and state.is_file()
    assert load_quant_state(model, state).recipe.name == "fast"
    assert main([str(ckpt), "--load-calib", str(state), "-o", str(again)]) == 0
    out = capsys.readouterr().out
    assert "load_calib" in out and "calib_data" not in out  # no data, no calibration
    a, b = load_file(str(state)), load_file(str(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
