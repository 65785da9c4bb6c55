"""Property tests (hypothesis) of the recipe and QuantState parsers: whatever bytes, TOML or JSON they
are given, they return a valid object or raise their own one-line error type, never anything else."""
from __future__ import annotations

import json
import math

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ouro.calib.quant.state import FORMAT, FORMAT_VERSION, HEADER_SCHEMA, QuantStateError, check_header, read_header, read_recipe
from ouro.recipes import CalibConfig, Recipe, RecipeError, get_preset

EXAMPLES = 60  # small: these run in the default suite on 2 shared cores
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["fp16", "w4a4", "ouromamba", "dynamic", "cosine", "token", "in_proj"]),
)
toml_scalars = scalars.filter(lambda v: v is not None)  # TOML has no null
RECIPE_KEYS = sorted(Recipe.__dataclass_fields__)
CALIB_KEYS = sorted(CalibConfig.__dataclass_fields__)


def _one_line(e: Exception) -> None:
    assert str(e) and "\n" not in str(e).strip(), str(e)


@SETTINGS
@given(st.binary(max_size=200))
def test_recipe_from_random_bytes(data):
    try:
        Recipe.from_toml(data, source="fuzz.toml")
    except RecipeError as e:
        assert str(e).startswith("fuzz.toml")


def _toml_values():
    return st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3))


@SETTINGS
@given(
    top=st.dictionaries(st.sampled_from(RECIPE_KEYS + ["bogus"]), _toml_values(), max_size=6),
    calib=st.dictionaries(st.sampled_from(CALIB_KEYS + ["bogus"]), toml_scalars, max_size=4),
)
def test_recipe_from_random_toml_over_a_preset(top, calib):
    """A valid preset with random keys replaced: valid, or one RecipeError naming the source."""
    base = get_preset("w4a4").to_dict()
    d = {**{k: v for k, v in base.items() if v != {}}, **top}
    d["calib"] = {**base["calib"], **calib}
    try:
        text = tomli_w.dumps(d)
    except (TypeError, ValueError):  # not representable in TOML (e.g. mixed-type arrays in old writers)
        return
    try:
        r = Recipe.from_toml(text, source="fuzz.toml")
    except RecipeError as e:
        assert str(e).startswith("fuzz.toml"), str(e)
        return
    for v in (r.k_sigma, r.k_sigma_delta, r.calib.lr_act, r.calib.lr_weight, r.calib.weight_decay, r.calib.grad_clip):
        assert isinstance(v, float) and math.isfinite(v)
    for v in (r.n_refresh, r.calib.steps, r.calib.batch_size, r.std_correction):
        assert type(v) is int
    assert Recipe.from_toml(r.to_toml()) == r  # what loads, round-trips


json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=8)


@SETTINGS
@given(st.one_of(st.text(max_size=80), json_values.map(json.dumps)))
def test_quant_state_header_from_random_json(text):
    try:
        h = check_header(text, "fuzz.safetensors")
    except QuantStateError as e:
        assert str(e).startswith("fuzz.safetensors")
        return
    assert h["format"] == FORMAT and isinstance(h["arch"], dict)


@SETTINGS
@given(st.fixed_dictionaries({}, optional={k: json_values for k in HEADER_SCHEMA if k not in ("format", "format_version")}))
def test_quant_state_header_schema(fields):
    """Headers that pass the format checks but carry random values: valid, or one QuantStateError."""
    h = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields}
    try:
        h2 = check_header(json.dumps(h), "fuzz.safetensors")
        read_recipe("fuzz.safetensors", h2)
    except QuantStateError as e:
        _one_line(e)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_quant_state_file_from_random_bytes(tmp_path, data):
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(data)
    with pytest.raises(QuantStateError):
        read_header(p)
