"""TensorRT plugin enqueue on the GPU == the direct kernel call, bit for bit.

TensorRT itself is not available, so `ouro_plugin_run` (trt_plugins/tests/plugin_gpu_run.cpp) plays
its part: it creates the plugin from its fields through getCreators(), takes the output shape from
getOutputShapes(), the workspace from getWorkspaceSize(), and runs enqueue() on a CUDA stream.
The result must equal `ouro.exporter.cuda_kernels` called directly with the same tensors: this
checks the plugin -> kernel mapping on real hardware (kernel-vs-reference numerics are the kernel
tests' job). Needs the native build (build/trt or $OURO_TRT_BUILD_DIR) with the plugins on.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_cases import make_linear_case

from ouro.calib.quantizers import ThresholdPolicy
from ouro.calib.scan import TemporalGroupQuant
from ouro.exporter import cuda_kernels as ck

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(os.environ.get("OURO_TRT_BUILD_DIR", REPO / "build" / "trt")) / "ouro_plugin_run"
RUN_TIMEOUT_S = 300
_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.int8: "i8", torch.uint8: "u8"}

pytestmark = pytest.mark.skipif(not RUNNER.is_file(), reason=f"{RUNNER} not built (cmake --build build/trt with plugins on)")


def run_plugin(tmp_path: Path, plugin: str, fields: dict[str, int | float], inputs: list[torch.Tensor],
               tactic: int = 0, enqueues: int = 1, expect_rc: int = 0) -> np.ndarray | str:
    """Runs the plugin's enqueue(s); returns output 0, or the runner's stdout when expect_rc != 0."""
    lines = [f"plugin {plugin}", f"tactic {tactic}", f"enqueues {enqueues}"]
    lines += [f"field {k} {'f' if isinstance(v, float) else 'i'} {v!r}" for k, v in fields.items()]
    for k, t in enumerate(inputs):
        t = t.detach().contiguous().cpu()
        lines.append(f"input {_DTYPES[t.dtype]} " + " ".join(str(d) for d in t.shape))
        (tmp_path / f"in{k}.bin").write_bytes(t.view(torch.uint8).numpy().tobytes())
    (tmp_path / "manifest.txt").write_text("\n".join(lines) + "\n")
    r = subprocess.run([str(RUNNER), str(tmp_path)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if expect_rc:
        assert r.returncode == expect_rc, f"ouro_plugin_run: {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r.stdout + r.stderr
    assert r.returncode == 0, f"ouro_plugin_run failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    out_dtype = np.float32 if inputs[0].dtype == torch.float32 else np.float16
    return np.fromfile(tmp_path / "out0.bin", dtype=out_dtype)


@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("policy", [ThresholdPolicy.DYNAMIC, ThresholdPolicy.CALIBRATED])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_outlier_linear_plugin_equals_kernel(tmp_path, w_bits, policy, dtype):
    B, L, K, N = 2, 197, 384, 1536
    c = make_linear_case(B, L, K, N, w_bits=w_bits, act_bits=4, bits_outlier=8, n_refresh=10, dtype=dtype)
    theta = torch.full((L,), 4.0)  # between the inliers (|x| <= 1) and the spikes (|x| >= 8)
    c.policy, c.theta = policy, theta if policy is ThresholdPolicy.CALIBRATED else None
    g = c.to("cuda")
    direct = ck.outlier_linear(g.x, g.w, g.w_scale, g.act(), w_bits=w_bits, bias=g.bias).y  # max_outliers = K
    fields = dict(in_features=K, out_features=N, seq_len=L, w_bits=w_bits, a_bits=4, o_bits=8, n_refresh=10,
                  threshold_policy=0 if policy is ThresholdPolicy.DYNAMIC else 1, k_sigma=float(c.k_sigma),
                  max_outliers=0)
    y = run_plugin(tmp_path, "OutlierLinear", fields,
                   [c.x, c.w, c.w_scale, c.scale, theta, c.bias])
    assert np.array_equal(y.reshape(B, L, N), direct.cpu().numpy(), equal_nan=True)


def test_outlier_linear_plugin_tactics_and_overflow(tmp_path):
    """Each tactic the plugin advertises reaches the kernels (same y as the direct call with that tile); a
    max_outliers overflow makes the NEXT enqueue fail with the plugin's error (the flag is set asynchronously)."""
    B, L, K, N = 2, 197, 384, 200
    c = make_linear_case(B, L, K, N, w_bits=4, act_bits=4, bits_outlier=8, n_refresh=10, std_correction=1)
    g = c.to("cuda")
    fields = dict(in_features=K, out_features=N, seq_len=L, w_bits=4, a_bits=4, o_bits=8, n_refresh=10,
                  threshold_policy=0, k_sigma=float(c.k_sigma), max_outliers=0, std_correction=1)
    inputs = [c.x, c.w, c.w_scale, c.scale, torch.zeros(L), c.bias]
    for t, name in enumerate(ck.tactic_names(), start=1):
        direct = ck.outlier_linear(g.x, g.w, g.w_scale, g.act(), w_bits=4, bias=g.bias, tactic=name).y
        y = run_plugin(tmp_path, "OutlierLinear", fields, inputs, tactic=t)
        assert np.array_equal(y.reshape(B, L, N), direct.cpu().numpy(), equal_nan=True), name
    out = run_plugin(tmp_path, "OutlierLinear", {**fields, "max_outliers": 1}, inputs, enqueues=2, expect_rc=1)
    assert "enqueue 0 status 0" in out and "enqueue 1 status -1" in out
    assert "more than max_outliers = 1" in out


