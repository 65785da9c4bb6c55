"""The model-family registry: what the generic pipeline asks of a model family, and the lookups.

A model family (Vim, VMamba, ...) is one module under `ouro.calib.families` that subclasses
`ModelFamily` and registers an instance with `register_family`; every module of that package is
imported on first use (`ouro.calib.families.all_families`), so a new family is one new file.
Generic code (checkpoint loading, calibration, QuantState, metrics, export, Gen) never names a
family: it asks the registry.

What a family answers (each method's docstring below has the details):

  configs and files
    name, label, order            registry key ("vim"), display name, position in listings
    config_type, model_type        its frozen config dataclass and nn.Module class
    archs                          `--arch` names -> configs (names are unique across families)
    safe_globals                   types its official files pickle besides tensors/builtins (allow-listed
                                   for torch.load(weights_only=True), e.g. argparse.Namespace)
    demo                           the embedded demo model (`DemoSpec`), or None
    build(cfg, device)             a randomly initialised model
    config_from_dict(d)            the config of a QuantState header / demo card
    resolve_arch(name)             an arch name (or official model name) -> config, None if not its own
    claims(sd) / why_not(sd)       whether a state_dict has this family's keys; one line saying why not
    file_hints(obj)                what the file's training args / config say (img_size, ...)
    load_state_dict(sd, cfg, ...)  infer the architecture from key shapes (cfg None), build, strict load,
                                   each problem a CheckpointError in the family's own words
  quantization
    hook_points(model)             the modules that hold `.ops` (`HookPoint`): their linears by name
                                   (`LinearSite`: kind, module, token count) and scans by direction
                                   (`ScanSite`: reverse flag, token count and layout, d_inner, d_state)
    units(model), entry(model)     the calibration units in forward order (`Unit`: module, glue after it)
                                   and the module whose inputs are the first unit's input state
    unit_target(inputs, outputs)   the tensor the block-wise loss compares (FP vs quantized)
    unit_stream(outputs)           the residual stream after a unit (per-block SQNR)
    work_numel(cfg)                largest activation of a unit per image (thread heuristics)
  export
    export_module(model, fp16)     the module traced for the FP ONNX graph (scans hooked through the
                                   hook points: one `ouro::SelectiveScan` node per ScanSite)
  Gen (OuroMamba-Gen)
    gen_layout(point, scan)        the 2-D patch grid of a scan's tokens (`GenLayout`), for the
                                   Delta-weighted p x p neighbourhood of the enhanced implicit attention
    gen_forward(model, x, hook)    logits, running `hook(point)` after each hook point's forward
    gen_losses(model, x, t, cfg)   OuroMamba-Gen's (L^C, L^O, logits); default from the two above

Everything a hook point's `.ops` receives goes through `ops.linear(name, module, x)` and
`ops.scan(direction, inputs)` (`ouro.calib.scan.ScanInputs`); `override_ops(model, make)` swaps
them for every hook point (quantizers, export hooks, Gen recorders) and restores them after.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "LinearSite",
    "ScanSite",
    "HookPoint",
    "Unit",
    "DemoSpec",
    "GenLayout",
    "ModelFamily",
    "register_family",
    "all_families",
    "get_family",
    "family_of",
    "family_for_arch",
    "family_for_config",
    "arch_names",
    "override_ops",
    "iter_hook_points",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unsafe, corrupt, of no known family, or not the requested arch."""


# ------------------------------------------------------------------------------ sites and units
@dataclass(frozen=True)
class LinearSite:
    """A linear layer called through a hook point's `ops.linear(name, module, x)`.

    name: the ops name (unique within the hook point); kind: what a recipe's `linear_layers` may
    name instead (e.g. "x_proj" for VMamba's x_proj_0..3; Vim's kinds are its names); module: an
    nn.Linear or anything with .weight/.bias/.in_features/.out_features; seq_len: tokens on the L axis
    of its (B, L, in) input, in the order the model feeds them (per-token scales index that order);
    delta_for: the scan direction whose delta (pre-softplus, bias included) its output is (dt_proj)."""

    name: str
    kind: str
    module: Any
    seq_len: int
    delta_for: str | None = None


@dataclass(frozen=True)
class ScanSite:
    """A selective scan called through `ops.scan(direction, inputs)`.

    direction: the ops name (the ONNX node is `<hook path>.scan_<direction>`); reverse: the scan runs
    from the last position of its layout to the first (the node's `reverse` attribute); layout: the
    token order of its (B, L, ...) operands (e.g. "sequence", "row", "col"), documented by the family;
    per-token tables (quantization scales, outlier windows) index positions of that layout."""

    direction: str
    reverse: bool
    seq_len: int
    d_inner: int
    d_state: int
    layout: str = "sequence"


