"""Recipes: presets as data, validation on construction, TOML round trip, resolution rules."""
from __future__ import annotations

import pytest

from ouro.recipes import (
    FP16,
    EXCLUDED_MODULES,
    LINEAR_LAYERS,
    RECIPE_VERSION,
    CalibConfig,
    LossKind,
    Method,
    OuroMambaParams,
    Recipe,
    RecipeError,
    ThresholdPolicy,
    get_preset,
    list_presets,
    resolve_recipe,
)

ISSUE_PRESETS = {  # issue 4: name -> (w_bits, a_bits, a_bits_outlier)
    "w4a4": (4, 4, 8),
    "w4a8": (4, 8, FP16),
    "w6a6": (6, 6, 8),
    "w8a8": (8, 8, FP16),
}


@pytest.mark.parametrize("name", sorted(ISSUE_PRESETS))
def test_presets_match_issue_and_round_trip(name):
    r = get_preset(name)
    assert (r.w_bits, r.a_bits, r.a_bits_outlier) == ISSUE_PRESETS[name]
    assert r.method is Method.OUROMAMBA and r.n_refresh == 10 and r.version == RECIPE_VERSION
    assert r.linear_layers == LINEAR_LAYERS and r.exclude == EXCLUDED_MODULES
    assert Recipe.from_toml(r.to_toml()) == r


def test_every_method_resolves_every_preset():
    for m in Method:
        for name in list_presets(m):
            r = get_preset(name, m)
            assert r.method is m
            assert Recipe.from_toml(r.to_toml()) == r


def test_qmamba_w6a4_overlay():
    r = get_preset("w6a4", "qmamba")
    assert (r.w_bits, r.a_bits) == (6, 4) and r.calib.loss is LossKind.MSE
    with pytest.raises(RecipeError, match="unknown preset 'w6a4' for method ouromamba"):
        get_preset("w6a4")


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(w_bits=1), "w_bits must be an integer in"),
        (dict(a_bits=17), "a_bits must be an integer in"),
        (dict(a_bits_outlier=16), 'a_bits_outlier = 16 is not a bit width here: write "fp16"'),
        (dict(w_bits="int4"), "w_bits must be an integer in"),
        (dict(a_bits="fp16", a_bits_outlier=8), "a_bits_outlier .8. must be fp16 when a_bits is fp16"),
        (dict(k_sigma=0.0), "k_sigma must be > 0"),
        (dict(std_correction=2), "std_correction must be 0 or 1"),
        (dict(a_bits=8, a_bits_outlier=4), "a_bits_outlier .4. must be >= a_bits .8."),
        (dict(n_refresh=0), "n_refresh must be"),
        (dict(linear_layers=("in_proj", "conv1d")), "linear_layers has unknown entries .'conv1d'."),
        (dict(ssm_operands=("B", "B")), "duplicates"),
        (dict(threshold_policy="median"), "threshold_policy='median' is not one of dynamic, calibrated"),
        (dict(method="gptq"), "method='gptq' is not one of"),
        (dict(calib=dict(steps=-1)), "calib.steps must be >= 0"),
        (dict(calib=dict(lr=1)), r"unknown calib key\(s\) \['lr'\]"),
        (dict(method_params=dict(inlier_granularity="row")), "inlier_granularity"),
        (dict(version=RECIPE_VERSION + 1), "recipe version"),
    ],
)
def test_validation_names_the_key(bad, match):
    with pytest.raises(RecipeError, match=match):
        Recipe(name="x", **bad)


def test_typed_defaults_and_with():
    r = Recipe(name="x")
    assert r.std_correction == 1 and r.formats.linear_act.outliers.std_correction == 1  # Bessel's by default
    assert r.with_(std_correction=0).formats.ssm_format("delta").outliers.std_correction == 0  # the named option
    assert isinstance(r.calib, CalibConfig) and isinstance(r.method_params, OuroMambaParams)
    r2 = r.with_(threshold_policy="calibrated", calib={"steps": 3})
    assert r2.threshold_policy is ThresholdPolicy.CALIBRATED and r2.calib.steps == 3 and r.calib.steps == 10
    with pytest.raises(Exception):
        r.w_bits = 8  # frozen


def test_unknown_toml_key_is_refused():
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['wbits'\]"):
        Recipe.from_toml('name = "x"\nwbits = 4\n', source="my.toml")
    with pytest.raises(RecipeError, match="not valid TOML"):
        Recipe.from_toml("name = ", source="my.toml")


def test_resolve_recipe(tmp_path):
    assert resolve_recipe(preset="w4a8") == get_preset("w4a8")
    assert resolve_recipe(preset="w8a8", method="minmax").method is Method.MINMAX
    p = tmp_path / "r.toml"
    p.write_text(get_preset("w4a4").with_(name="mine", n_refresh=5).to_toml())
    r = resolve_recipe(recipe_file=p)
    assert r.name == "mine" and r.n_refresh == 5
    assert resolve_recipe(recipe_file=p, method="percentile").method is Method.PERCENTILE
    with pytest.raises(RecipeError, match="does not exist"):
        resolve_recipe(recipe_file=tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match="no recipe"):
        resolve_recipe()
    with pytest.raises(RecipeError, match="either a preset or a recipe file"):
        resolve_recipe(preset="w4a4", recipe_file=p)


def test_cli_print_recipe(capsys):
    from ouro.exporter.cli import main

    assert main(["--w4a8", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert Recipe.from_toml(out) == get_preset("w4a8")
    assert main(["--recipe", "/nonexistent/r.toml", "--print-recipe"]) == 2
    assert "does not exist" in capsys.readouterr().err
