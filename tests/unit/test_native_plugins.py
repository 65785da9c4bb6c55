"""Native build of trt_plugins (CUDA kernels + TensorRT plugin library) and its CPU plugin tests.

Builds with CMake against TensorRT *headers* only (env TensorRT_ROOT or TRT_ROOT), runs the C++ plugin tests through CTest, and checks the library's link
contract: `nm -D` shows getCreators/setLoggerFinder, and it needs no libnvinfer.

Reuses an existing configured build at $OURO_TRT_BUILD_DIR or build/trt (what CI and the README
create); otherwise configures one for $OURO_CUDA_ARCHS (default "80", one arch to keep it short;
CI sets "80;86;89;90"). Skips, with the reason, when nvcc, cmake or the TensorRT headers are
missing (fails instead when OURO_REQUIRE_NATIVE=1).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.native, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LIB_NAME = "libouro_trt_plugins.so"
BUILD_TIMEOUT_S = 3600
REQUIRED_EXPORTS = ("getCreators", "setLoggerFinder")


def _tensorrt_root() -> Path | None:
    for cand in (os.environ.get("TensorRT_ROOT"), os.environ.get("TRT_ROOT")):
        if cand and (Path(cand) / "include" / "NvInferRuntime.h").is_file():
            return Path(cand)
    return None


def _missing_prerequisite() -> str | None:
    for tool in ("nvcc", "cmake", "nm", "readelf"):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH"
    if _tensorrt_root() is None:
        return "TensorRT headers not found (set TensorRT_ROOT to a TensorRT SDK or its headers)"
    return None


def _run(cmd: list[str], timeout: int = BUILD_TIMEOUT_S) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.fixture(scope="module")
def build_dir() -> Path:
    reason = _missing_prerequisite()
    if reason:
        if os.environ.get("OURO_REQUIRE_NATIVE") == "1":
            pytest.fail(f"OURO_REQUIRE_NATIVE=1 but the native build cannot run: {reason}")
        pytest.skip(reason)
    bdir = Path(os.environ.get("OURO_TRT_BUILD_DIR", REPO / "build" / "trt"))
    configure = ["cmake", "-S", str(REPO / "trt_plugins"), "-B", str(bdir), f"-DTensorRT_ROOT={_tensorrt_root()}",
                 "-DOURO_BUILD_PLUGINS=ON", "-DOURO_BUILD_TESTS=ON"]
    if not (bdir / "CMakeCache.txt").is_file():
        archs = os.environ.get("OURO_CUDA_ARCHS", "80")
        configure += [f"-DCMAKE_CUDA_ARCHITECTURES={archs}", "-DCMAKE_BUILD_TYPE=Release"]
    # Re-configuring an existing tree only switches the plugins/tests on (a kernels-only build
    # configured with -DOURO_BUILD_PLUGINS=OFF is extended, not rebuilt; its archs are kept).
    _run(configure)
    _run(["cmake", "--build", str(bdir), "-j", str(os.cpu_count() or 2)])
    return bdir


def test_ctest_plugin_unit_tests_pass(build_dir):
    r = _run(["ctest", "--test-dir", str(build_dir), "--output-on-failure", "-R", "^plugins\\."], timeout=600)
    assert "100% tests passed" in r.stdout, r.stdout


def test_library_exports_tensorrt_entry_points(build_dir):
    lib = build_dir / LIB_NAME
    assert lib.is_file(), f"{lib} was not built"
    syms = _run(["nm", "-D", "--defined-only", str(lib)], timeout=60).stdout.split()
    for name in REQUIRED_EXPORTS:
        assert name in syms, f"{LIB_NAME} does not export {name}"


def test_library_needs_no_libnvinfer_nor_shared_cudart(build_dir):
    lib = build_dir / LIB_NAME
    dyn = _run(["readelf", "-d", str(lib)], timeout=60).stdout
    needed = [line.split("[")[-1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]
    assert needed, "readelf found no NEEDED entries (not a shared library?)"
    assert not [n for n in needed if n.startswith(("libnvinfer", "libcudart"))], needed
    if shutil.which("ldd"):
        ldd = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, timeout=60)
        assert "libnvinfer" not in ldd.stdout
        assert "not found" not in ldd.stdout, ldd.stdout


def test_plugin_fields_match_the_onnxruntime_reference_ops(build_dir):
    """One contract, two runtimes: the TensorRT plugins' fields (names and int/float types) are
    exactly the attributes of the onnxruntime reference ops of the same custom nodes."""
    from ouro.exporter.ort_ops import OPS

    out = _run([str(build_dir / "ouro_plugin_tests"), "--print-fields"], timeout=60).stdout
    plugin_fields: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        plugin, name, ftype = line.split()
        plugin_fields.setdefault(plugin, {})[name] = ftype
    assert set(plugin_fields) == set(OPS)
    for op, spec in OPS.items():
        ort_fields = {k: "FLOAT32" if isinstance(v, float) else "INT32" for k, v in spec.attrs.items()}
        assert plugin_fields[op] == ort_fields, f"{op}: plugin fields {plugin_fields[op]} != ORT attributes {ort_fields}"