@dataclass(frozen=True)
class HookPoint:
    """A module holding `.ops` (a dataclass with at least `linear` and `scan` fields).

    index: position in forward order (`Site.layer`); path: module path (prefix of its ONNX node
    names); key: prefix of its tensors in a QuantState; unit: index of its calibration unit."""

    index: int
    path: str
    key: str
    module: nn.Module
    unit: int
    linears: tuple[LinearSite, ...] = ()
    scans: tuple[ScanSite, ...] = ()

    def scan(self, direction: str) -> ScanSite:
        for s in self.scans:
            if s.direction == direction:
                return s
        raise KeyError(f"{self.path} has no scan direction {direction!r}; it has {[s.direction for s in self.scans]}")

    def linear(self, name: str) -> LinearSite:
        for s in self.linears:
            if s.name == name:
                return s
        raise KeyError(f"{self.path} has no linear {name!r}; it has {[s.name for s in self.linears]}")


State = tuple
"""A unit's input or output: a tuple of tensors (or None), e.g. Vim's (hidden, residual)."""


@dataclass(frozen=True)
class Unit:
    """One calibration unit: `module(*state)` -> output state (a tensor is read as a 1-tuple); `post`
    (FP glue such as a downsampling layer, identical in the FP and the quantized model) maps the
    output to the next unit's input. path: for progress bars and errors."""

    path: str
    module: nn.Module
    post: Callable[[State], State] | None = None

    def run(self, state: State) -> State:
        out = self.module(*state)
        return out if isinstance(out, tuple) else (out,)

    def next_input(self, out: State) -> State:
        return out if self.post is None else self.post(out)


@dataclass(frozen=True)
class DemoSpec:
    """An embedded demo model: files under ouro/calib/demo/ and the config it was trained with."""

    checkpoint: str
    card: str
    config: Any


@dataclass(frozen=True)
class GenLayout:
    """Where the tokens of one scan sit on the 2-D patch grid (OuroMamba-Gen's neighbourhoods).

    grid: (H, W) of the patch grid; positions: (L,) long, the row-major grid index h*W + w of the
    token at each position of the scan's layout, or -1 for a token that is not a patch (Vim's CLS)."""

    grid: tuple[int, int]
    positions: Tensor

    @property
    def patch_positions(self) -> Tensor:
        """Layout positions of the patches, ordered by their grid index (the rows of the Gen features)."""
        pos = self.positions
        idx = torch.nonzero(pos >= 0).flatten()
        return idx[torch.argsort(pos[idx])]


# ------------------------------------------------------------------------------ the interface
class ModelFamily:
    """Base class of a model family (module docstring). Subclasses set the class attributes and
    implement the methods that raise NotImplementedError here."""

    name: ClassVar[str]
    label: ClassVar[str]
    order: ClassVar[int] = 100
    config_type: ClassVar[type]
    model_type: ClassVar[type]
    archs: ClassVar[Mapping[str, Any]] = {}
    safe_globals: ClassVar[tuple] = ()
    demo: ClassVar[DemoSpec | None] = None

    # -- configs and files ---------------------------------------------------------------------
    def build(self, cfg, device: torch.device | str | None = None) -> nn.Module:
        with torch.device(device or "cpu"):
            return self.model_type(cfg)

    def config_from_dict(self, d: Mapping) -> Any:
        return self.config_type(**d)

    def resolve_arch(self, arch: str) -> Any | None:
        """The config an arch name stands for, or None when the name is not this family's."""
        return self.archs.get(arch)

    def claims(self, sd: Mapping[str, Tensor]) -> bool:
        raise NotImplementedError

    def why_not(self, sd: Mapping[str, Tensor]) -> str:
        """One line: why `sd` is not a state_dict of this family (its signature keys it lacks)."""
        raise NotImplementedError

    def file_hints(self, obj: object) -> dict:
        """Hints for `load_state_dict` from the loaded file object (training args / config); default none."""
        return {}

    def load_state_dict(self, sd: Mapping[str, Tensor], cfg=None, *, source: str = "state_dict", hints: Mapping | None = None,
                        img_size: int | None = None, device: torch.device | str | None = None) -> nn.Module:
        raise NotImplementedError

    # -- quantization --------------------------------------------------------------------------
    def hook_points(self, model: nn.Module) -> list[HookPoint]:
        raise NotImplementedError

    def units(self, model: nn.Module) -> list[Unit]:
        raise NotImplementedError

    def entry(self, model: nn.Module) -> nn.Module:
        """The module whose positional forward inputs are the first unit's input state."""
        raise NotImplementedError

    def unit_target(self, inputs: State, outputs: State) -> Tensor:
        raise NotImplementedError

    def unit_stream(self, outputs: State) -> Tensor:
        raise NotImplementedError

    def work_numel(self, cfg) -> int:
        raise NotImplementedError

    # -- export --------------------------------------------------------------------------------
    def export_module(self, model: nn.Module, fp16: bool = False) -> nn.Module:
        """The module torch.onnx.export traces (default: the model itself; fp16 must be overridden)."""
        if fp16:
            raise NotImplementedError(f"{self.label}: no fp16 FP export")
        return model

    # -- Gen -----------------------------------------------------------------------------------
    def gen_layout(self, model: nn.Module, point: HookPoint, scan: ScanSite) -> GenLayout:
        raise NotImplementedError(f"{self.label}: OuroMamba-Gen does not know this family's patch grid")

    def gen_losses(self, model: nn.Module, x: Tensor, targets: Tensor, cfg) -> tuple[Tensor, Tensor, Tensor]:
        """OuroMamba-Gen's per-image (L^C, L^O) and the logits (cfg: ouro.calib.gen.GenConfig). Default:
        the per-direction definition on the patch grid from `gen_layout` / `gen_forward`
        (ouro.calib.gen.grid, whose docstring defines it); a family may override it with a faster
        form of the same numbers (Vim: block-checkpointed)."""
        from ..gen.grid import family_gen_losses

        return family_gen_losses(model, x, targets, cfg)

    def gen_forward(self, model: nn.Module, x: Tensor, after_point: Callable[[HookPoint], Any]) -> Tensor:
        """The model's logits on x, with `after_point(point)` called right after each hook point's
        forward (so a Gen loss term can be computed from what that point's scans recorded, and the
        block can be checkpointed). Default: plain forward with forward hooks on the hook modules."""
        points = self.hook_points(model)
        handles = [p.module.register_forward_hook(lambda _m, _a, _o, p=p: after_point(p)) for p in points]
        try:
            return model(x)
        finally:
            for h in handles:
                h.remove()

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


