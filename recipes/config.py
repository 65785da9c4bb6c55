"""Typed, versioned quantization recipes.

A recipe is data: `Recipe` (frozen dataclass, validated on construction) resolved from a preset
file under `presets/` (`get_preset("w4a4")`), a user TOML file (`--recipe r.toml`), and a method
(`--method ptq4vm`). Method-specific knobs live in `Recipe.method_params`, a frozen dataclass whose
type is registered per method with `register_method_params`.

Preset lookup for (name, method):
    presets/<name>.toml                 the OuroMamba preset (also the base of every other method)
    presets/<method>/<name>.toml        optional overlay for another method: its keys replace the
                                        base's (a table such as [calib] is merged key by key). When
                                        there is no base preset the overlay must be complete (qmamba w6a4).
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from .formats import (
    DEFAULT_K_SIGMA,
    DEFAULT_STD_CORRECTION,
    DELTA_K_SIGMA,
    Bits,
    FormatError,
    QuantFormats,
    RecipeError,
    Target,
    ThresholdPolicy,
    check_target,
    parse_bits,
)
from .methods import Method, NoParams, OuroMambaParams, formats_for, method_params_type, register_method_params
from .typecheck import check_field_types

__all__ = [
    "RECIPE_VERSION",
    "Method",
    "LossKind",
    "LINEAR_LAYERS",
    "SSM_OPERANDS",
    "EXCLUDED_MODULES",
    "CalibConfig",
    "NoParams",
    "OuroMambaParams",
    "Recipe",
    "RecipeError",
    "register_method_params",
    "method_params_type",
    "list_presets",
    "get_preset",
    "resolve_recipe",
    "check_recipe_target",
]

RECIPE_VERSION = 2
"""Bumped whenever the meaning of a recipe field (and so of a saved QuantState) changes.
2: std_correction (the outlier threshold's std, Bessel's by default; version 1 meant 0) and "fp16"
   instead of 16 for values kept in floating point."""


class LossKind(str, Enum):
    COSINE = "cosine"  # mean(1 - cos(fp, q)) along the hidden dimension (OuroMamba, PTQ4VM)
    MSE = "mse"  # mean squared error (QMamba)


LINEAR_LAYERS: tuple[str, ...] = ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj", "fc1", "fc2", "qkv", "proj")
"""Linear layers a recipe may quantize (input activation and weight), by name or kind: a model family
gives each linear a name and a kind (ouro.calib.families.LinearSite) and a linear is quantized when
either is listed. Vim: in_proj, x_proj, x_proj_b, dt_proj, dt_proj_b, out_proj (kind = name);
VMamba: in_proj, x_proj_0..3 (kind x_proj), dt_proj_0..3 (kind dt_proj), out_proj and the MLP's fc1,
fc2; qkv and proj are attention linears (MambaVision). A kind a model does not have selects nothing."""

SSM_OPERANDS: tuple[str, ...] = ("delta", "B", "C", "A", "D", "h", "u", "abar")
"""Selective-scan operands a recipe may quantize (ALGORITHMS.md §1.2). `h` = hidden state in the recurrence;
`u` = the scan input x' and `abar` = exp(dt*A) inside the scan (QMamba, ALGORITHMS.md §2)."""

EXCLUDED_MODULES: tuple[str, ...] = ("patch_embed", "conv1d", "conv1d_b", "norm", "norm_f", "head",
                                      "conv2d", "out_norm", "norm2", "downsample", "classifier")
"""The one shared never-quantize list, applied the same way by every method: patch embed, depthwise
convs (Vim's conv1d/conv1d_b, VMamba's 2-D conv2d), every norm (Vim's RMSNorms; VMamba's LayerNorms,
the SS2D out_norm included), VMamba's downsampling layers, the classifier head."""

_PRESET_PACKAGE = "ouro.recipes"


def _enum(cls: type[Enum], v: Any, key: str) -> Enum:
    try:
        return cls(v)
    except ValueError:
        raise RecipeError(f"{key}={v!r} is not one of {', '.join(m.value for m in cls)}") from None


