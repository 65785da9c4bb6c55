#!/usr/bin/env python
"""Methods x presets top-1 table (OuroMamba, PTQ4VM, QMamba, percentile, min-max) on one model.

    python tools/compare_methods.py --demo                       # embedded demo model (Vim)
    python tools/compare_methods.py --demo vmamba --threads 1    # the VMamba demo model
    python tools/compare_methods.py --demo mambavision --calib real:128 --threads 1   # the MambaVision demo model
    python tools/compare_methods.py vim_s.pth --calib-dir C --eval-dir E -o out/compare
    python tools/compare_methods.py --demo --methods ptq4vm,qmamba --presets w4a4

Same as `ouro-export compare`, with --methods / --presets filters. Writes <out>.json/.md/.png.
"""
from __future__ import annotations

import argparse
import sys

from pathlib import Path

from ouro.calib.compare import COMPARE_PRESETS, METHOD_ORDER, CompareConfig
from ouro.exporter.context import UserError
from ouro.exporter.run import run_compare
from ouro.exporter.run_config import ModelSource


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", help="model checkpoint (.pth) of a known family (Vim, VMamba, MambaVision)")
    p.add_argument("--demo", nargs="?", const="vim", default=None, metavar="FAMILY",
                   help="use an embedded demo model: the Vim demo, or --demo vmamba|mambavision")
    p.add_argument("--arch", help="override the inferred architecture")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", default=None, help="real:N (demo calibration split) or synthetic:N; default as ouro-export: synthetic:128 (OuroMamba-Gen); the README tables use real:128")
    p.add_argument("--calib-dir", help="calibration image folder")
    p.add_argument("--eval-dir", help="ImageNet-style evaluation folder (class subfolders)")
    p.add_argument("--methods", default=",".join(METHOD_ORDER), help=f"comma-separated (default {','.join(METHOD_ORDER)})")
    p.add_argument("--presets", default=",".join(COMPARE_PRESETS), help=f"comma-separated (default {','.join(COMPARE_PRESETS)})")
    p.add_argument("-o", "--output", default="compare", help="output prefix for .json, .md, .png (default ./compare)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is faster on a loaded machine)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    try:
        source = ModelSource(checkpoint=Path(a.checkpoint) if a.checkpoint else None, demo=a.demo, arch=a.arch)
        cfg = CompareConfig(demo=a.demo is not None, calib=a.calib, calib_dir=Path(a.calib_dir) if a.calib_dir else None,
                            eval_dir=Path(a.eval_dir) if a.eval_dir else None, seed=a.seed,
                            methods=CompareConfig.names(a.methods, METHOD_ORDER), presets=CompareConfig.names(a.presets, COMPARE_PRESETS),
                            output=Path(a.output), model_name=source.name, force=a.force)
        return run_compare(source, "auto", cfg)
    except (UserError, ValueError, NotImplementedError) as e:
        print(f"compare_methods: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
