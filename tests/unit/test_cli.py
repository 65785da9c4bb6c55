"""The CLI builds typed, frozen requests once (ouro.exporter.cli); subcommands via argparse sub-parsers,
`export` by default; the packages import in one direction."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from ouro.calib.compare import COMPARE_PRESETS, CompareConfig
from ouro.calib.gen.cli import GenRequest, GenUsageError
from ouro.exporter.cli import build_compare_config, build_gen_request, build_run_config, main, parse_args
from ouro.exporter.engine_config import DEFAULT_WORKSPACE_MIB, BatchProfile, EngineConfigError
from ouro.exporter.outputs import OutputPlan, Stage
from ouro.exporter.passes import DEFAULT_PASSES
from ouro.exporter.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def test_export_is_the_default_subcommand(tmp_path):
    argv = ["m.pth", "--w4a4", "--calib", "real:8", "-o", str(tmp_path / "x.onnx"), "--device", "cpu"]
    a, b = parse_args(argv), parse_args(["export", *argv])
    assert a == b and a.command == "export" and a.checkpoint == "m.pth" and a.preset == "w4a4"
    assert parse_args(["gen", "--demo", "-o", "d"]).command == "gen"
    assert parse_args(["compare", "--demo"]).command == "compare"


def test_run_config_is_typed_frozen_and_defaults_live_in_the_typed_objects(tmp_path):
    out = tmp_path / "x.plan"
    cfg = build_run_config(parse_args(["m.pth", "--w4a4", "-o", str(out), "--report", str(tmp_path / "r.json")]))
    assert isinstance(cfg, RunConfig) and cfg.quantized and cfg.recipe.name == "w4a4"
    assert cfg.engine.batch == BatchProfile() and cfg.engine.workspace_mib == DEFAULT_WORKSPACE_MIB
    assert cfg.export.passes == DEFAULT_PASSES and cfg.export.opset is None
    assert cfg.calib.spec.kind == "synthetic" and not cfg.calib.explicit  # data-free by default
    assert isinstance(cfg.outputs, OutputPlan) and cfg.outputs.report == tmp_path / "r.json"
    (o,) = cfg.outputs.outputs
    assert (o.stage, o.onnx_stage, o.graph_stage) == (Stage.ENGINE, Stage.PLUGIN, Stage.PLUGIN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.force = True
    cfg2 = build_run_config(parse_args(["m.pth", "--w4a4", "-o", str(out), "--batch", "2,4,8", "--workspace", "64"]))
    assert (cfg2.engine.batch, cfg2.engine.workspace_mib) == (BatchProfile(2, 4, 8), 64)


def test_requests_fail_before_any_work(tmp_path):
    """A bad request is refused while it is built: no model is loaded, nothing is written."""
    with pytest.raises(EngineConfigError, match="--batch"):
        build_run_config(parse_args(["m.pth", "--w4a4", "-o", str(tmp_path / "x.plan"), "--batch", "big"]))
    with pytest.raises(GenUsageError, match="--num-images"):
        build_gen_request(parse_args(["gen", "--demo", "-n", "0", "-o", str(tmp_path / "g")]))
    assert main(["--w4a4", "-o", str(tmp_path / "x.onnx")]) == 2  # no model: a one-line error
    assert main(["m.pth", "--demo", "-o", str(tmp_path / "x.onnx")]) == 2
    assert not list(tmp_path.iterdir())


def test_gen_and_compare_requests():
    req = build_gen_request(parse_args(["gen", "--demo", "-o", "synth", "--seed", "3"]))
    assert req == GenRequest(num_images=128, output=Path("synth"), seed=3)
    cfg = build_compare_config(parse_args(["compare", "--demo", "--methods", " PTQ4VM, minmax"]), "demo")
    assert cfg.methods == ("ptq4vm", "minmax") and cfg.presets == COMPARE_PRESETS and cfg.output == Path("compare")
    with pytest.raises(ValueError, match="unknown method"):
        CompareConfig(demo=True, methods=("nope",))
    with pytest.raises(ValueError, match="--calib-dir DIR"):
        CompareConfig(demo=False)


def _imports(path: Path) -> set[str]:
    """Absolute names a module imports (relative imports resolved against its package)."""
    pkg = {"calib": "ouro.calib", "exporter": "ouro.exporter", "recipes": "ouro.recipes"}[path.relative_to(ROOT).parts[0]]
    sub = path.relative_to(ROOT).parts[1:-1]
    names = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            names |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = [*pkg.split("."), *sub][: len(pkg.split(".")) + len(sub) - (n.level - 1)]
                names.add(".".join([*base, n.module] if n.module else base))
            else:
                names.add(n.module)
    return names


@pytest.mark.parametrize("package,forbidden", [("calib", ("ouro.exporter",)), ("recipes", ("ouro.exporter", "ouro.calib"))])
def test_imports_run_one_way(package, forbidden):
    bad = {str(f.relative_to(ROOT)): sorted(i for i in _imports(f) if i.startswith(forbidden))
           for f in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_argparse_lives_in_cli_only():
    """Only exporter/cli.py parses command lines (the checkpoint readers name argparse.Namespace to
    unpickle the training args official checkpoints store, and parse nothing)."""
    users = {str(f.relative_to(ROOT)) for d in ("calib", "exporter", "recipes") for f in (ROOT / d).rglob("*.py")
             if "ArgumentParser" in f.read_text()}
    assert users == {"exporter/cli.py"}