CALIB_INT_RANGES: dict[str, tuple[int, int]] = {
    # beyond these a run would not finish (or not fit in memory): refused, not attempted
    "steps": (0, 100_000),
    "batch_size": (1, 65_536),
    "grid_points": (1, 100_000),
    "init_samples": (1, 1_000_000),
}


@dataclass(frozen=True)
class CalibConfig:
    """Calibration settings: static init (L_p grid search) then block-wise AdamW tuning."""

    steps: int = 10  # optimizer steps per block (0: static init only)
    batch_size: int = 32  # images per optimizer step
    lr_act: float = 5e-4  # AdamW lr of activation scales
    lr_weight: float = 5e-4  # AdamW lr of weight scales
    weight_decay: float = 1e-5
    grad_clip: float = 2.0
    loss: LossKind = LossKind.COSINE
    lp_norm: float = 2.4  # p of the L_p clip search
    grid_points: int = 100  # clip candidates (1 - i/grid_points) * absmax
    init_samples: int = 64  # calibration images used for the static init statistics (the official script uses 64)

    def __post_init__(self) -> None:
        check_field_types(self, "calib", RecipeError)
        object.__setattr__(self, "loss", _enum(LossKind, self.loss, "calib.loss"))
        for k, (lo, hi) in CALIB_INT_RANGES.items():
            v = getattr(self, k)
            if v < lo or v > hi:
                raise RecipeError(f"calib.{k} must be {'>= ' + str(lo) if v < lo else '<= ' + str(hi)}, got {v}")
        for k in ("lr_act", "lr_weight", "weight_decay", "grad_clip"):
            if getattr(self, k) < 0:
                raise RecipeError(f"calib.{k} must be >= 0, got {getattr(self, k)}")
        if not self.lp_norm > 0:
            raise RecipeError(f"calib.lp_norm must be > 0, got {self.lp_norm}")


