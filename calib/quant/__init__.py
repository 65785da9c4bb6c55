"""ouro.calib.quant: quantizer modules, the method registry, calibration and QuantState.

    from ouro.calib.quant import calibrate, save_quant_state, load_quant_state
    qmodel = calibrate(model, get_preset("w4a4"), forward_loop, seed=0)   # a QuantizedModel

Methods register a `MethodSpec` with `register_method` (see base.py); each method lives in its own
module of this package and is imported by `registry`.
"""
from . import registry  # noqa: F401  (registers every available method)
from .base import (
    LOSSES,
    METHODS,
    MethodSpec,
    QuantizedMixerOps,
    QuantizedModel,
    QuantMode,
    Quantizer,
    ScanCore,
    Site,
    export_mode,
    get_method,
    iter_quant_ops,
    iter_quant_points,
    iter_quantizers,
    quantize_model,
    register_method,
    set_quant_mode,
)
from .calibrate import ForwardLoop, calibrate, capture_block_inputs, capture_unit_inputs
from .ouromamba import ChannelWeightQuantizer, OutlierActQuantizer
from .state import QuantStateError, load_quant_state, read_recipe, save_quant_state

__all__ = [
    "LOSSES",
    "METHODS",
    "ChannelWeightQuantizer",
    "ForwardLoop",
    "MethodSpec",
    "OutlierActQuantizer",
    "QuantMode",
    "QuantStateError",
    "QuantizedMixerOps",
    "QuantizedModel",
    "Quantizer",
    "ScanCore",
    "Site",
    "calibrate",
    "capture_block_inputs",
    "capture_unit_inputs",
    "export_mode",
    "get_method",
    "iter_quant_ops",
    "iter_quant_points",
    "iter_quantizers",
    "load_quant_state",
    "quantize_model",
    "read_recipe",
    "register_method",
    "save_quant_state",
    "set_quant_mode",
]
