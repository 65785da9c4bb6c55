"""Import every method module so that it registers itself (METHODS, recipe method_params).

A method module that is missing or fails to import does not break the others: its error is kept in
`IMPORT_ERRORS` and `get_method` reports it when that method is asked for."""
from importlib import import_module

METHOD_MODULES = (
    "ouro.calib.quant.ouromamba",
    "ouro.calib.baselines.ptq4vm",
    "ouro.calib.baselines.qmamba",
    "ouro.calib.baselines.simple",  # minmax and percentile
)
"""Modules that register a method on import."""

IMPORT_ERRORS: dict[str, str] = {}

for _name in METHOD_MODULES:
    try:
        import_module(_name)
    except ImportError as e:
        if _name.endswith(".ouromamba"):
            raise
        IMPORT_ERRORS[_name] = f"{type(e).__name__}: {e}"
