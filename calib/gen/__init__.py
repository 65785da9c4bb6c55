"""OuroMamba-Gen: data-free synthetic calibration images (seed Algorithm 1, ALGORITHMS.md §1.1).

    images = generate_calibration(model, 128, seed=0)          # (128, C, H, W), normalised input
    res, resumed = generate_to_folder(model, 128, "synth/")     # resumable folder, what `ouro-export gen` writes
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
from .features import enhanced_attention, state_attention, state_attention_ref
from .generate import (
    GenResult,
    generate,
    generate_calibration,
    generate_to_folder,
    image_seed,
    initial_images,
    input_normalization,
    save_synthetic_dir,
)
from .instrument import ScanRecord, record_scans
from .losses import gen_losses, gen_losses_ref
from .storage import GenFolderError, load_synthetic_dir

__all__ = [
    "GenConfig",
    "GenFolderError",
    "GenResult",
    "ScanRecord",
    "contrastive_loss",
    "enhanced_attention",
    "gen_losses",
    "gen_losses_ref",
    "generate",
    "generate_calibration",
    "generate_to_folder",
    "image_seed",
    "implicit_attention",
    "implicit_attention_ref",
    "initial_images",
    "input_normalization",
    "load_synthetic_dir",
    "neighbourhood_state",
    "neighbourhood_weights",
    "record_scans",
    "save_synthetic_dir",
    "state_attention",
    "state_attention_ref",
]
