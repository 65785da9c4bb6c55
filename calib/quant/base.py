"""Quantizer protocol, the per-mixer quantized ops, and the METHOD registry.

Every quantization method (OuroMamba here; PTQ4VM, QMamba, min-max, percentile in their own
modules) plugs in through one `MethodSpec` registered with `register_method`. The spec says how
to build the quantizer of each *site* (a linear input, a linear weight, an SSM operand) and may
override the quantized linear and the quantized scan (for smoothing, TGQ on h, ...). The model is
never edited: the model's family (ouro.calib.families) lists its hook points (the modules holding
`.ops`, with their linears and scans), and `QuantizedMixerOps.install(point)` plugs one hook
point's quantizers into its `ops`. Nothing here knows a family: sites, token counts, scan
directions and their reverse flags all come from the hook points.

Quantizer life cycle (driven by `calibrate`):
    mode FP       -> forward is the identity (the FP reference pass)
    mode OBSERVE  -> forward records statistics (`observe`) and returns x unchanged
    init_from_stats(calib)   static initialisation (L_p grid search), frees the statistics
    mode QUANT    -> forward is the fake quantization (`quantize`), differentiable (STE)
    freeze()      -> after tuning: weights become integer codes; forward = codes * scale
    mode EXPORT   -> forward is `export`: the quantizer's standard Q/DQ nodes (ouro.calib.quant.qdq),
                     computing in PyTorch exactly what those nodes compute (the static part)
Each quantizer holds its `format` (ouro.recipes.formats), built from the recipe's `formats_for`.
State for QuantState: `state_dict()` of the quantizer (parameters and buffers) after `freeze()`.
A calibrated model is a `QuantizedModel`: the quantized module plus its recipe and calibration facts.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ouro.recipes import ActFormat, CalibConfig, LossKind, Method, QuantFormats, Recipe, WeightFormat

from ..families.base import HookPoint, family_of
from ..device import module_device
from ..scan import ScanInputs, selective_scan

__all__ = [
    "QuantMode",
    "Quantizer",
    "Site",
    "QuantizedMixerOps",
    "QuantizedModel",
    "ScanCore",
    "MethodSpec",
    "METHODS",
    "SCAN_OPERANDS",
    "register_method",
    "get_method",
    "LOSSES",
    "default_linear",
    "default_scan",
    "fp_scan_core",
    "quantize_model",
    "iter_quant_ops",
    "iter_quant_points",
    "iter_quantizers",
    "set_quant_mode",
    "export_mode",
]


class QuantMode(str, Enum):
    FP = "fp"
    OBSERVE = "observe"
    QUANT = "quant"
    EXPORT = "export"


class Quantizer(nn.Module):
    """Base class of every quantizer module (the protocol, with defaults).

    Subclasses implement `quantize`, `init_from_stats` and `export`; they set `group` to the name of
    the optimizer parameter group their learnable tensors belong to ("act", "weight", or a method's
    own), and hold their `format`. `node_name` names the quantizer's nodes in an exported graph
    (`QuantizedMixerOps.build` sets it: `<mixer path>.<linear>` or `<mixer path>.scan_<dir>.<operand>`)."""

    group: str = "act"
    applied_in_linear: bool = False
    """A scan operand quantized inside its producing linear instead of in the scan (OuroMamba's
    delta_before_bias); the scan then leaves it alone."""

    def __init__(self, fmt: ActFormat | WeightFormat) -> None:
        super().__init__()
        if not isinstance(fmt, (ActFormat, WeightFormat)):
            raise TypeError(f"{type(self).__name__} needs an ActFormat or WeightFormat, got {type(fmt).__name__}")
        self.format = fmt
        self.node_name = ""
        self.mode = QuantMode.QUANT
        self.track_stats = False
        self._observed: list[Tensor] = []
        self._stat_num = 0.0
        self._stat_den = 0.0

    # -- protocol -----------------------------------------------------------------------------
    def observe(self, x: Tensor) -> None:
        """Record calibration statistics (default: keep the detached tensor, on its device)."""
        self._observed.append(x.detach().float())

    def observed(self) -> Tensor:
        if not self._observed:
            raise RuntimeError(f"{type(self).__name__}: no calibration statistics observed before init_from_stats")
        return torch.cat(self._observed, 0) if len(self._observed) > 1 else self._observed[0]

    def clear_observed(self) -> None:
        self._observed = []

    def init_from_stats(self, calib: CalibConfig) -> None:
        raise NotImplementedError

    def quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def export(self, x: Tensor) -> Tensor:
        """QuantMode.EXPORT: the quantizer's standard Q/DQ nodes in an ONNX trace (a function of
        ouro.calib.quant.qdq), whose PyTorch forward computes what those nodes compute."""
        raise NotImplementedError(f"{type(self).__name__} ({self.format.describe()}) has no Q/DQ export")

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Learnable tensors by optimizer group (default: all parameters in `self.group`)."""
        ps = [p for p in self.parameters(recurse=False) if p.requires_grad]
        return {self.group: ps} if ps else {}

    def project_(self) -> None:
        """Keep learned parameters valid after an optimizer step (e.g. scales > 0)."""

    def freeze(self) -> None:
        """Fix the calibrated numerics (weights -> integer codes). Default: nothing to do."""

    def state_keys(self) -> list[str]:
        """The state_dict entries a QuantState stores (default: all; training-only tensors such as
        a learned ratio folded into the scale by `freeze` can be left out)."""
        return list(self.state_dict())

    def stats(self) -> dict[str, float]:
        """Counters accumulated while `track_stats` is on (e.g. outlier_rate)."""
        return {}

    def reset_stats(self) -> None:
        self._stat_num = self._stat_den = 0.0

    def forward(self, x: Tensor) -> Tensor:
        if self.mode is QuantMode.FP:
            return x
        if self.mode is QuantMode.OBSERVE:
            self.observe(x)
            return x
        if self.mode is QuantMode.EXPORT:
            return self.export(x)
        return self.quantize(x)


