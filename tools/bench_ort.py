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
    plugin fp32 I/O   the same with passes FP32_IO_PASSES: no fp16 Casts around the custom nodes (native only)
--baseline-lib OLD.so adds the plugin rows once more with another build of the library (before / after a change,
measured side by side). --profile N runs every native graph N more times under onnxruntime's profiler and prints
the kernel time per op type (the "Node" events summed by op type, ms per run), which splits the plugin/FP gap
into its parts (OutlierLinear vs the MatMuls it replaces, SelectiveScan, the fp16 Casts, the rest).
Every runner is timed once per round, rounds interleave the runners (so load on a shared machine hits all of
them alike); the table gives the best wall time, the mean process CPU time per run (all threads), and the ratio
of best wall times to the PyTorch FP forward (the faster of --threads and 1 thread) and to the native FP graph. Sessions use --threads intra-op threads
and the basic optimisation level of `ouro.exporter.onnxruntime_session`; PyTorch uses --threads threads.
The machine load matters on a shared machine: compare the CPU column too, and repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch

from ouro.calib.models import build_model
from ouro.calib.quant import calibrate
from ouro.exporter import ort_native
from ouro.exporter.ort_ops import onnxruntime_session
from ouro.exporter.onnx_export import example_input, export_fp
from ouro.exporter.passes import FP32_IO_PASSES
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


def ort_session(graph: onnx.ModelProto, ops: str | None, threads: int, spin: bool, lib: Path | None = None, profile: str | None = None):
    """ops None: plain onnxruntime (no ouro node); lib: this build of the native library instead of the in-tree one;
    profile: a file prefix for onnxruntime's profiler."""
    import onnxruntime as ort

    so = session_options(threads, spin)
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    if lib is not None:
        return ort_native.session(graph.SerializeToString(), lib, None, so)
    if ops is None:
        return ort.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return onnxruntime_session(graph, sess_options=so, ops=ops)


def ort_runner(graph: onnx.ModelProto, ops: str | None, threads: int, spin: bool, lib: Path | None = None):
    sess = ort_session(graph, ops, threads, spin, lib)
    return lambda x: sess.run(None, {"images": x.numpy()})[0]


def profile_by_op_type(graph: onnx.ModelProto, ops: str | None, x: torch.Tensor, runs: int, threads: int, spin: bool,
                       lib: Path | None = None) -> dict[str, float]:
    """op type -> kernel ms per run under onnxruntime's profiler ("Node" events, first (warm-up) run left out),
    plus "(all nodes)" and "(session run)" (the profiler's model_run events: whole runs)."""
    with tempfile.TemporaryDirectory() as d:
        sess = ort_session(graph, ops, threads, spin, lib, profile=os.path.join(d, "prof"))
        feed = {"images": x.numpy()}
        sess.run(None, feed)
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs_ev = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    t_start = runs_ev[1]["ts"] if len(runs_ev) > 1 else 0  # skip the warm-up run
    out: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t_start:
            op = e.get("args", {}).get("op_name", "?")
            out[op] += e["dur"] / 1e3 / runs
            out["(all nodes)"] += e["dur"] / 1e3 / runs
    out["(session run)"] = sum(e["dur"] for e in runs_ev[1:]) / 1e3 / runs
    return dict(out)


def print_profile(title: str, profiles: dict[str, dict[str, float]]) -> None:
    cols = list(profiles)
    ops = sorted({k for p in profiles.values() for k in p if not k.startswith("(")},
                 key=lambda k: -max(p.get(k, 0.0) for p in profiles.values()))
    print(f"\n{title}: kernel ms per run by op type (onnxruntime profiler)")
    print(f"  {'op type':<22}" + "".join(f" {c:>24}" for c in cols))
    for k in ops + ["(all nodes)", "(session run)"]:
        print(f"  {k:<22}" + "".join(f" {profiles[c].get(k, 0.0):>24.1f}" for c in cols))


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


GRAPHS = ("fp", "qdq", "qdq_scan", "plugin", "plugin_fp32io")


def build(arch: str, preset: str, cache: Path | None = None, grid_points: int | None = None):
    """(model, FP, QDQ, QDQ with Scan loops, plugin, plugin fp32 I/O). `cache`: a folder that keeps the graphs of
    (arch, preset) between runs (the W4A4 initialisation of a Vim-T takes minutes on a loaded machine)."""
    torch.manual_seed(0)
    model = build_model(arch).eval()
    files = [cache / f"{arch}_{preset}_{g}.onnx" for g in GRAPHS] if cache else []
    if files and all(f.is_file() for f in files):
        return (model, *(onnx.load(str(f)) for f in files))
    graphs = _build_graphs(model, preset, grid_points)
    for f, g in zip(files, graphs):
        f.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(g, str(f))
    return (model, *graphs)


