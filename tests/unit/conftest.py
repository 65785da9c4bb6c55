"""Shared fixtures of the CPU unit tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP barrier stalls on a loaded 2-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- CPU emulation of the CUDA kernels
KERNEL_EMU_SOURCES = (
    "trt_plugins/common/ouro_status.cu",
    "trt_plugins/common/outlier_fake_quant.cu",
    "trt_plugins/outlier_linear/outlier_linear.cu",
    "trt_plugins/outlier_linear/gemm_simt.cu",
    "trt_plugins/outlier_linear/fused_prep.cu",
    "trt_plugins/outlier_linear/fused_gemm_s8w8.cu",
    "trt_plugins/outlier_linear/fused_gemm_s8w4.cu",
    "trt_plugins/outlier_linear/fused_gemm_s4.cu",
    "trt_plugins/selective_scan/selective_scan.cu",
)
"""Every kernel source of libouro_kernels except the CUTLASS instantiations (replaced by emu_gemm.cpp)."""


@pytest.fixture(scope="session")
def kernel_emu_lib(tmp_path_factory):
    """libouro_kernels' own sources compiled with g++ under the CPU emulator (tests/unit/kernel_emu): the kernels
    run on the CPU, the host code (dispatch, workspace, launch plans) is the library's. A ctypes.CDLL with the
    binding's prototypes. Skips without g++."""
    import shutil
    import subprocess
    from pathlib import Path

    from ouro.exporter import cuda_kernels as ck

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not on PATH (needed to build the kernel emulator)")
    repo = Path(__file__).resolve().parents[2]
    emu = repo / "tests" / "unit" / "kernel_emu"
    out = tmp_path_factory.mktemp("kernel_emu") / "libouro_kernels_emu.so"
    cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-DOURO_CPU_EMULATION",
           "-DOURO_WITH_S4=1", f"-I{emu}", "-include", str(emu / "emu.h"), f"-I{repo / 'trt_plugins' / 'common'}",
           f"-I{repo / 'trt_plugins'}", f"-I{repo / 'trt_plugins' / 'outlier_linear'}", "-x", "c++",
           *[str(repo / s) for s in KERNEL_EMU_SOURCES], str(emu / "emu_gemm.cpp"), str(emu / "emu_runtime.cpp"),
           "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ck.open_library(out)
    lib.path = out
    return lib
