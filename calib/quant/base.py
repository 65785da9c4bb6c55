"""Quantizer protocol, the per-mixer quantized ops, and the METHOD registry.

Every quantization method (OuroMamba here; PTQ4VM, QMamba, min-max, percentile in their own
modules) plugs in through one `MethodSpec` registered with `register_method`. The spec says how
to build the quantizer of each *site* (a linear input, a linear weight, an SSM operand) and may
override the quantized linear and the quantized scan (for smoothing, TGQ on h, ...). The model is
never edited: `QuantizedMixerOps.install(mixer)` plugs the quantizers into `mixer.ops`.

Quantizer life cycle (driven by `calibrate`):
    mode FP       -> forward is the identity (the FP reference pass)
    mode OBSERVE  -> forward records statistics (`observe`) and returns x unchanged
    init_from_stats(calib)   static initialisation (L_p grid search), frees the statistics
    mode QUANT    -> forward is the fake quantization (`quantize`), differentiable (STE)
    freeze()      -> after tuning: weights become integer codes; forward = codes * scale
State for QuantState: `state_dict()` of the quantizer (parameters and buffers) after `freeze()`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ouro.recipes import CalibConfig, LossKind, Method, Recipe

from ..models.vim import MambaMixer, MixerOps, VisionMamba
from ..scan import ScanInputs, selective_scan

__all__ = [
    "QuantMode",
    "Quantizer",
    "Site",
    "QuantizedMixerOps",
    "MethodSpec",
    "METHODS",
    "register_method",
    "get_method",
    "LOSSES",
    "quantize_model",
    "iter_quant_ops",
    "iter_quantizers",
    "set_quant_mode",
    "model_recipe",
]


class QuantMode(str, Enum):
    FP = "fp"
    OBSERVE = "observe"
    QUANT = "quant"


class Quantizer(nn.Module):
    """Base class of every quantizer module (the protocol, with defaults).

    Subclasses implement `quantize` and `init_from_stats`; they set `group` to the name of the
    optimizer parameter group their learnable tensors belong to ("act", "weight", or a method's own)."""

    group: str = "act"

    def __init__(self) -> None:
        super().__init__()
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
        return self.quantize(x)


@dataclass(frozen=True)
class Site:
    """Where a quantizer sits. role: "act" (input of linear `name`), "weight" (its weight), "ssm"
    (scan operand `name` in {delta, B, C, A, D, h}, `direction` fwd|bwd). shape: the tensor's shape
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


def _default_linear(ops: "QuantizedMixerOps", name: str, module: nn.Linear, x: Tensor) -> Tensor:
    xq = ops.act[name](x) if name in ops.act else x
    w = ops.weight[name](module.weight) if name in ops.weight else module.weight
    return F.linear(xq, w, module.bias)


SCAN_OPERANDS = {"delta": "delta", "B": "Bm", "C": "Cm", "A": "A", "D": "Dskip", "u": "u"}
"""Quantizer site name of a scan operand -> its `ScanInputs` field."""


def _default_scan(ops: "QuantizedMixerOps", direction: str, inputs: ScanInputs) -> Tensor:
    """Quantize the scan operands present in `ops.ssm` (delta pre-softplus, B, C, A, D), FP scan."""
    for op, arg in SCAN_OPERANDS.items():
        k = f"{op}_{direction}"
        if k in ops.ssm and not getattr(ops.ssm[k], "applied_in_linear", False):
            inputs = inputs._replace(**{arg: ops.ssm[k](getattr(inputs, arg))})
    for inner in ("h", "abar"):
        if f"{inner}_{direction}" in ops.ssm:
            raise NotImplementedError(f"quantizing {inner} inside the recurrence needs a method-specific scan (MethodSpec.scan)")
    return selective_scan(*inputs, delta_softplus=True, reverse=direction == "bwd")


@dataclass(frozen=True)
class MethodSpec:
    """How a method quantizes a mixer. Builders return None to leave a site in FP.

    linear(ops, name, module, x) and scan(ops, direction, inputs: ScanInputs) default to: quantize the input
    and the weight / the SSM operands with the site quantizers, then run the FP op.
    lr(group, calib) gives each optimizer group its learning rate.
    loss: None = the recipe's calib.loss.
    cosine_lr: anneal each block's learning rates to 0 over calib.steps (CosineAnnealingLR, QDrop/QMamba).
    info(qmodel) -> dict: method-specific facts stored as `qmodel.ouro_method_info` (QuantState header, report)."""

    make_act: QuantizerBuilder
    make_weight: QuantizerBuilder
    make_ssm: QuantizerBuilder
    linear: Callable = _default_linear
    scan: Callable = _default_scan
    lr: Callable[[str, CalibConfig], float] = lambda group, c: c.lr_weight if group == "weight" else c.lr_act
    loss: LossKind | None = None
    description: str = ""
    cosine_lr: bool = False
    info: Callable[[nn.Module], dict] | None = None


METHODS: dict[Method, MethodSpec] = {}


def register_method(method: Method | str, spec: MethodSpec) -> MethodSpec:
    METHODS[Method(method)] = spec
    return spec


def get_method(method: Method | str) -> MethodSpec:
    m = Method(method)
    if m not in METHODS:
        from . import _register_all  # noqa: F401  (imports every method module)
    if m not in METHODS:
        from ._register_all import IMPORT_ERRORS

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


# --------------------------------------------------------------------------- per-mixer ops
class QuantizedMixerOps(nn.Module):
    """The quantizers of one mixer, plugged into `mixer.ops` by `install`.

    act[name] / weight[name]: input / weight quantizer of linear `name`;
    ssm[f"{operand}_{direction}"]: scan-operand quantizers (one per direction, not shared)."""

    def __init__(self, spec: MethodSpec, layer: int) -> None:
        super().__init__()
        self.spec = spec
        self.layer = layer
        self.act = nn.ModuleDict()
        self.weight = nn.ModuleDict()
        self.ssm = nn.ModuleDict()

    @classmethod
    def build(cls, mixer: MambaMixer, recipe: Recipe, layer: int, spec: MethodSpec | None = None) -> "QuantizedMixerOps":
        spec = spec or get_method(recipe.method)
        ops = cls(spec, layer)
        cfg = mixer.cfg
        L = cfg.seq_len
        for name in recipe.linear_layers:
            if not recipe.quantizes_linear(name):
                continue
            mod = getattr(mixer, name)
            qa = spec.make_act(Site(layer, "act", name, (L, mod.in_features)), recipe)
            qw = spec.make_weight(Site(layer, "weight", name, tuple(mod.weight.shape)), recipe)
            if qa is not None:
                ops.act[name] = qa
            if qw is not None:
                ops.weight[name] = qw
        shapes = {
            "delta": (L, cfg.d_inner), "B": (L, cfg.d_state), "C": (L, cfg.d_state),
            "A": (cfg.d_inner, cfg.d_state), "D": (cfg.d_inner,), "h": (L, cfg.d_inner, cfg.d_state),
            "u": (L, cfg.d_inner), "abar": (L, cfg.d_inner, cfg.d_state),
        }
        for op in recipe.ssm_operands:
            for direction in ("fwd", "bwd"):
                q = spec.make_ssm(Site(layer, "ssm", op, shapes[op], direction), recipe)
                if q is not None:
                    ops.ssm[f"{op}_{direction}"] = q
        return ops

    def install(self, mixer: MambaMixer) -> None:
        mixer.add_module("quant", self)
        mixer.ops = MixerOps(linear=self.linear, scan=self.scan)

    def linear(self, name: str, module: nn.Linear, x: Tensor) -> Tensor:
        return self.spec.linear(self, name, module, x)

    def scan(self, direction: str, inputs: ScanInputs) -> Tensor:
        return self.spec.scan(self, direction, inputs)

    def quantizers(self) -> Iterator[tuple[str, Quantizer]]:
        for d, prefix in ((self.act, "act"), (self.weight, "weight"), (self.ssm, "ssm")):
            for k, q in d.items():
                yield f"{prefix}.{k}", q


# ------------------------------------------------------------------------------ model helpers
def quantize_model(model: VisionMamba, recipe: Recipe) -> VisionMamba:
    """A deep copy of `model` with (uninitialised) quantizers installed in every mixer."""
    import copy

    spec = get_method(recipe.method)
    qmodel = copy.deepcopy(model)
    for p in qmodel.parameters():  # only quantizer tensors are learned
        p.requires_grad_(False)
    for i, blk in enumerate(qmodel.layers):
        with torch.device(blk.mixer.in_proj.weight.device):  # quantizers live with their mixer
            ops = QuantizedMixerOps.build(blk.mixer, recipe, i, spec)
        ops.install(blk.mixer)
    qmodel.ouro_recipe = recipe
    return qmodel


def model_recipe(qmodel: nn.Module) -> Recipe:
    r = getattr(qmodel, "ouro_recipe", None)
    if r is None:
        raise ValueError("this model carries no quantization recipe (was it made by calibrate / load_quant_state?)")
    return r


def iter_quant_ops(qmodel: VisionMamba) -> Iterator[tuple[int, QuantizedMixerOps]]:
    for i, blk in enumerate(qmodel.layers):
        q = getattr(blk.mixer, "quant", None)
        if isinstance(q, QuantizedMixerOps):
            yield i, q


def iter_quantizers(module: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    for name, m in module.named_modules():
        if isinstance(m, Quantizer):
            yield name, m


def set_quant_mode(module: nn.Module, mode: QuantMode | str, *, track_stats: bool | None = None) -> None:
    mode = QuantMode(mode)
    for _, q in iter_quantizers(module):
        q.mode = mode
        if track_stats is not None:
            q.track_stats = track_stats