@dataclass(frozen=True)
class Site:
    """Where a quantizer sits. layer: the hook point's index; role: "act" (input of linear `name`),
    "weight" (its weight), "ssm" (scan operand `name` in {delta, B, C, A, D, h, u, abar} of scan
    `direction`, a ScanSite's direction: Vim fwd|bwd, VMamba row_fwd, ...). shape: the tensor's shape
    without the batch dimension ((L, C) for activations, the parameter's shape for weights)."""

    layer: int
    role: str
    name: str
    shape: tuple[int, ...]
    direction: str | None = None

    @property
    def key(self) -> str:
        return self.name if self.direction is None else f"{self.name}_{self.direction}"


QuantizerBuilder = Callable[[Site, Recipe], "Quantizer | None"]


def default_linear(ops: "QuantizedMixerOps", name: str, module: nn.Linear, x: Tensor) -> Tensor:
    """Quantize the input and the weight with the site quantizers, then the FP linear."""
    xq = ops.act[name](x) if name in ops.act else x
    w = ops.weight[name](module.weight) if name in ops.weight else module.weight
    return F.linear(xq, w, module.bias)


SCAN_OPERANDS = {"A": "A", "D": "Dskip", "delta": "delta", "B": "Bm", "C": "Cm", "u": "u"}
"""Quantizer site name of a scan operand -> its `ScanInputs` field, in the order they are quantized
(independent of each other; the constants A and D first, as the exported graph lists them)."""

ScanCore = Callable[..., Tensor]
"""scan_core(direction, inputs, *, reverse, abar_quant=None, h_quant=None) -> y: the recurrence
itself, after the operands are quantized (`QuantizedMixerOps.run_scan_core` passes the direction's
reverse flag). `fp_scan_core` in PyTorch; an exporter swaps in one that emits a node."""


def fp_scan_core(direction: str, inputs: ScanInputs, *, reverse: bool, abar_quant=None, h_quant=None) -> Tensor:
    if abar_quant is not None:
        from ..scan import selective_scan_ref

        return selective_scan_ref(*inputs, delta_softplus=True, reverse=reverse, abar_quant=abar_quant, h_quant=h_quant)
    return selective_scan(*inputs, delta_softplus=True, reverse=reverse, h_quant=h_quant)


