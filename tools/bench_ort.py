"""onnxruntime CPU latency of ouro's graphs: FP / QDQ / plugin ONNX, custom ops as the Python reference ops
vs the native library libouro_ort_ops.so, against the PyTorch FP forward, measured side by side.

    python tools/bench_ort.py                                   # Vim-T and Vim-S, batch 1 and 8, 2 threads
    python tools/bench_ort.py --archs vim_tiny --batches 1 --skip-python

Models have random weights (latency does not depend on them); quantization is the W4A4 preset's static
initialisation on 4 random images (calib steps 0). Graphs:
    FP      export_fp: standard ops + ouro::SelectiveScan (7 inputs)
    QDQ     export_quantized(q, "qdq-tensorrt"): static Q/DQ + FP ouro::SelectiveScan (the .qdq.onnx file
            ouro-export writes, target qdq-onnxruntime, has its scans lowered to ONNX Scan loops: row
            "QDQ (Scan loops)", plain onnxruntime)
    plugin  export_quantized(q, "plugin"): ouro::OutlierLinear + quantized ouro::SelectiveScan with the default
            passes (fp16 activations into and out of the custom nodes; what TensorRT builds)
Every runner is timed once per round, rounds interleave the runners (so load on a shared machine hits all of
them alike); the table gives the best wall time, the mean process CPU time per run (all threads), and the ratio
of best wall times to the PyTorch FP forward (the faster of --threads and 1 thread) and to the native FP graph. Sessions use --threads intra-op threads
and the basic optimisation level of `ouro.exporter.onnxruntime_session`; PyTorch uses --threads threads.
The machine load matters on a shared machine: compare the CPU column too, and repeat.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import torch

from ouro.calib.models import build_model
from ouro.calib.quant import calibrate
from ouro.exporter.ort_ops import onnxruntime_session
from ouro.exporter.onnx_export import example_input, export_fp
from ouro.exporter.quantized import export_quantized
from ouro.recipes import get_preset

GOAL_FP_VS_TORCH = 1.0
"""Goal (issue 19): the native FP graph at least as fast as the PyTorch FP forward."""
GOAL_PLUGIN_VS_FP = 1.5
"""Goal (issue 19): the native W4A4 plugin graph within 1.5x of the native FP graph."""


def session_options(threads: int, spin: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return so


def ort_runner(graph: onnx.ModelProto, ops: str | None, threads: int, spin: bool):
    so = session_options(threads, spin)
    if ops is None:  # no ouro node: plain onnxruntime
        import onnxruntime as ort

        sess = ort.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"])
    else:
        sess = onnxruntime_session(graph, sess_options=so, ops=ops)
    return lambda x: sess.run(None, {"images": x.numpy()})[0]


def torch_runner(model, threads: int):
    def run(x):
        n = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                return model(x).numpy()
        finally:
            torch.set_num_threads(n)

    return run


def build(arch: str, preset: str):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    cfg = model.cfg
    calib = torch.randn(4, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
    recipe = get_preset(preset)
    q = calibrate(model, recipe.with_(calib=type(recipe.calib)(steps=0, init_samples=4)), lambda m: m(calib), progress=False)
    fp = export_fp(model).model
    graphs = (export_quantized(q, t).model for t in ("qdq-tensorrt", "qdq-onnxruntime", "plugin"))
    return (model, fp, *graphs)


def measure(runners: dict, x: torch.Tensor, rounds: int, python_rounds: int) -> dict:
    """name -> (best wall s, mean CPU s, output). Python-op runners take part in the first python_rounds rounds."""
    walls = {k: [] for k in runners}
    cpus = {k: [] for k in runners}
    outs = {}
    for name, fn in runners.items():  # warm-up (session arenas, first-call costs)
        outs[name] = fn(x)
    for r in range(rounds):
        for name, fn in runners.items():
            if "python" in name and r >= python_rounds:
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            fn(x)
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    return {k: (min(walls[k]), float(np.mean(cpus[k])), outs[k]) for k in runners}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="vim_tiny,vim_small")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--preset", default="w4a4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="timed runs of every runner (best wall time reported)")
    p.add_argument("--python-rounds", type=int, default=1, help="timed runs of the (slow) Python-op runners")
    p.add_argument("--skip-python", action="store_true", help="leave out the Python reference ops")
    p.add_argument("--spin", action="store_true", help="let onnxruntime's idle pool threads spin (its default; on a shared, "
                   "loaded machine spinning threads take the CPU the others need, so off by default here)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}, rounds {a.rounds} (Python ops {0 if a.skip_python else a.python_rounds}), "
          f"onnxruntime basic optimisation, pool spinning {'on' if a.spin else 'off'}, preset {a.preset}")
    verdicts = []
    for arch in a.archs.split(","):
        t0 = time.perf_counter()
        model, fp, qdq, qdq_scan, plugin = build(arch, a.preset)
        print(f"\n{arch}: graphs built in {time.perf_counter() - t0:.0f} s")
        runners = {"PyTorch FP forward": torch_runner(model, a.threads)}
        if a.threads > 1:  # on a loaded machine torch's spinning OpenMP threads can cost more than they give
            runners["PyTorch FP forward, 1 thread"] = torch_runner(model, 1)
        for label, graph in (("FP", fp), ("QDQ", qdq), ("plugin", plugin)):
            for ops in (("python", "native") if not a.skip_python else ("native",)):
                runners[f"{label} ONNX, {ops} ops"] = ort_runner(graph, ops, a.threads, a.spin)
        runners["QDQ (Scan loops), no custom ops"] = ort_runner(qdq_scan, None, a.threads, a.spin)
        for batch in (int(b) for b in a.batches.split(",")):
            x = example_input(model, batch)
            res = measure(runners, x, a.rounds, a.python_rounds)
            torch_s = min(v[0] for k, v in res.items() if k.startswith("PyTorch"))  # the faster thread count
            fp_s = res["FP ONNX, native ops"][0]
            print(f"\n{arch}, batch {batch}")
            print(f"  {'graph':<34} {'wall ms':>9} {'CPU s':>7} {'x PyTorch':>9} {'x FP(native)':>12}  max|diff| vs PyTorch twin")
            ref = {"FP": res["PyTorch FP forward"][2]}
            for name, (wall, cpu, out) in res.items():
                kind = name.split()[0]
                twin = ref.get(kind)
                diff = f"{np.abs(out - twin).max():.2g}" if twin is not None else ""
                if kind in ("QDQ", "plugin"):  # against the same graph under the other implementation
                    other = res.get(name.replace("native", "python")) if "native" in name else None
                    diff = f"{np.abs(out - other[2]).max():.2g} vs Python ops" if other is not None else ""
                print(f"  {name:<34} {wall * 1e3:>9.1f} {cpu:>7.2f} {wall / torch_s:>9.2f} {wall / fp_s:>12.2f}  {diff}")
            plug_s = res["plugin ONNX, native ops"][0]
            verdicts.append(f"{arch} batch {batch}: FP graph / PyTorch {fp_s / torch_s:.2f} (goal <= {GOAL_FP_VS_TORCH}: "
                            f"{'met' if fp_s / torch_s <= GOAL_FP_VS_TORCH else 'NOT met'}); plugin / FP graph "
                            f"{plug_s / fp_s:.2f} (goal <= {GOAL_PLUGIN_VS_FP}: {'met' if plug_s / fp_s <= GOAL_PLUGIN_VS_FP else 'NOT met'})")
    print("\ngoals (native library, best wall times):")
    for v in verdicts:
        print("  " + v)


if __name__ == "__main__":
    main()