def _scan_inputs(B, L, D, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(u=r(B, L, D).to(dtype), delta=(r(B, L, D) * 0.5 - 1).to(dtype), A=-torch.rand(D, S, generator=g) - 0.5,
                Bm=r(B, L, S).to(dtype), Cm=r(B, L, S).to(dtype), Dskip=r(D), z=r(B, L, D).to(dtype))


@pytest.mark.parametrize("quant", [False, True, "partly"])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_selective_scan_plugin_equals_kernel(tmp_path, quant, reverse, dtype):
    """'partly': only delta quantized, B/C and h tables empty [0] (what the exporter writes)."""
    B, L, D, S, G_LEN = 2, 197, 384, 16, 10
    t = _scan_inputs(B, L, D, S, dtype)
    cuda = {k: v.cuda() for k, v in t.items()}
    fields: dict[str, int | float] = dict(reverse=reverse, delta_softplus=1)
    inputs = [t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], t["Dskip"], t["z"]]
    kw = {}
    if quant == "partly":
        sd = (3 * t["delta"].float().std(dim=(0, 2)) / 127).contiguous()
        kw = dict(delta_q=ck.ActQuant(8, 8, 10, sd.cuda(), k_sigma=3.0, std_correction=1))
        fields.update(delta_bits=8, delta_bits_outlier=8, b_bits=0, b_bits_outlier=0, c_bits=0, c_bits_outlier=0,
                      n_refresh=10, threshold_policy=0, delta_k_sigma=3.0, bc_k_sigma=3.0, h_bits=0, h_group=1,
                      std_correction=1)
        empty = torch.zeros(0)
        inputs += [sd, torch.zeros(L), empty, empty, empty, empty, empty, empty]
    elif quant:
        scale = lambda x, bits: (3 * x.float().std(dim=(0, 2)) / (2 ** (bits - 1) - 1)).contiguous()  # noqa: E731
        sd, sb, sc = scale(t["delta"], 8), scale(t["Bm"], 4), scale(t["Cm"], 4)
        G = TemporalGroupQuant.num_groups(L, G_LEN)
        hs, hz = torch.full((G,), 0.05), torch.full((G,), 128.0)
        kw = dict(delta_q=ck.ActQuant(8, 8, 10, sd.cuda(), k_sigma=3.0), b_q=ck.ActQuant(4, 16, 10, sb.cuda(), k_sigma=2.5),
                  c_q=ck.ActQuant(4, 8, 10, sc.cuda(), k_sigma=2.5), h_quant=TemporalGroupQuant(8, G_LEN, hs.cuda(), hz.cuda()))
        fields.update(delta_bits=8, delta_bits_outlier=8, b_bits=4, b_bits_outlier=16, c_bits=4, c_bits_outlier=8,
                      n_refresh=10, threshold_policy=0, delta_k_sigma=3.0, bc_k_sigma=2.5, h_bits=8, h_group=G_LEN)
        unused_theta = torch.zeros(L)
        inputs += [sd, unused_theta, sb, unused_theta, sc, unused_theta, hs, hz]
    direct = ck.selective_scan(cuda["u"], cuda["delta"], cuda["A"], cuda["Bm"], cuda["Cm"], cuda["Dskip"], cuda["z"],
                               delta_softplus=True, reverse=bool(reverse), **kw)
    y = run_plugin(tmp_path, "SelectiveScan", fields, inputs)
    assert np.array_equal(y.reshape(B, L, D), direct.cpu().numpy(), equal_nan=True)