def default_scan(ops: "QuantizedMixerOps", direction: str, inputs: ScanInputs) -> Tensor:
    """Quantize the scan operands present in `ops.ssm` (A, D, delta pre-softplus, B, C, u), FP scan."""
    for op, arg in SCAN_OPERANDS.items():
        q = ops.ssm[f"{op}_{direction}"] if f"{op}_{direction}" in ops.ssm else None
        if q is not None and not q.applied_in_linear:
            inputs = inputs._replace(**{arg: ops.quantize_operand(q, getattr(inputs, arg))})
    for inner in ("h", "abar"):
        if f"{inner}_{direction}" in ops.ssm:
            raise NotImplementedError(f"quantizing {inner} inside the recurrence needs a method-specific scan (MethodSpec.scan)")
    return ops.run_scan_core(direction, inputs)


@dataclass(frozen=True)
class MethodSpec:
    """How a method quantizes a mixer. Builders return None to leave a site in FP.

    linear(ops, name, module, x) and scan(ops, direction, inputs: ScanInputs) default to: quantize the input
    and the weight / the SSM operands with the site quantizers, then run the FP op (the scan through
    `ops.scan_core`). In export mode the same functions run with the quantizers in QuantMode.EXPORT;
    export_linear, when set, replaces `linear` there (a method whose linear is one fused Q/DQ export).
    lr(group, calib) gives each optimizer group its learning rate.
    loss: None = the recipe's calib.loss.
    cosine_lr: anneal each block's learning rates to 0 over calib.steps (CosineAnnealingLR, QDrop/QMamba).
    info(module, recipe) -> dict: method-specific facts (`QuantizedModel.method_info`: QuantState header, report)."""

    make_act: QuantizerBuilder
    make_weight: QuantizerBuilder
    make_ssm: QuantizerBuilder
    linear: Callable = default_linear
    scan: Callable = default_scan
    export_linear: Callable | None = None
    lr: Callable[[str, CalibConfig], float] = lambda group, c: c.lr_weight if group == "weight" else c.lr_act
    loss: LossKind | None = None
    description: str = ""
    cosine_lr: bool = False
    info: Callable[[nn.Module, Recipe], dict] | None = None


METHODS: dict[Method, MethodSpec] = {}


def register_method(method: Method | str, spec: MethodSpec) -> MethodSpec:
    METHODS[Method(method)] = spec
    return spec


def get_method(method: Method | str) -> MethodSpec:
    m = Method(method)
    if m not in METHODS:
        from . import registry  # noqa: F401  (imports every method module)
    if m not in METHODS:
        from .registry import IMPORT_ERRORS

        why = "; ".join(f"{k}: {v}" for k, v in IMPORT_ERRORS.items())
        raise NotImplementedError(
            f"quantization method {m.value!r} is not available; available: {', '.join(x.value for x in METHODS)}"
            + (f" (method modules that failed to import: {why})" if why else "")
        )
    return METHODS[m]


# ------------------------------------------------------------------------------------ losses
def cosine_loss(fp: Tensor, q: Tensor) -> Tensor:
    """mean(1 - cos(fp, q)) along the hidden (last) dimension."""
    return (1 - F.cosine_similarity(fp.float(), q.float(), dim=-1, eps=1e-8)).mean()


def mse_loss(fp: Tensor, q: Tensor) -> Tensor:
    return F.mse_loss(q.float(), fp.float())


LOSSES: dict[LossKind, Callable[[Tensor, Tensor], Tensor]] = {LossKind.COSINE: cosine_loss, LossKind.MSE: mse_loss}