def _params_from_dict(method: Method, d: dict | None):
    cls = method_params_type(method)
    d = dict(d or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise RecipeError(f"unknown {method.value} method_params key(s) {unknown}; known: {sorted(names) or 'none'}")
    return cls(**d)


# ------------------------------------------------------------------------------------- Recipe
@dataclass(frozen=True)
class Recipe:
    """A complete quantization recipe (the only input of `calibrate` besides model and data).

    w_bits / a_bits: weights / activation inliers; a_bits_outlier: OuroMamba's outlier channels.
    Each is an integer bit width or "fp16" (`FP16`: not quantized, kept in floating point). What
    every site computes under the recipe is `self.formats` (`ouro.recipes.formats_for`)."""

    name: str
    method: Method = Method.OUROMAMBA
    w_bits: Bits = 4
    a_bits: Bits = 4
    a_bits_outlier: Bits = 8
    n_refresh: int = 10
    threshold_policy: ThresholdPolicy = ThresholdPolicy.DYNAMIC
    k_sigma: float = DEFAULT_K_SIGMA  # theta = mu + k*sigma for linear inputs, B and C
    k_sigma_delta: float = DELTA_K_SIGMA  # ... and for Delta
    std_correction: int = DEFAULT_STD_CORRECTION  # the threshold's std: 1 Bessel (torch.std, official code), 0 population
    linear_layers: tuple[str, ...] = LINEAR_LAYERS
    ssm_operands: tuple[str, ...] = ("delta", "B", "C", "A", "D")
    exclude: tuple[str, ...] = EXCLUDED_MODULES
    calib: CalibConfig = field(default_factory=CalibConfig)
    method_params: Any = None
    description: str = ""
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        s = object.__setattr__
        check_field_types(self, "", RecipeError)
        if not self.name or not isinstance(self.name, str):
            raise RecipeError("recipe name must be a non-empty string")
        s(self, "method", _enum(Method, self.method, "method"))
        s(self, "threshold_policy", _enum(ThresholdPolicy, self.threshold_policy, "threshold_policy"))
        for k in ("w_bits", "a_bits", "a_bits_outlier"):
            s(self, k, parse_bits(getattr(self, k), k))
        if isinstance(self.a_bits, int) and isinstance(self.a_bits_outlier, int) and self.a_bits_outlier < self.a_bits:
            raise RecipeError(f"a_bits_outlier ({self.a_bits_outlier}) must be >= a_bits ({self.a_bits})")
        if not isinstance(self.a_bits, int) and isinstance(self.a_bits_outlier, int):
            raise RecipeError(f"a_bits_outlier ({self.a_bits_outlier}) must be fp16 when a_bits is {self.a_bits.value}")
        if self.n_refresh < 1:
            raise RecipeError(f"n_refresh must be an integer >= 1, got {self.n_refresh!r}")
        for k in ("k_sigma", "k_sigma_delta"):
            if not getattr(self, k) > 0:
                raise RecipeError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.std_correction not in (0, 1) or isinstance(self.std_correction, bool):
            raise RecipeError(f"std_correction must be 0 or 1 (1: Bessel's correction, as torch.std), got {self.std_correction!r}")
        for key, allowed in (("linear_layers", LINEAR_LAYERS), ("ssm_operands", SSM_OPERANDS)):
            v = tuple(getattr(self, key))
            bad = [x for x in v if x not in allowed]
            if bad:
                raise RecipeError(f"{key} has unknown entries {bad}; allowed: {', '.join(allowed)}")
            if len(set(v)) != len(v):
                raise RecipeError(f"{key} has duplicates: {list(v)}")
            s(self, key, v)
        s(self, "exclude", tuple(self.exclude))
        if isinstance(self.calib, dict):
            s(self, "calib", _calib_from_dict(self.calib))
        elif not isinstance(self.calib, CalibConfig):
            raise RecipeError(f"calib must be a CalibConfig or a table, got {type(self.calib).__name__}")
        cls = method_params_type(self.method)
        if self.method_params is None or isinstance(self.method_params, dict):
            s(self, "method_params", _params_from_dict(self.method, self.method_params))
        elif not isinstance(self.method_params, cls):
            raise RecipeError(
                f"method_params for {self.method.value} must be {cls.__name__}, got {type(self.method_params).__name__}"
            )
        if self.version != RECIPE_VERSION:
            raise RecipeError(f"recipe version {self.version} is not supported (this ouro reads version {RECIPE_VERSION})")
        try:
            formats_for(self)  # every site's format is valid (e.g. k_sigma > 0, outliers >= inliers)
        except FormatError as e:
            raise RecipeError(f"recipe {self.name!r}: {e}") from None

    @property
    def formats(self) -> QuantFormats:
        """The format of every site (linear input, linear weight, each scan operand) under this recipe."""
        return formats_for(self)

    # -- conveniences ------------------------------------------------------------------------
    def quantizes_linear(self, name: str, kind: str | None = None) -> bool:
        """Whether the linear `name` (of kind `kind`, ouro.calib.families.LinearSite) is quantized."""
        listed = name in self.linear_layers or (kind is not None and kind in self.linear_layers)
        return listed and name not in self.exclude and (kind is None or kind not in self.exclude)

    def quantizes_ssm(self, operand: str) -> bool:
        return operand in self.ssm_operands

    def with_(self, **changes) -> "Recipe":
        """A copy with some fields replaced (validated again). `calib={...}` merges into calib."""
        if isinstance(changes.get("calib"), dict):
            changes["calib"] = replace(self.calib, **changes["calib"])
        return replace(self, **changes)

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "calib":
                v = {k: (x.value if isinstance(x, Enum) else x) for k, x in asdict(v).items()}
            elif f.name == "method_params":
                v = asdict(v)
            elif isinstance(v, Enum):
                v = v.value
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "recipe") -> "Recipe":
        d = dict(d)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RecipeError(f"{source}: unknown key(s) {unknown}; known: {sorted(names)}")
        if "name" not in d:
            raise RecipeError(f"{source}: missing key 'name'")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:  # wrong value types / values: name the file
            msg = str(e)
            raise RecipeError(msg if msg.startswith(f"{source}:") else f"{source}: {msg}") from None

    def to_toml(self) -> str:
        import tomli_w

        d = self.to_dict()
        head = {k: v for k, v in d.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict) and v}
        return tomli_w.dumps({**head, **tables})

    @classmethod
    def from_toml(cls, text: str | bytes, *, source: str = "recipe") -> "Recipe":
        """A recipe from TOML text (bytes must be UTF-8); every error names `source`."""
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecipeError(f"{source}: not a UTF-8 text file (byte {e.start}: {bytes(text)[e.start:e.start + 1]!r}); "
                                  "save it as UTF-8 TOML") from None
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{source}: not valid TOML: {e}") from None
        return cls.from_dict(d, source=source)


