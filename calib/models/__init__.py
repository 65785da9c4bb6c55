"""Model definitions (Vim first) with the official state_dict formats."""
from .vim import ARCHS, Block, MambaMixer, MixerOps, RMSNorm, VimConfig, VisionMamba, build_model

__all__ = ["ARCHS", "Block", "MambaMixer", "MixerOps", "RMSNorm", "VimConfig", "VisionMamba", "build_model"]
