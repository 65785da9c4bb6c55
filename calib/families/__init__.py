"""Model families (Vim, VMamba, ...): each module of this package registers one (`base.ModelFamily`).

    from ouro.calib.families import family_of, get_family
    fam = family_of(model)              # what the pipeline asks of the model: hook points, units, ...
    model = get_family("vmamba").load_state_dict(sd)

See `base` for the interface a family implements.
"""
from .base import (
    CheckpointError,
    DemoSpec,
    GenLayout,
    HookPoint,
    LinearSite,
    ModelFamily,
    ScanSite,
    Unit,
    all_families,
    arch_names,
    family_for_arch,
    family_for_config,
    family_of,
    get_family,
    iter_hook_points,
    override_ops,
    register_family,
)

__all__ = [
    "CheckpointError",
    "DemoSpec",
    "GenLayout",
    "HookPoint",
    "LinearSite",
    "ModelFamily",
    "ScanSite",
    "Unit",
    "all_families",
    "arch_names",
    "family_for_arch",
    "family_for_config",
    "family_of",
    "get_family",
    "iter_hook_points",
    "override_ops",
    "register_family",
]
