"""One compute-sanitizer memcheck run over every kernel (small shapes, all code paths)."""
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
from ouro.exporter import cuda_kernels as ck
for K, N, w_bits, path in [(64, 32, 4, "auto"), (64, 32, 4, "simt_fallback"), (200, 30, 8, "auto"), (48, 64, 8, "s8_tensorcore")]:
    c = make_linear_case(2, 13, K, N, w_bits=w_bits, n_refresh=5).to("cuda")
    ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=w_bits, bias=c.bias, debug=True, path=path)
    ck.outlier_fake_quant(c.x, c.act())
c = make_linear_case(2, 13, 48, 8, bits_outlier=16, n_refresh=5).to("cuda")
ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=4, max_outliers=48, debug=True)
for K, N, w_bits, bo in [(64, 40, 4, 8), (48, 8, 8, 16), (64, 24, 4, 8)]:  # the fused epilogue (N % 8 == 0)
    c = make_linear_case(2, 13, K, N, w_bits=w_bits, bits_outlier=bo, n_refresh=5).to("cuda")
    ck.outlier_linear(c.x, c.w, c.w_scale, c.act(), w_bits=w_bits, bias=c.bias, epilogue="fused")
u = torch.randn(2, 13, 40, device="cuda"); A = -torch.rand(40, 16, device="cuda"); Bm = torch.randn(2, 13, 16, device="cuda")
s = torch.full((13,), 0.1, device="cuda")
q = ck.ActQuant(4, 8, 5, s)
ck.selective_scan(u, u, A, Bm, Bm, torch.ones(40, device="cuda"), u, reverse=True, delta_q=q, b_q=q, c_q=q)
torch.cuda.synchronize()
print("MEMCHECK-SCRIPT-DONE")
"""


@pytest.mark.slow
def test_compute_sanitizer_memcheck(tmp_path):
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        pytest.skip("compute-sanitizer not on PATH")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", SCRIPT],
                          capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert "MEMCHECK-SCRIPT-DONE" in out, out[-4000:]
    assert proc.returncode == 0 and "ERROR SUMMARY: 0 errors" in out, out[-4000:]