# ------------------------------------------------------------------------------ the registry
_FAMILIES: dict[str, ModelFamily] = {}
_LOADED = False


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family (an instance). Arch names must not collide with another family's."""
    if family.name in _FAMILIES and type(_FAMILIES[family.name]) is not type(family):
        raise ValueError(f"model family {family.name!r} registered twice")
    for other in _FAMILIES.values():
        if other.name != family.name:
            clash = set(other.archs) & set(family.archs)
            if clash:
                raise ValueError(f"model families {other.name} and {family.name} both define architectures {sorted(clash)}")
    _FAMILIES[family.name] = family
    return family


def _load() -> None:
    """Import every module of ouro.calib.families (each registers its family)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    pkg = Path(__file__).parent
    for m in sorted(pkgutil.iter_modules([str(pkg)]), key=lambda m: m.name):
        if m.name != "base" and not m.name.startswith("_"):
            importlib.import_module(f"{__package__}.{m.name}")


def all_families() -> list[ModelFamily]:
    _load()
    return sorted(_FAMILIES.values(), key=lambda f: (f.order, f.name))


def get_family(name: str) -> ModelFamily:
    _load()
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in all_families())}")
    return _FAMILIES[name]


def family_of(model: nn.Module) -> ModelFamily:
    """The family whose model class `model` is (or whose QuantizedModel it is)."""
    _load()
    module = getattr(model, "module", model)
    for cls in type(module).__mro__:
        for fam in _FAMILIES.values():
            if fam.model_type is cls:
                return fam
    raise TypeError(f"{type(module).__name__} is not a model of a registered family "
                    f"({', '.join(f'{f.label} ({f.model_type.__name__})' for f in all_families())})")


def family_for_config(cfg) -> ModelFamily:
    _load()
    for fam in _FAMILIES.values():
        if isinstance(cfg, fam.config_type):
            return fam
    raise TypeError(f"{type(cfg).__name__} is not the config of a registered model family")


def family_for_arch(arch: str) -> tuple[ModelFamily, Any]:
    """(family, config) of an architecture name; CheckpointError listing every known name otherwise."""
    for fam in all_families():
        cfg = fam.resolve_arch(arch)
        if cfg is not None:
            return fam, cfg
    raise CheckpointError(f"unknown architecture {arch!r}; known: {', '.join(arch_names())}")


def arch_names() -> list[str]:
    return [a for fam in all_families() for a in fam.archs]


def iter_hook_points(model: nn.Module) -> Iterator[HookPoint]:
    module = getattr(model, "module", model)
    yield from family_of(module).hook_points(module)


@contextmanager
def override_ops(model: nn.Module, make: Callable[[HookPoint], dict]) -> Iterator[list[HookPoint]]:
    """Temporarily replace fields of every hook point's `ops` (`make(point)` returns them, e.g.
    {"scan": hook}; it sees the point's current ops, so hooks can wrap what is installed); the
    previous ops are restored on exit. Yields the hook points."""
    points = list(iter_hook_points(model))
    saved = [(p.module, p.module.ops) for p in points]
    try:
        for p, (m, ops) in zip(points, saved):
            m.ops = replace(ops, **make(p))
        yield points
    finally:
        for m, ops in saved:
            m.ops = ops
