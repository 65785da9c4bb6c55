"""The package layout promised by DESIGN.md §2: one import root, every subpackage installed."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAPPING = {"calib": "ouro.calib", "exporter": "ouro.exporter", "recipes": "ouro.recipes"}


def _declared_packages() -> set[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(cfg["tool"]["setuptools"]["packages"])


def test_every_python_folder_is_a_declared_subpackage_of_ouro():
    declared = _declared_packages()
    found = set()
    for folder, pkg in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    missing = found - declared
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    assert all(p.startswith("ouro.") for p in declared)


def test_import_root_and_console_script():
    import ouro.calib
    import ouro.exporter
    import ouro.recipes  # noqa: F401

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["project"]["scripts"]["ouro-export"] == "ouro.exporter.cli:console_main"
    from ouro.exporter.cli import console_main, main

    assert callable(main) and callable(console_main)
