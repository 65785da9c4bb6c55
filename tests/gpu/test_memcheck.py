"""compute-sanitizer over every kernel (small shapes, every code path): memcheck, racecheck, synccheck, initcheck.

PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every torch tensor its own cudaMalloc, so an out-of-bounds access past a
tensor is not hidden inside the caching allocator's larger block, and initcheck sees the real allocation sizes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import torch
from kernel_cases import make_linear_case
from ouro.calib.quantizers import ThresholdPolicy
from ouro.calib.scan import TemporalGroupQuant
from ouro.exporter import cuda_kernels as ck
cc = torch.cuda.get_device_capability()
s4 = cc in ((8, 0), (8, 6), (8, 7), (8, 9))
# the fused path: every operand kind the device has, both outlier kinds, every tile once, tails
for K, N, w_bits, a_bits, bo in [(64, 40, 4, 4, 8), (64, 30, 8, 8, 16), (96, 24, 4, 8, 16), (48, 20, 8, 4, 8)]:
    c = make_linear_case(2, 13, K, N, w_bits=w_bits, act_bits=a_bits, bits_outlier=bo, n_refresh=5).to("cuda")
    ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=w_bits, bias=c.bias, debug=True)
    ck.outlier_fake_quant(c.x, c.act())
c = make_linear_case(2, 29, 96, 100, n_refresh=7).to("cuda")
for t in ck.tactic_names():
    ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=4, tactic=t)
c = make_linear_case(1, 40, 256, 72, n_refresh=20, outlier_frac=0.45, scale_mult=0.2).to("cuda")
c.policy, c.theta = ThresholdPolicy.CALIBRATED, torch.full((40,), 4.0, device="cuda")  # union > 64: global gather
ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=4, bias=c.bias)
c = make_linear_case(2, 13, 64, 32, dtype=torch.float32, std_correction=1, n_refresh=5).to("cuda")
ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=4)
try:  # capacity overflow (NaN rows + status) on both epilogues
    ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=4, max_outliers=1)
except ck.KernelError:
    pass
# the separate (five-kernel) variant on every path
for K, N, w_bits, path in [(64, 32, 4, "auto"), (64, 32, 4, "simt_fallback"), (200, 30, 8, "auto"), (48, 64, 8, "s8_tensorcore")]:
    c = make_linear_case(2, 13, K, N, w_bits=w_bits, n_refresh=5).to("cuda")
    ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=w_bits, bias=c.bias, debug=True, path=path,
                      epilogue="auto" if path == "simt_fallback" else "separate")
if s4:
    c = make_linear_case(2, 13, 64, 32, n_refresh=5).to("cuda")
    ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=4, path="sm80_s4_tensorcore", epilogue="separate")
# the scan: fp32 / fp16, cp.async and plain staging, quantized operands, TGQ, both directions
for dt in (torch.float32, torch.float16):
    for D, S in ((40, 16), (33, 5)):
        u = torch.randn(2, 45, D, device="cuda").to(dt); A = -torch.rand(D, S, device="cuda")
        Bm = torch.randn(2, 45, S, device="cuda").to(dt)
        sd, sb = torch.full((45,), 0.1, device="cuda"), torch.full((45,), 0.3, device="cuda")
        G = TemporalGroupQuant.num_groups(45, 10)
        hq = TemporalGroupQuant(8, 10, torch.full((G,), 0.05, device="cuda"), torch.full((G,), 128.0, device="cuda"))
        for rev in (False, True):
            ck.selective_scan(u, u, A, Bm, Bm, torch.ones(D, device="cuda"), u, reverse=rev,
                              delta_q=ck.ActQuant(4, 8, 5, sd), b_q=ck.ActQuant(4, 8, 5, sb, std_correction=1),
                              c_q=ck.ActQuant(4, 16, 5, sb), h_quant=hq)
            ck.selective_scan(u, u, A, Bm, Bm, reverse=rev)
torch.cuda.synchronize()
print("SANITIZER-SCRIPT-DONE")
"""

TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
RUN_TIMEOUT_S = 900


@pytest.mark.slow
@pytest.mark.parametrize("tool", TOOLS)
def test_compute_sanitizer(tmp_path, tool):
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        pytest.skip("compute-sanitizer not on PATH")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    # Only the project's kernels (mangled names contain 'ouro'): torch's own kernels are not ours to check.
    cmd = [exe, "--tool", tool, "--error-exitcode", "3", "--kernel-name", "kns=ouro"]
    if tool == "racecheck":
        cmd += ["--racecheck-report", "all"]
    if tool == "initcheck":
        cmd += ["--track-unused-memory", "no"]
    proc = subprocess.run([*cmd, sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=RUN_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert "SANITIZER-SCRIPT-DONE" in out, out[-4000:]
    assert proc.returncode == 0 and "ERROR SUMMARY: 0 errors" in out, out[-4000:]
