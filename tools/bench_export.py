"""Export benchmark: ONNX export time, onnxruntime vs PyTorch error, node counts of the traced Q/DQ
graph and of the plugin graph, and onnxruntime CPU latency of the FP and quantized graphs.

    python tools/bench_export.py --arch vim_small            # random weights
    python tools/bench_export.py --demo --preset w4a4        # the embedded demo model

Quantization uses the static initialisation only (calib steps 0) on a few random images (or the
demo calibration split): enough for graph statistics and latency, not for accuracy.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch

from ouro.calib.models import build_model
from ouro.calib.quant import calibrate
from ouro.exporter import onnxruntime_session
from ouro.exporter.onnx_export import example_input, export_fp
from ouro.exporter.quantized import export_quantized, trace_quantized
from ouro.recipes import Target, get_preset


def latency(sess, x: np.ndarray, iters: int) -> float:
    sess.run(None, {"images": x})  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        sess.run(None, {"images": x})
    return (time.perf_counter() - t0) / iters * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vim_small")
    p.add_argument("--demo", action="store_true")
    p.add_argument("--preset", default="w4a4")
    p.add_argument("--images", type=int, default=4, help="calibration images (static init)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    if a.demo:
        from ouro.calib.data import load_demo_model, load_digits_split

        model, name = load_demo_model().eval(), "demo"
        calib = load_digits_split("calib")[0][: a.images]
    else:
        model, name = build_model(a.arch).eval(), a.arch
        cfg = model.cfg
        calib = torch.randn(a.images, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
    x = example_input(model, a.batch)
    rows = []

    fp = export_fp(model)
    sess_fp = onnxruntime_session(fp.model)
    with torch.no_grad():
        ref = model(x).numpy()
    out = sess_fp.run(None, {"images": x.numpy()})[0]
    rows.append(("FP32 export time (s)", f"{fp.seconds:.1f}"))
    rows.append(("ORT vs PyTorch max |err| (FP32)", f"{np.abs(out - ref).max():.3g} (rel {np.abs(out - ref).max() / np.abs(ref).max():.3g})"))
    rows.append((f"ORT CPU latency FP32, batch {a.batch} (ms)", f"{latency(sess_fp, x.numpy(), a.iters):.1f}"))

    recipe = get_preset(a.preset)
    recipe = recipe.with_(calib=type(recipe.calib)(steps=0, init_samples=a.images))
    t0 = time.perf_counter()
    q = calibrate(model, recipe, lambda m: m(calib), progress=False)
    rows.append((f"{a.preset} static calibration (s)", f"{time.perf_counter() - t0:.1f}"))
    qdq = trace_quantized(q)
    rows.append((f"{a.preset} Q/DQ trace time (s)", f"{qdq.seconds:.1f}"))
    t0 = time.perf_counter()
    plugin = export_quantized(q, Target.PLUGIN).model
    rows.append((f"{a.preset} plugin graph export, trace included (s)", f"{time.perf_counter() - t0:.1f}"))
    sess_q = onnxruntime_session(plugin)
    with torch.no_grad():
        fq = q(x).numpy()
    out = sess_q.run(None, {"images": x.numpy()})[0]
    rows.append((f"plugin ORT vs fake-quant max |err| ({a.preset})", f"{np.abs(out - fq).max():.3g} (rel {np.abs(out - fq).max() / np.abs(fq).max():.3g})"))
    rows.append((f"ORT CPU latency {a.preset} plugin graph, batch {a.batch} (ms)", f"{latency(sess_q, x.numpy(), a.iters):.1f}"))

    w = max(len(r[0]) for r in rows)
    print(f"\n{name} ({a.preset})")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    before = Counter(n.op_type for n in qdq.model.graph.node)
    after = Counter(n.op_type for n in plugin.graph.node)
    print(f"\n  node counts, traced Q/DQ graph -> plugin graph\n  {'op type':<20} {'before':>7} {'after':>7}")
    for op in sorted(set(before) | set(after), key=lambda o: (-before.get(o, 0), o)):
        print(f"  {op:<20} {before.get(op, 0):>7} {after.get(op, 0):>7}")
    print(f"  {'total':<20} {sum(before.values()):>7} {sum(after.values()):>7}")


if __name__ == "__main__":
    main()
