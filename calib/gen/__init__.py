"""OuroMamba-Gen: data-free synthetic calibration images (seed Algorithm 1, ALGORITHMS.md §1.1).

    images = generate_calibration(model, 128, seed=0)          # (128, C, H, W), normalised input
    images = load_synthetic_dir("synth/")                       # a folder written by `ouro-export gen`
"""
from .attention import (
    contrastive_loss,
    implicit_attention,
    implicit_attention_ref,
    neighbourhood_state,
    neighbourhood_weights,
)
from .config import GenConfig
from .generate import GenResult, gen_losses, generate, generate_calibration, input_normalization, load_synthetic_dir, save_synthetic_dir
from .instrument import ScanRecord, record_scans

__all__ = [
    "GenConfig",
    "GenResult",
    "ScanRecord",
    "contrastive_loss",
    "gen_losses",
    "generate",
    "generate_calibration",
    "implicit_attention",
    "implicit_attention_ref",
    "input_normalization",
    "load_synthetic_dir",
    "neighbourhood_state",
    "neighbourhood_weights",
    "record_scans",
    "save_synthetic_dir",
]