# --------------------------------------------------------------------------- per-hook-point ops
class QuantizedMixerOps(nn.Module):
    """The quantizers of one hook point (a mixer), plugged into its `ops` by `install`.

    act[name] / weight[name]: input / weight quantizer of linear `name`;
    ssm[f"{operand}_{direction}"]: scan-operand quantizers (one per direction, not shared).
    layer: the hook point's index; prefix: its module path (e.g. "layers.3.mixer"), the prefix of its
    node names in an exported graph; key: the prefix of its tensors in a QuantState (e.g. "layers.3").
    reverse[direction]: the direction's scan runs backwards; delta_of[linear]: the direction whose delta
    that linear produces (dt_proj); kind[linear]: the linear's kind. scan_core: the recurrence the
    method's scan ends in (`fp_scan_core`; an exporter swaps it through `export_mode`)."""

    def __init__(self, spec: MethodSpec, point: HookPoint) -> None:
        super().__init__()
        self.spec = spec
        self.layer = point.index
        self.prefix = point.path
        self.key = point.key
        self.reverse = {s.direction: s.reverse for s in point.scans}
        self.delta_of = {s.name: s.delta_for for s in point.linears if s.delta_for is not None}
        self.kind = {s.name: s.kind for s in point.linears}
        self.act = nn.ModuleDict()
        self.weight = nn.ModuleDict()
        self.ssm = nn.ModuleDict()
        self.scan_core: ScanCore = fp_scan_core
        self.exporting = False

    @classmethod
    def build(cls, point: HookPoint, recipe: Recipe, spec: MethodSpec | None = None) -> "QuantizedMixerOps":
        """The quantizers of every site of `point` the recipe quantizes: a linear when its name or kind
        is in `recipe.linear_layers` (and not excluded), each scan operand of `recipe.ssm_operands` per
        scan direction, shaped by the point's token counts and sizes."""
        spec = spec or get_method(recipe.method)
        ops = cls(spec, point)
        for site in point.linears:
            if not recipe.quantizes_linear(site.name, site.kind):
                continue
            mod = site.module
            qa = spec.make_act(Site(point.index, "act", site.name, (site.seq_len, mod.in_features)), recipe)
            qw = spec.make_weight(Site(point.index, "weight", site.name, tuple(mod.weight.shape)), recipe)
            if qa is not None:
                qa.node_name = f"{ops.prefix}.{site.name}"
                ops.act[site.name] = qa
            if qw is not None:
                qw.node_name = f"{ops.prefix}.{site.name}"
                ops.weight[site.name] = qw
        for op in recipe.ssm_operands:
            for sc in point.scans:
                L, D, N = sc.seq_len, sc.d_inner, sc.d_state
                shape = {"delta": (L, D), "B": (L, N), "C": (L, N), "A": (D, N), "D": (D,), "h": (L, D, N), "u": (L, D),
                         "abar": (L, D, N)}[op]
                q = spec.make_ssm(Site(point.index, "ssm", op, shape, sc.direction), recipe)
                if q is not None:
                    q.node_name = f"{ops.prefix}.scan_{sc.direction}.{op}"
                    ops.ssm[f"{op}_{sc.direction}"] = q
        return ops

    def install(self, point: HookPoint) -> None:
        point.module.add_module("quant", self)
        point.module.ops = replace(point.module.ops, linear=self.linear, scan=self.scan)

    def linear(self, name: str, module: nn.Linear, x: Tensor) -> Tensor:
        if self.exporting and self.spec.export_linear is not None:
            return self.spec.export_linear(self, name, module, x)
        return self.spec.linear(self, name, module, x)

    def scan(self, direction: str, inputs: ScanInputs) -> Tensor:
        return self.spec.scan(self, direction, inputs)

    def run_scan_core(self, direction: str, inputs: ScanInputs, **kw) -> Tensor:
        """The recurrence of `direction` (after its operands are quantized), with its reverse flag."""
        return self.scan_core(direction, inputs, reverse=self.reverse[direction], **kw)

    def quantize_operand(self, q: Quantizer, x: Tensor) -> Tensor:
        """q(x) for a scan operand. In export mode an activation's Q/DQ nodes are emitted in the
        mixer's scope (named by the quantizer's node_name), as a linear's are; constants (A, D) go
        through the quantizer module and are folded into the graph."""
        if self.exporting and isinstance(q.format, ActFormat):
            return q.export(x)
        return q(x)

    def quantizers(self) -> Iterator[tuple[str, Quantizer]]:
        for d, prefix in ((self.act, "act"), (self.weight, "weight"), (self.ssm, "ssm")):
            for k, q in d.items():
                yield f"{prefix}.{k}", q


