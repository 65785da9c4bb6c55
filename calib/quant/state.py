"""QuantState: one .safetensors file with integer weights and every scale/threshold (DESIGN.md §3).

Tensors: the state_dict of every quantizer, keyed `<hook key>.<act|weight|ssm>.<site>.<tensor>`, the
hook key being the family's (Vim `layers.<i>`, VMamba `layers.<s>.blocks.<j>`; ouro.calib.families).
Weight codes of <= 4 bits with an even last dimension are stored packed (`pack_int4`, key suffix
`.int4`, uint8); other codes as int8. Scales and thresholds are fp32, exactly as used.
Header (safetensors metadata key "ouro", JSON):
    format, format_version, recipe (TOML), recipe_version, method, family (the model family's name;
    a file without it was written for a Vim, the only family then), arch (the family's config as a
    dict), package_version, method_info (free-form dict a method records: `QuantizedModel.method_info`)
Loading rebuilds the quantizers from the recipe on the FP model and loads the tensors, so the
reloaded model reproduces the calibrated model's outputs bit-exactly.
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

from ouro.recipes import RECIPE_VERSION, Recipe, RecipeError

from torch import nn

from ..families.base import family_of
from ..quantizers import pack_int4, unpack_int4
from .base import QuantizedModel, QuantMode, iter_quant_points, quantize_model, set_quant_mode

__all__ = ["FORMAT", "FORMAT_VERSION", "QuantStateError", "save_quant_state", "load_quant_state", "read_header", "read_recipe",
           "check_header", "quant_state_tensors"]

FORMAT = "ouro-quant-state"
FORMAT_VERSION = 1
INT4_SUFFIX = ".int4"
_ARCH_LABEL_KEYS = ("name",)  # labels, not architecture
LEGACY_FAMILY = "vim"
"""The family of a QuantState header without a `family` entry (written before there were others)."""


class QuantStateError(ValueError):
    """A QuantState file that cannot be used with this model / this ouro version."""


def _package_version() -> str:
    try:
        return metadata.version("ouro-export")
    except metadata.PackageNotFoundError:
        return "unknown"


def quant_state_tensors(qmodel: QuantizedModel) -> dict[str, Tensor]:
    """The tensors a QuantState stores (int4 codes packed), keyed as in the file."""
    out: dict[str, Tensor] = {}
    for point, ops in iter_quant_points(qmodel):
        for qname, q in ops.quantizers():
            sd = q.state_dict()
            for k in q.state_keys():
                key = f"{point.key}.{qname}.{k}"
                t = sd[k].detach().cpu().contiguous()
                if k == "codes" and q.format.bits <= 4 and t.shape[-1] % 2 == 0:
                    out[key + INT4_SUFFIX] = pack_int4(t)
                else:
                    out[key] = t
    return out


def save_quant_state(qmodel: QuantizedModel, path: str | Path) -> Path:
    """Write the QuantState of a calibrated model (from `calibrate`)."""
    from safetensors.torch import save_file

    recipe = qmodel.recipe
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": recipe.to_toml(),
        "recipe_version": recipe.version,
        "method": recipe.method.value,
        "family": family_of(qmodel.module).name,
        "arch": qmodel.cfg.to_dict(),
        "package_version": _package_version(),
        "method_info": qmodel.method_info,
    }
    path = Path(path)
    save_file(quant_state_tensors(qmodel), str(path), metadata={"ouro": json.dumps(header)})
    return path


def read_header(path: str | Path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise QuantStateError(f"QuantState file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # not a safetensors file
        raise QuantStateError(f"{path}: not a safetensors file ({e})") from None
    if "ouro" not in meta:
        raise QuantStateError(f"{path}: not an ouro QuantState (no 'ouro' header)")
    return check_header(meta["ouro"], path)


HEADER_SCHEMA: dict[str, tuple[type, ...]] = {
    # key: accepted JSON types (bool is never taken for int)
    "format": (str,),
    "format_version": (int,),
    "recipe": (str,),
    "recipe_version": (int,),
    "method": (str,),
    "arch": (dict,),
}
OPTIONAL_HEADER: dict[str, tuple[type, ...]] = {"package_version": (str,), "method_info": (dict,)}


def _json_type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number",
            type(None): "null"}.get(type(v), type(v).__name__)


def check_header(text: str, path: str | Path = "QuantState") -> dict:
    """The parsed, schema-checked 'ouro' header (HEADER_SCHEMA) of a QuantState; one QuantStateError otherwise."""
    try:
        h = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise QuantStateError(f"{path}: its 'ouro' header is not valid JSON ({e}); the file is damaged, recalibrate") from None
    if not isinstance(h, dict):
        raise QuantStateError(f"{path}: its 'ouro' header is {_json_type(h)}, expected an object; the file is damaged")
    if h.get("format") != FORMAT:
        raise QuantStateError(f"{path}: format {h.get('format')!r}, expected {FORMAT!r}")
    if h.get("format_version") != FORMAT_VERSION or isinstance(h.get("format_version"), bool):
        raise QuantStateError(f"{path}: QuantState format version {h.get('format_version')!r} is not supported (this ouro reads {FORMAT_VERSION})")
    for schema, required in ((HEADER_SCHEMA, True), (OPTIONAL_HEADER, False)):
        for key, types in schema.items():
            if key not in h:
                if required:
                    raise QuantStateError(f"{path}: its 'ouro' header has no {key!r}; the file is damaged or not written by ouro")
                continue
            v = h[key]
            if isinstance(v, bool) or not isinstance(v, types):
                raise QuantStateError(f"{path}: header key {key!r} is {_json_type(v)}, expected {_json_type(types[0]())}")
    return h


def _check_tensor(path, key: str, t: Tensor, ref: Tensor, packed: bool) -> None:
    """A stored tensor has the dtype the quantizer holds (uint8 when int4-packed) and finite values."""
    want = torch.uint8 if packed else ref.dtype
    if t.dtype != want:
        raise QuantStateError(f"{path}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}, the recipe stores "
                              f"{str(want).removeprefix('torch.')}; the file is damaged or was edited, recalibrate")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise QuantStateError(f"{path}: tensor {key!r} has {bad} non-finite value(s) (NaN or Inf); recalibrate")


def read_recipe(path: str | Path, header: dict | None = None) -> Recipe:
    """The recipe a QuantState was calibrated under (from its header; no tensors are read), so a
    target that cannot express it is refused before the model is loaded."""
    h = read_header(path) if header is None else header
    if h.get("recipe_version") != RECIPE_VERSION or isinstance(h.get("recipe_version"), bool):
        raise QuantStateError(
            f"{path}: recipe version {h.get('recipe_version')} (written by ouro {h.get('package_version')}) "
            f"does not match this ouro's recipe version {RECIPE_VERSION}; recalibrate"
        )
    if not isinstance(h.get("recipe"), str):
        raise QuantStateError(f"{path}: header key 'recipe' is {_json_type(h.get('recipe'))}, expected a string")
    try:
        return Recipe.from_toml(h["recipe"], source=f"{path} header")
    except RecipeError as e:
        raise QuantStateError(f"{path}: its recipe is not valid for this ouro ({e}); recalibrate") from None


def _arch_mismatch(saved: dict, cfg: dict) -> list[str]:
    keys = sorted((set(saved) | set(cfg)) - set(_ARCH_LABEL_KEYS))
    return [f"{k}: file {saved.get(k)!r} vs model {cfg.get(k)!r}" for k in keys if saved.get(k) != cfg.get(k)]


def load_quant_state(model: nn.Module, path: str | Path) -> QuantizedModel:
    """A quantized copy of the FP `model` with the calibration of `path` (no data needed). A file
    written for another model family or architecture is a QuantStateError naming both."""
    from safetensors.torch import load_file

    h = read_header(path)
    fam = family_of(model)
    saved_family = h.get("family", LEGACY_FAMILY)
    if saved_family != fam.name:
        raise QuantStateError(
            f"{path}: QuantState is for a {saved_family} model ({h.get('arch', {}).get('name')!r}), the model is a "
            f"{fam.name} model ({model.cfg.name!r}); calibrate this model or load its own QuantState"
        )
    recipe = read_recipe(path, h)
    diff = _arch_mismatch(h["arch"], model.cfg.to_dict())
    if diff:
        raise QuantStateError(
            f"{path}: QuantState is for architecture {h.get('arch', {}).get('name')!r}, the model is "
            f"{model.cfg.name!r}; differences: {'; '.join(diff)}"
        )
    qmodel = quantize_model(model, recipe)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # damaged tensor data after a readable header
        raise QuantStateError(f"{path}: its tensors cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    seen: set[str] = set()
    for point, ops in iter_quant_points(qmodel):
        for qname, q in ops.quantizers():
            sd = {}
            full = q.state_dict()
            for k in q.state_keys():
                ref = full[k]
                key = f"{point.key}.{qname}.{k}"
                if key + INT4_SUFFIX in tensors:
                    _check_tensor(path, key + INT4_SUFFIX, tensors[key + INT4_SUFFIX], ref, packed=True)
                    t = unpack_int4(tensors[key + INT4_SUFFIX])
                    seen.add(key + INT4_SUFFIX)
                elif key in tensors:
                    t = tensors[key]
                    _check_tensor(path, key, t, ref, packed=False)
                    seen.add(key)
                else:
                    raise QuantStateError(f"{path}: missing tensor {key!r} for recipe {recipe.name!r}")
                if t.shape != ref.shape:
                    raise QuantStateError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, the model needs {tuple(ref.shape)}")
                sd[k] = t
            missing = set(full) - set(sd)
            q.load_state_dict({**{k: full[k] for k in missing}, **sd})
            for p in q.parameters(recurse=False):
                p.requires_grad_(False)
    extra = sorted(set(tensors) - seen)
    if extra:
        raise QuantStateError(f"{path}: {len(extra)} tensor(s) the recipe does not use, e.g. {extra[:3]}")
    set_quant_mode(qmodel, QuantMode.QUANT)
    qmodel.eval()
    return QuantizedModel(qmodel.module, recipe, (), h.get("method_info", {}))
