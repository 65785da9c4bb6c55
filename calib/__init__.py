"""ouro.calib: models, checkpoint loading, selective scan, quantizers, calibration, synthetic data."""
from .quant.calibrate import calibrate
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
