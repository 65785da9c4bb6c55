"""Import every method module so that it registers itself (METHODS, recipe method_params).

A method module that does not exist yet is skipped; `get_method` then names the missing method."""
from importlib import import_module

METHOD_MODULES = ("ouromamba", "ptq4vm", "qmamba", "simple")
"""Modules of ouro.calib.quant that register a method (simple = minmax and percentile)."""

for _name in METHOD_MODULES:
    try:
        import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.{_name}":
            raise