def _build_graphs(model, preset: str, grid_points: int | None):
    cfg = model.cfg
    calib = torch.randn(4, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
    recipe = get_preset(preset)
    cal = type(recipe.calib)(steps=0, init_samples=4)
    if grid_points is not None:  # the scale search's cost; latency does not depend on the scales found
        cal = type(recipe.calib)(steps=0, init_samples=4, grid_points=grid_points)
    q = calibrate(model, recipe.with_(calib=cal), lambda m: m(calib), progress=False)
    fp = export_fp(model).model
    graphs = [export_quantized(q, t).model for t in ("qdq-tensorrt", "qdq-onnxruntime", "plugin")]
    plugin32 = export_quantized(q, "plugin", passes=FP32_IO_PASSES).model
    return (fp, *graphs, plugin32)


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
    p.add_argument("--skip-torch", action="store_true", help="leave out the PyTorch rows (their goal column reads nan)")
    p.add_argument("--baseline-lib", type=Path, help="another build of libouro_ort_ops.so: its plugin rows are measured "
                   "in the same rounds (before / after a change)")
    p.add_argument("--graphs-cache", type=Path, help="folder keeping the built graphs between runs (random weights, "
                   "seeded: the same graphs every time)")
    p.add_argument("--grid-points", type=int, help="scale-search grid of the initialisation (default: the preset's; "
                   "fewer builds the graphs faster)")
    p.add_argument("--profile", type=int, default=3, metavar="N", help="runs of each native graph under onnxruntime's "
                   "profiler, summed by op type (0: no profile)")
    p.add_argument("--spin", action="store_true", help="let onnxruntime's idle pool threads spin (its default; on a shared, "
                   "loaded machine spinning threads take the CPU the others need, so off by default here)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}, rounds {a.rounds} (Python ops {0 if a.skip_python else a.python_rounds}), "
          f"onnxruntime basic optimisation, pool spinning {'on' if a.spin else 'off'}, preset {a.preset}")
    verdicts = []
    for arch in a.archs.split(","):
        t0 = time.perf_counter()
        model, fp, qdq, qdq_scan, plugin, plugin32 = build(arch, a.preset, a.graphs_cache, a.grid_points)
        print(f"\n{arch}: graphs built in {time.perf_counter() - t0:.0f} s")
        runners = {}
        if not a.skip_torch:
            runners["PyTorch FP forward"] = torch_runner(model, a.threads)
            if a.threads > 1:  # on a loaded machine torch's spinning OpenMP threads can cost more than they give
                runners["PyTorch FP forward, 1 thread"] = torch_runner(model, 1)
        for label, graph in (("FP", fp), ("QDQ", qdq), ("plugin", plugin)):
            for ops in (("python", "native") if not a.skip_python else ("native",)):
                runners[f"{label} ONNX, {ops} ops"] = ort_runner(graph, ops, a.threads, a.spin)
        runners["plugin fp32 I/O ONNX, native ops"] = ort_runner(plugin32, "native", a.threads, a.spin)
        if a.baseline_lib:
            runners["plugin ONNX, native ops (baseline)"] = ort_runner(plugin, "native", a.threads, a.spin, a.baseline_lib)
            runners["plugin fp32 I/O ONNX, native ops (baseline)"] = ort_runner(plugin32, "native", a.threads, a.spin, a.baseline_lib)
        runners["QDQ (Scan loops), no custom ops"] = ort_runner(qdq_scan, None, a.threads, a.spin)
        for batch in (int(b) for b in a.batches.split(",")):
            x = example_input(model, batch)
            res = measure(runners, x, a.rounds, a.python_rounds)
            torch_s = min((v[0] for k, v in res.items() if k.startswith("PyTorch")), default=float("nan"))  # the faster
            fp_s = res["FP ONNX, native ops"][0]
            print(f"\n{arch}, batch {batch}")
            print(f"  {'graph':<44} {'wall ms':>9} {'CPU s':>7} {'x PyTorch':>9} {'x FP(native)':>12}  max|diff| vs PyTorch twin")
            ref = {"FP": res["PyTorch FP forward"][2]} if "PyTorch FP forward" in res else {}
            for name, (wall, cpu, out) in res.items():
                kind = name.split()[0]
                twin = ref.get(kind)
                diff = f"{np.abs(out - twin).max():.2g}" if twin is not None else ""
                if kind in ("QDQ", "plugin"):  # against the same graph under the other implementation
                    other = res.get(name.replace("native", "python")) if "native" in name else None
                    diff = f"{np.abs(out - other[2]).max():.2g} vs Python ops" if other is not None else ""
                    if "baseline" in name:  # the same graph on the in-tree library
                        mine = res[name.replace(" (baseline)", "")][2]
                        diff = f"{np.abs(out - mine).max():.2g} vs in-tree library"
                print(f"  {name:<44} {wall * 1e3:>9.1f} {cpu:>7.2f} {wall / torch_s:>9.2f} {wall / fp_s:>12.2f}  {diff}")
            plug_s = res["plugin ONNX, native ops"][0]
            cpu_ratio = res["plugin ONNX, native ops"][1] / res["FP ONNX, native ops"][1]
            plug32_s = res["plugin fp32 I/O ONNX, native ops"][0]
            vs_torch = ("not measured (--skip-torch)" if a.skip_torch else f"{fp_s / torch_s:.2f} (goal <= {GOAL_FP_VS_TORCH}: "
                        f"{'met' if fp_s / torch_s <= GOAL_FP_VS_TORCH else 'NOT met'})")
            verdicts.append(f"{arch} batch {batch}: FP graph / PyTorch {vs_torch}; plugin / FP graph "
                            f"{plug_s / fp_s:.2f} (goal <= {GOAL_PLUGIN_VS_FP}: {'met' if plug_s / fp_s <= GOAL_PLUGIN_VS_FP else 'NOT met'}); "
                            f"in CPU time {cpu_ratio:.2f}; plugin fp32 I/O / FP graph {plug32_s / fp_s:.2f}")
            if a.profile > 0:
                profs = {"FP": profile_by_op_type(fp, "native", x, a.profile, a.threads, a.spin),
                         "plugin": profile_by_op_type(plugin, "native", x, a.profile, a.threads, a.spin),
                         "plugin fp32 I/O": profile_by_op_type(plugin32, "native", x, a.profile, a.threads, a.spin)}
                if a.baseline_lib:
                    profs["plugin (baseline)"] = profile_by_op_type(plugin, "native", x, a.profile, a.threads, a.spin,
                                                                    a.baseline_lib)
                print_profile(f"{arch}, batch {batch}", profs)
    print("\ngoals (native library, best wall times):")
    for v in verdicts:
        print("  " + v)


if __name__ == "__main__":
    main()