def _calib_from_dict(d: dict) -> CalibConfig:
    names = {f.name for f in fields(CalibConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise RecipeError(f"unknown calib key(s) {unknown}; known: {sorted(names)}")
    return CalibConfig(**d)


# ------------------------------------------------------------------------------------- presets
def _preset_dir():
    return resources.files(_PRESET_PACKAGE).joinpath("presets")


def _read_preset(rel: str) -> dict | None:
    p = _preset_dir().joinpath(rel)
    if not p.is_file():
        return None
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"preset file {rel} is not valid TOML: {e}") from None


def list_presets(method: Method | str = Method.OUROMAMBA) -> list[str]:
    """Preset names available for `method` (base presets plus the method's own)."""
    m = _enum(Method, method, "method")
    root = _preset_dir()
    names = {p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml")}
    sub = root.joinpath(m.value)
    if m is not Method.OUROMAMBA and sub.is_dir():
        names |= {p.name[:-5] for p in sub.iterdir() if p.name.endswith(".toml")}
    return sorted(names)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def get_preset(name: str, method: Method | str = Method.OUROMAMBA) -> Recipe:
    """The named preset (w4a4, w4a8, w6a6, w8a8, ...) for `method`."""
    m = _enum(Method, method, "method")
    key = name.lower().strip()
    base = _read_preset(f"{key}.toml")
    over = _read_preset(f"{m.value}/{key}.toml") if m is not Method.OUROMAMBA else None
    if base is None and over is None:
        raise RecipeError(f"unknown preset {name!r} for method {m.value}; available: {', '.join(list_presets(m))}")
    d = _merge(base or {}, over or {})
    if m is not Method.OUROMAMBA and over is None:
        d.pop("method_params", None)  # the base's params belong to OuroMamba
    d["method"] = m.value
    if over is None and m is not Method.OUROMAMBA:
        d["name"] = f"{key}-{m.value}"
        d["description"] = f"{key.upper()} bit widths of the OuroMamba preset, method {m.value}"
    return Recipe.from_dict(d, source=f"preset {key} ({m.value})")


def resolve_recipe(preset: str | None = None, recipe_file: str | Path | None = None, method: Method | str | None = None,
                   target: Target | str | None = None) -> Recipe:
    """The recipe the CLI uses: a preset or a TOML file, then `--method` if given.

    A recipe file may name a method; `--method` overrides it (method_params are then reset to the
    method's defaults unless the file's method is the same). With `target`, a recipe that target
    cannot express is refused here, before any work (`check_recipe_target`)."""
    if preset and recipe_file:
        raise RecipeError("give either a preset or a recipe file, not both")
    if recipe_file:
        p = Path(recipe_file)
        if not p.is_file():
            raise RecipeError(f"recipe file {str(p)!r} does not exist")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise RecipeError(f"cannot read recipe file {str(p)!r}: {e.strerror}") from None
        r = Recipe.from_toml(data, source=str(p))
        if method is not None and _enum(Method, method, "method") is not r.method:
            r = replace(r, method=_enum(Method, method, "method"), method_params=None)
    else:
        if not preset:
            if method is None:
                raise RecipeError("no recipe: give a preset (--w4a4, --w4a8, --w6a6, --w8a8) or --recipe FILE")
            preset = "w4a4"
        r = get_preset(preset, Method.OUROMAMBA if method is None else method)
    if target is not None:
        check_recipe_target(r, target)
    return r


def check_recipe_target(recipe: Recipe, target: Target | str) -> None:
    """Raise `TargetError` (a RecipeError) when `target` cannot express `recipe`, naming the target,
    what it supports, and a target that would take the recipe."""
    check_target(recipe.formats, target, recipe_name=recipe.name)
