"""tools/perf_model.py on the CPU: it prices the kernels the library's own launch code plans (no copy of the
launch configuration), and its roofline arithmetic is what its docstring says.

The library is the CPU-emulator build of the kernel sources (fixture `kernel_emu_lib`): its launch plans are the
same host code as the CUDA build's."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from ouro.exporter import cuda_kernels as ck

REPO = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("perf_model_tool", REPO / "tools" / "perf_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


pm = _load_tool()


def test_runs_on_every_device_and_writes_json(kernel_emu_lib, tmp_path, capsys):
    out = tmp_path / "model.json"
    assert pm.main(["--lib", str(kernel_emu_lib.path), "--model", "vim_b", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for d in pm.DEVICES.values():
        assert d.name in text
    assert "cuBLAS FP16" in text and "not measurements" in text
    data = json.loads(out.read_text())
    assert len(data["rows"]) == len(pm.DEVICES) * 2 * 3  # devices x batches x layers
    seq = [s for s in data["sequences"] if s["batch"] == 32 and s["device"] == "H100 SXM"]
    assert len(seq) == 1 and seq[0]["layers"] == ["in_proj", "out_proj", "x_proj"]
    assert 0 < seq[0]["outlier_share"] < 1


def test_kernels_are_the_library_plan(kernel_emu_lib):
    """The rows list exactly the kernels, grids and byte counts of ouroOutlierLinearPlan for that device."""
    ns = type("A", (), dict(w_bits=4, act_bits=4, bits_outlier=8, n_refresh=10, window_frac=0.02, hot_frac=0.04))
    for key in ("H100", "A100"):
        dev = pm.DEVICES[key]
        row = pm.model_row(dev, "vim_b", "in_proj", 32, 768, 3072, ns, kernel_emu_lib)
        plan = ck.linear_plan(32 * 197, 197, 768, 3072, w_bits=4, act_bits=4, bits_outlier=8, n_refresh=10,
                              cc=dev.cc, num_sms=dev.sms, window_channels=0.02 * 768, hot_channels=0.04 * 768,
                              lib=kernel_emu_lib)
        assert [k.name for k in row.kernels] == [k.name for k in plan.kernels]
        assert [k.grid for k in row.kernels] == [k.grid for k in plan.kernels]
        assert (row.path, row.epilogue, row.tactic) == (plan.path, plan.epilogue, plan.tactic)
        # one pass over x (fp16) in the prep kernel; the GEMM's compulsory traffic includes y (fp16) once
        prep, gemm = plan.kernels
        assert prep.dram_read_bytes >= 32 * 197 * 768 * 2
        assert gemm.dram_write_bytes == 32 * 197 * 3072 * 2
        assert gemm.mma_kind == ("s4" if key == "A100" else "s8")  # native int4 on sm_80, none on sm_90
        assert 0 < gemm.mma_ops_outlier < 0.2 * gemm.mma_ops


def test_roofline_arithmetic():
    dev = pm.DEVICES["A100"]
    M, K, N = 6304, 768, 3072
    ctas = math.ceil(M / 128) * math.ceil(N / 128)
    eff = ctas / (math.ceil(ctas / dev.sms) * dev.sms)
    want = max(2 * M * N * K / (dev.fp16_tflops * 1e12 * eff), 2 * (M * K + N * K + M * N) / (dev.dram_tb_s * 1e12))
    assert pm.cublas_fp16_us(M, K, N, dev) == pytest.approx(want * 1e6 + pm.KERNEL_OVERHEAD_US)
    k = ck.KernelCost("k", (10, 1, 1), (128, 1, 1), 0, "s8", "s8", 3e6, 1e6, 4e6, 2e9, 1e8, 0.0)
    t = pm.price_kernel(k, dev)
    peak = dev.s8_tops * 1e12 * (10 / dev.sms)
    assert t.t_mem_us == pytest.approx(4e6 / (dev.dram_tb_s * 1e12) * 1e6)
    assert t.t_us == pytest.approx(max(t.t_mem_us, (2e9 + 1e8) / peak * 1e6) + pm.KERNEL_OVERHEAD_US)
    with pytest.raises(ValueError, match="no s4 MMA"):
        pm.peak_ops(pm.DEVICES["H100"], "s4")
