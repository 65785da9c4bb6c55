"""torchrun: 2 gloo processes on the CPU give the images, predictions and tables of 1 process.

Each command runs once as a plain process and once under `torchrun --standalone --nproc-per-node 2`,
both with one intra-op thread per process (OMP_NUM_THREADS=1, as torchrun sets it), and the outputs
are compared exactly: Gen's images (array and PNG bytes), top-1 of the FP and the quantized model on
an image folder (3 evaluation batches, so both ranks hold some), and a compare table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tools.vim_checkpoints import TINY, write_checkpoint, write_image_folder

NPROC = 2
TIMEOUT_S = 900


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _run(args: list, nproc: int, cwd) -> subprocess.CompletedProcess:
    cli = ["-m", "ouro.exporter.cli", *map(str, args)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cli]
    else:
        cmd = [sys.executable, *cli]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(), cwd=cwd)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    ckpt = write_checkpoint(d / "tiny.pth", TINY)
    write_image_folder(d / "eval", classes=2, per_class=70, size=36)  # 140 images: 3 evaluation batches of 64
    (d / "gen.toml").write_text("iterations = 2\nbatch_size = 1\n")  # 4 mini-batches: 2 per rank
    return d, ckpt


@pytest.mark.slow
def test_two_processes_equal_one(files):
    d, ckpt = files
    outs = {}
    for nproc in (1, NPROC):
        o = d / f"p{nproc}"
        o.mkdir()
        _run(["gen", ckpt, "-n", 4, "-o", o / "synth", "--config", d / "gen.toml", "--device", "cpu"], nproc, o)
        fp = _run([ckpt, "--eval", "--eval-dir", d / "eval", "--device", "cpu"], nproc, o)
        _run([ckpt, "--w8a8", "--calib-dir", o / "synth", "--eval-dir", d / "eval", "--device", "cpu",
              "--report", o / "r.json", "-o", o / "q.safetensors"], nproc, o)
        cmp = _run(["compare", ckpt, "--calib-dir", o / "synth", "--eval-dir", d / "eval", "--device", "cpu",
                    "--methods", "minmax,percentile", "--presets", "w8a8,w4a8", "-o", o / "cmp"], nproc, o)
        assert fp.stdout.count("FP top-1:") == 1 and cmp.stdout.count("| minmax |") == 2  # rank 0 alone prints
        outs[nproc] = o
    one, two = outs[1], outs[NPROC]
    with np.load(one / "synth" / "images.npz") as a, np.load(two / "synth" / "images.npz") as b:
        assert a["images"].shape == (4, 3, 32, 32)
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["targets"], b["targets"])
    for i in range(4):
        assert (one / "synth" / f"img_{i:05d}.png").read_bytes() == (two / "synth" / f"img_{i:05d}.png").read_bytes()
    r1, r2 = (json.loads((o / "r.json").read_text()) for o in (one, two))
    assert r1["eval_images"] == r2["eval_images"] == 140
    for k in ("fp_top1", "quant_top1", "top1_agreement", "sqnr_db"):
        assert r1[k] == r2[k], k
    c1, c2 = (json.loads((o / "cmp.json").read_text())["rows"] for o in (one, two))
    assert [(r["method"], r["preset"], r["top1"], r["logit_sqnr_db"]) for r in c1] == \
           [(r["method"], r["preset"], r["top1"], r["logit_sqnr_db"]) for r in c2]
    assert not list((two).glob("**/*.tmp"))
