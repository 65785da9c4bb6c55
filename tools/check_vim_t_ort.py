"""`ouro-export <Vim-T checkpoint> --check` through the CLI with onnxruntime's native custom-op library (issue 19's
acceptance), on an official-format Vim-T checkpoint with random weights; too slow for a test (about 25 minutes on
2 loaded cores: the W4A4 initialisation of 24 blocks, then Polygraphy on 32 images at batch 8 for the graph and its
PyTorch twin).

    python tools/check_vim_t_ort.py --workdir vim_t_check             # writes vim_t.pth, calib/, vim_t.onnx, report

The calibration is cheap on purpose (the runtime is what is checked): 4 random images as a --calib-dir, and the W4A4
preset with calib steps 0 (static initialisation, init_samples 4) as a --recipe. Prints the CLI's check line, whether
the session took the native library, and the native-vs-Python-ops difference on --compare-images check images
(batch 1; the Python ops are the numerics reference, about a minute per image on Vim-T).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def write_inputs(d: Path) -> tuple[Path, Path, Path]:
    from PIL import Image

    from ouro.calib.models import build_model

    d.mkdir(parents=True, exist_ok=True)
    ckpt = d / "vim_t.pth"
    if not ckpt.is_file():
        torch.manual_seed(0)
        torch.save({"model": build_model("vim_tiny").state_dict()}, ckpt)  # the official {'model': sd} layout
    calib = d / "calib"
    rng = np.random.default_rng(0)
    for c in range(2):
        (calib / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(calib / f"class_{c}" / f"{i}.png")
    recipe = d / "w4a4_steps0.toml"
    text = subprocess.run([sys.executable, "-m", "ouro.exporter.cli", "--w4a4", "--print-recipe"], check=True,
                          capture_output=True, text=True).stdout
    text = text.replace('name = "w4a4"', 'name = "w4a4_steps0"').replace("\nsteps = 10\n", "\nsteps = 0\n")
    text = text.replace("\ninit_samples = 64\n", "\ninit_samples = 4\n")
    recipe.write_text(text)
    return ckpt, calib, recipe


def compare_ops(onnx_path: Path, n: int) -> None:
    import onnx

    from ouro.exporter.ort_ops import onnxruntime_session

    m = onnx.load(str(onnx_path))
    imgs = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # the check's images (seed 0)
    sess = {ops: onnxruntime_session(m, ops=ops) for ops in ("native", "python")}
    for i in range(n):
        x = {"images": imgs[i : i + 1].numpy()}
        nat, py = (sess[o].run(None, x)[0] for o in ("native", "python"))
        print(f"check image {i}: max |native - Python ops| = {np.abs(nat - py).max():.3g} (max |logit| {np.abs(py).max():.3g})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--compare-images", type=int, default=1, help="check images run under both op implementations")
    a = ap.parse_args()
    ckpt, calib, recipe = write_inputs(a.workdir)
    out = a.workdir / "vim_t.onnx"
    cmd = [sys.executable, "-m", "ouro.exporter.cli", str(ckpt), "--recipe", str(recipe), "--calib-dir", str(calib),
           "--device", "cpu", "-o", str(out), "--force", "--check", "--report", str(a.workdir / "vim_t.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OURO_ORT_OPS": "native"})
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith(("check ", "ouro: onnxruntime custom ops", "ouro-export: error"))]
    print("\n".join(lines) or p.stderr[-2000:])
    print(f"exit code {p.returncode}")
    if out.is_file() and a.compare_images > 0:
        compare_ops(out, a.compare_images)
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
