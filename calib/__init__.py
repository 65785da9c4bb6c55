"""ouro.calib: models, checkpoint loading, selective scan, quantizers, calibration, synthetic data."""
from .quantizers import ThresholdPolicy, outlier_fake_quant, outlier_quant_ref
from .scan import selective_scan, selective_scan_chunked, selective_scan_ref

__all__ = [
    "ThresholdPolicy",
    "calibrate",
    "outlier_fake_quant",
    "outlier_quant_ref",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
]


def __getattr__(name: str):
    # lazy: ouro.calib.quant imports ouro.recipes, which imports ouro.calib.quantizers
    if name == "calibrate":
        from .quant.calibrate import calibrate

        return calibrate
    raise AttributeError(f"module 'ouro.calib' has no attribute {name!r}")
