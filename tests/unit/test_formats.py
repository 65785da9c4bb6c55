"""ouro.recipes.formats: validation, ONNX attributes both ways, and the capability tables checked
against what the TensorRT plugins and the kernel binding really accept (fails when they drift)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ouro.recipes import (
    FP16,
    ActFormat,
    FormatError,
    Granularity,
    OutlierFormat,
    Target,
    TargetError,
    ThresholdPolicy,
    WeightFormat,
    check_recipe_target,
    formats_for,
    get_preset,
    list_presets,
    resolve_recipe,
)
from ouro.recipes import Method
from ouro.recipes.formats import (
    PLUGIN_LINEAR_A_BITS,
    PLUGIN_LINEAR_O_BITS,
    PLUGIN_LINEAR_W_BITS,
    PLUGIN_SCAN_BITS,
    PLUGIN_SCAN_O_BITS,
    TARGET_CAPS,
    abi_bits,
    linear_formats_from_onnx_attrs,
    linear_onnx_attrs,
    scan_formats_from_onnx_attrs,
    scan_onnx_attrs,
)

REPO = Path(__file__).resolve().parents[2]
PROBE_BITS = range(0, 18)


# ------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("make, match", [
    (lambda: ActFormat(1), "activation bits must be an integer in"),
    (lambda: ActFormat(16), "activation bits must be an integer in"),
    (lambda: ActFormat(4, symmetric=False, outliers=OutlierFormat()), "needs the symmetric inlier grid"),
    (lambda: ActFormat(8, outliers=OutlierFormat(bits=4)), r"outlier bits \(4\) must be >= inlier bits \(8\)"),
    (lambda: ActFormat(4, granularity="channel"), "channel is a weight granularity"),
    (lambda: OutlierFormat(bits=16), 'write "fp16"'),
    (lambda: OutlierFormat(n_refresh=0), "n_refresh must be an integer >= 1"),
    (lambda: OutlierFormat(std_correction=2), "std_correction must be 0 or 1"),
    (lambda: OutlierFormat(threshold="median"), "threshold policy 'median' is not one of"),
    (lambda: WeightFormat(4, granularity="token"), "weight granularity must be tensor or channel"),
])
def test_formats_validate_on_construction(make, match):
    with pytest.raises(FormatError, match=match):
        make()


def test_formats_are_frozen_and_fp16_is_explicit():
    f = ActFormat(4, outliers=OutlierFormat(FP16))
    with pytest.raises(Exception):
        f.bits = 8
    assert f.outliers.bits is FP16 and abi_bits(FP16) == 16 and abi_bits(8) == 8
    assert OutlierFormat(bits="fp16").bits is FP16


def test_onnx_attributes_round_trip():
    act = ActFormat(4, outliers=OutlierFormat(FP16, 7, ThresholdPolicy.CALIBRATED, 2.5))
    w = WeightFormat(8)
    attrs = linear_onnx_attrs(act, w)
    assert attrs == {"w_bits": 8, "a_bits": 4, "o_bits": 16, "n_refresh": 7, "threshold_policy": 1, "k_sigma": 2.5,
                     "std_correction": 1}  # Bessel's by default, always written
    assert list(attrs) == ["w_bits", "a_bits", "o_bits", "n_refresh", "threshold_policy", "k_sigma", "std_correction"]
    assert linear_formats_from_onnx_attrs(attrs) == (act, w)
    old = {k: v for k, v in attrs.items() if k != "std_correction"}  # a node written before the attribute existed
    assert linear_formats_from_onnx_attrs(old)[0].outliers.std_correction == 0
    d = ActFormat(6, outliers=OutlierFormat(8, 10, k_sigma=4.0))
    b = ActFormat(6, outliers=OutlierFormat(8, 10, k_sigma=3.0))
    sattrs = scan_onnx_attrs({"delta": d, "B": b, "C": None})
    assert sattrs == {"n_refresh": 10, "threshold_policy": 0, "std_correction": 1, "delta_k_sigma": 4.0, "bc_k_sigma": 3.0,
                      "h_bits": 0, "h_group": 1, "delta_bits": 6, "delta_bits_outlier": 8, "b_bits": 6, "b_bits_outlier": 8,
                      "c_bits": 0, "c_bits_outlier": 0}
    assert scan_formats_from_onnx_attrs(sattrs) == {"delta": d, "B": b, "C": None}
    with pytest.raises(FormatError, match="outlier split"):
        linear_onnx_attrs(ActFormat(4), w)


def test_every_preset_of_every_method_has_formats():
    for m in Method:
        for name in list_presets(m):
            f = formats_for(get_preset(name, m))
            assert f.method == m.value and f.linear_act is not None and f.linear_weight is not None


# ------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("preset,method,target,ok", [
    ("w4a4", "ouromamba", Target.PLUGIN, True),
    ("w4a8", "ouromamba", Target.PLUGIN, True),
    ("w8a8", "ouromamba", Target.PLUGIN, True),
    ("w6a6", "ouromamba", Target.PLUGIN, False),
    ("w6a6", "ouromamba", Target.QDQ_ONNXRUNTIME, True),
    ("w6a6", "ouromamba", Target.QDQ_TENSORRT, False),
    ("w4a4", "ouromamba", Target.QDQ_TENSORRT, True),
    ("w4a4", "ptq4vm", Target.QDQ_ONNXRUNTIME, True),
    ("w6a4", "qmamba", Target.QDQ_ONNXRUNTIME, True),
])
def test_target_table(preset, method, target, ok):
    r = get_preset(preset, method)
    if ok:
        check_recipe_target(r, target)
    else:
        with pytest.raises(TargetError):
            check_recipe_target(r, target)


def test_w6a6_to_the_plugin_graph_names_target_support_and_alternative():
    with pytest.raises(TargetError) as e:
        resolve_recipe(preset="w6a6", target="plugin")
    msg = str(e.value)
    assert "plugin ONNX / TensorRT engine (.onnx, .plan)" in msg and "6-bit (supported: 4, 8)" in msg
    assert "Write the QDQ ONNX for onnxruntime (.qdq.onnx) instead" in msg
    assert resolve_recipe(preset="w6a6", target="qdq-onnxruntime").a_bits == 6


def test_ablations_and_delta_before_bias_are_refused_by_the_plugin():
    from ouro.recipes import OuroMambaParams

    for params, match in ((OuroMambaParams(outlier_detection="static"), "static outlier list"),
                          (OuroMambaParams(outlier_detection="none"), "without an outlier split"),
                          (OuroMambaParams(delta_before_bias=True), "delta_before_bias")):
        r = get_preset("w4a4").with_(method_params=params)
        with pytest.raises(TargetError, match=match):
            check_recipe_target(r, Target.PLUGIN)
    check_recipe_target(get_preset("w4a4").with_(method_params=OuroMambaParams(outlier_detection="none")), Target.QDQ_ONNXRUNTIME)


# ----------------------------------------------------------------- the plugin table vs its sources
def _plugin_int_rules(rel: str) -> dict[str, set[int] | str]:
    """name -> allowed values of each `S::intField("name", &C::x, <rule>)` in a plugin's attribute table
    (IntRule::oneOf({..}), a helper returning one, or IntRule::range(lo) as ">=lo")."""
    src = (REPO / rel).read_text()
    helpers = {m.group(1): {int(v) for v in m.group(2).split(",")}
               for m in re.finditer(r"IntRule (\w+)\(\)\s*\{\s*return IntRule::oneOf\(\{([^}]*)\}\);", src)}
    rules: dict[str, set[int] | str] = {}
    for m in re.finditer(r'intField\("(\w+)",\s*&C::\w+,\s*(.*)$', src, flags=re.MULTILINE):  # one field per line
        name, rule = m.group(1), m.group(2)
        if (one := re.search(r"oneOf\(\{([^}]*)\}\)", rule)) is not None:
            rules[name] = {int(v) for v in one.group(1).split(",")}
        elif (rng := re.search(r"range\((\d+)\)", rule)) is not None:
            rules[name] = f">={rng.group(1)}"
        elif (h := re.match(r"(\w+)\(\)", rule.strip())) is not None and h.group(1) in helpers:  # bitsRule()
            rules[name] = helpers[h.group(1)]
        else:
            raise AssertionError(f"{rel}: cannot read the rule of field {name!r}: {rule!r} (update this test's parser)")
    return rules


def test_plugin_capabilities_match_the_plugin_attribute_tables():
    lin = _plugin_int_rules("trt_plugins/outlier_linear/OutlierLinearPlugin.cpp")
    assert lin["w_bits"] == set(PLUGIN_LINEAR_W_BITS)
    assert lin["a_bits"] == set(PLUGIN_LINEAR_A_BITS)
    assert lin["o_bits"] == {abi_bits(b) for b in PLUGIN_LINEAR_O_BITS}
    assert lin["threshold_policy"] == {p.code for p in ThresholdPolicy}
    assert lin["n_refresh"] == ">=1"  # OutlierFormat refuses n_refresh < 1 too
    scan = _plugin_int_rules("trt_plugins/selective_scan/SelectiveScanPlugin.cpp")
    for op in ("delta", "b", "c"):
        assert scan[f"{op}_bits"] - {0} == set(PLUGIN_SCAN_BITS)  # 0: not quantized
        assert scan[f"{op}_bits_outlier"] - {0} == {abi_bits(b) for b in PLUGIN_SCAN_O_BITS}
    assert scan["h_bits"] - {0} == set(TARGET_CAPS[Target.PLUGIN].ssm["h"].bits)
    assert scan["threshold_policy"] == {p.code for p in ThresholdPolicy}
    for table in (lin, scan):  # the exporter always writes std_correction (0 or 1); a table that knows it takes both
        if "std_correction" in table:
            assert table["std_correction"] == {0, 1}
    caps = TARGET_CAPS[Target.PLUGIN]
    assert set(caps.linear_act.bits) == set(PLUGIN_LINEAR_A_BITS) and set(caps.linear_weight.bits) == set(PLUGIN_LINEAR_W_BITS)
    assert all(set(caps.ssm[op].bits) == set(PLUGIN_SCAN_BITS) for op in ("delta", "B", "C"))


def test_plugin_capabilities_match_the_kernel_binding():
    """The binding's own validation (CPU-side, before any GPU call) accepts exactly what the table says."""
    from ouro.exporter import cuda_kernels as ck

    def act_ok(bits: int, outlier: int) -> bool:
        try:
            ck.ActQuant(bits=bits, bits_outlier=outlier, n_refresh=1, scale=torch.ones(2))
            return True
        except ValueError:
            return False

    assert {b for b in PROBE_BITS if act_ok(b, 16)} == set(PLUGIN_SCAN_BITS)
    assert {o for o in PROBE_BITS if act_ok(2, o)} == {abi_bits(b) for b in PLUGIN_SCAN_O_BITS}
    assert set(PLUGIN_LINEAR_A_BITS) <= set(PLUGIN_SCAN_BITS)  # the linear's plugin is the narrower of the two

    def w_ok(w_bits: int) -> bool:
        """The binding's linear validation (CPU side) on a CPU tensor: accepted widths fail later, on the device check."""
        import inspect

        act = ck.ActQuant(bits=4, bits_outlier=8, n_refresh=1, scale=torch.ones(2))
        args = dict(lib=None, x=torch.zeros(1, 2, 4), w=torch.zeros(3, 4, dtype=torch.int8), w_scale=torch.ones(3), act=act,
                    w_bits=w_bits, bias=None, max_outliers=None, path="auto", epilogue="auto", tactic=None, debug=False)
        params = inspect.signature(ck._prepare_linear).parameters
        try:
            ck._prepare_linear(**{k: v for k, v in args.items() if k in params})
        except ValueError as e:
            return "w_bits" not in str(e)
        return True

    assert {b for b in PROBE_BITS if w_ok(b)} == set(PLUGIN_LINEAR_W_BITS)


def test_capability_granularities():
    caps = TARGET_CAPS[Target.PLUGIN]
    assert caps.linear_weight.granularities == {Granularity.CHANNEL}  # w_scale [N]
    assert caps.linear_act.granularities == {Granularity.TOKEN, Granularity.TENSOR}  # inlier_scale [L] (a tensor scale broadcast)
