"""Cost of OuroMamba-Gen: seconds per image-step and peak memory, for one mini-batch.

    python tools/gen_cost.py [--arch vim_small | --demo] [--batch 16] [--steps 2] [--device cpu|cuda]
                             [--no-checkpoint] [--threads N]

Random weights are enough for cost (the loop does the same work whatever the weights). Peak memory
is the process's max RSS on the CPU and torch.cuda.max_memory_allocated on a GPU. Mini-batches are
independent, so the memory for 128 images is the memory of one mini-batch; the time scales with
the number of images: total = s/image-step * G * n.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from ouro.calib.gen import GenConfig, generate
from ouro.calib.data import DEMO_CONFIG as DEMO
from ouro.calib.models.vim import ARCHS, build_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vim_small", choices=sorted(ARCHS))
    ap.add_argument("--demo", action="store_true", help="the demo architecture (random weights) instead of --arch")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-checkpoint", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build_model(DEMO if a.demo else a.arch).to(a.device).eval()
    cfg = GenConfig(iterations=a.steps, batch_size=a.batch, checkpoint=not a.no_checkpoint, mean=(0.5,), std=(0.25,))
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    generate(model, a.batch, 0, cfg, progress=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if a.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
        where = "GPU max allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        where = "process max RSS"
    name = "demo" if a.demo else a.arch
    print(f"| model | batch | checkpoint | s/image-step (wall) | s/image-step (CPU time) | peak GiB ({where}) |")
    print("|---|---|---|---|---|---|")
    print(f"| {name} | {a.batch} | {not a.no_checkpoint} | {wall / a.steps / a.batch:.3f} | {cpu / a.steps / a.batch:.3f} | {peak:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