# ------------------------------------------------------------------------------ the calibrated model
@dataclass(frozen=True)
class QuantizedModel:
    """A calibrated fake-quant model and what made it.

    module: a quantized copy of the FP model (quantizers installed in every hook point; the FP model
    is untouched); recipe: the recipe it was calibrated under (`formats` = recipe.formats);
    calib_losses: the last tuning loss of each calibration unit (empty when loaded from a QuantState);
    method_info: facts the method records (QuantState header, report). Call it like the model."""

    module: nn.Module
    recipe: Recipe
    calib_losses: tuple[float, ...] = ()
    method_info: dict = field(default_factory=dict)

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(x)

    @property
    def cfg(self):
        return self.module.cfg

    @property
    def formats(self) -> QuantFormats:
        return self.recipe.formats

    def eval(self) -> "QuantizedModel":
        self.module.eval()
        return self


def _module(m) -> nn.Module:
    return m.module if isinstance(m, QuantizedModel) else m


# ------------------------------------------------------------------------------ model helpers
def quantize_model(model: nn.Module, recipe: Recipe) -> QuantizedModel:
    """A deep copy of `model` with (uninitialised) quantizers installed in every hook point."""
    spec = get_method(recipe.method)
    qmodule = copy.deepcopy(model)
    for p in qmodule.parameters():  # only quantizer tensors are learned
        p.requires_grad_(False)
    for point in family_of(qmodule).hook_points(qmodule):
        with torch.device(module_device(point.module)):  # quantizers live with their mixer (--device)
            ops = QuantizedMixerOps.build(point, recipe, spec)
        ops.install(point)
    return QuantizedModel(qmodule, recipe)


def iter_quant_points(qmodel: QuantizedModel | nn.Module) -> Iterator[tuple[HookPoint, QuantizedMixerOps]]:
    """(hook point, its quantizers) of every quantized hook point, in forward order."""
    module = _module(qmodel)
    for point in family_of(module).hook_points(module):
        q = getattr(point.module, "quant", None)
        if isinstance(q, QuantizedMixerOps):
            yield point, q


def iter_quant_ops(qmodel: QuantizedModel | nn.Module) -> Iterator[tuple[int, QuantizedMixerOps]]:
    """(hook point index, its quantizers); for Vim the index is the layer."""
    for point, q in iter_quant_points(qmodel):
        yield point.index, q


def iter_quantizers(module: QuantizedModel | nn.Module) -> Iterator[tuple[str, Quantizer]]:
    for name, m in _module(module).named_modules():
        if isinstance(m, Quantizer):
            yield name, m


def set_quant_mode(module: QuantizedModel | nn.Module, mode: QuantMode | str, *, track_stats: bool | None = None) -> None:
    mode = QuantMode(mode)
    for _, q in iter_quantizers(module):
        q.mode = mode
        if track_stats is not None:
            q.track_stats = track_stats


@contextmanager
def export_mode(qmodel: QuantizedModel, make_scan_core: Callable[[QuantizedMixerOps], ScanCore]) -> Iterator[QuantizedModel]:
    """Every quantizer in QuantMode.EXPORT and every hook point's scan ending in `make_scan_core(ops)`
    (ops.prefix: the point's module path); the previous modes and cores are restored on exit.

    Run the model inside (traced by torch.onnx.export, or eagerly: then it computes what the
    exported Q/DQ graph computes, the twin of that graph)."""
    ops = [o for _, o in iter_quant_ops(qmodel)]
    module = _module(qmodel)
    if len(ops) != len(family_of(module).hook_points(module)):
        raise ValueError("this model is not calibrated: some mixers carry no quantizers (use calibrate or load_quant_state)")
    modes = [(q, q.mode) for _, q in iter_quantizers(qmodel)]
    saved = [(o, o.scan_core) for o in ops]
    try:
        set_quant_mode(qmodel, QuantMode.EXPORT)
        for o in ops:
            o.scan_core, o.exporting = make_scan_core(o), True
        yield qmodel
    finally:
        for q, m in modes:
            q.mode = m
        for o, core in saved:
            o.scan_core, o.exporting = core, False
