#!/usr/bin/env bash
# One call on a machine with a GPU measures everything this repository could not measure without one:
#   1. builds the kernels (and the plugins if TensorRT headers are found) for the GPU present,
#   2. runs tests/gpu: kernels vs references, plugin enqueue vs kernels, and compute-sanitizer memcheck /
#      racecheck / synccheck / initcheck (tests/gpu/test_memcheck.py, PYTORCH_NO_CUDA_MEMORY_CACHING=1),
#   3. runs the benchmarks (tools/bench_gemm.py with every tactic, tools/bench_scan_cuda.py; CUDA graphs),
#   4. prices the same shapes with tools/perf_model.py for comparison,
# and writes ONE JSON: $OUT/device_check.json (OUT defaults to ./out). Budget: about 8 minutes on one GPU.
#
#   tools/device_check.sh                 # from the repository root or anywhere
#   PYTHON=.venv/bin/python CUTLASS_DIR=... TensorRT_ROOT=... tools/device_check.sh
#
# Needs: nvcc + cmake, a Python with a CUDA build of torch and pytest, the CUTLASS headers (the nvidia-cutlass
# wheel in that Python, or CUTLASS_DIR). Every stage runs even if an earlier one fails; the JSON says which did.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-out}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
BUILD="${OURO_DEVICE_BUILD_DIR:-build/device}"
LOG="$OUT_DIR/device_check.log"
: > "$LOG"
declare -A RC SECONDS_OF

run_stage() { # name timeout_s command...
  local name="$1" limit="$2"
  shift 2
  echo "== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$LOG" 2>&1
  RC[$name]=$?
  SECONDS_OF[$name]=$((SECONDS - t0))
  echo "== $name: exit ${RC[$name]} after ${SECONDS_OF[$name]} s" | tee -a "$LOG"
}

# 0. environment
run_stage env 60 "$PY" -c "
import json, shutil, torch
d = dict(torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.is_available())
if d['gpu']:
    d.update(name=torch.cuda.get_device_name(), cc=list(torch.cuda.get_device_capability()),
             sms=torch.cuda.get_device_properties(0).multi_processor_count)
d.update(nvcc=shutil.which('nvcc'), cmake=shutil.which('cmake'), sanitizer=shutil.which('compute-sanitizer'))
open('$OUT_DIR/env.json', 'w').write(json.dumps(d))
print(d)
"

# 1. build for the GPU present (CMakeLists.txt picks its compute capability when no arch list is given)
PLUGINS=OFF
if [ -n "${TensorRT_ROOT:-${TRT_ROOT:-}}" ]; then PLUGINS=ON; fi
run_stage configure 120 cmake -S trt_plugins -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DOURO_BUILD_PLUGINS=$PLUGINS \
  -DOURO_BUILD_TESTS=$PLUGINS ${CUTLASS_DIR:+-DCUTLASS_DIR=$CUTLASS_DIR}
run_stage build 420 cmake --build "$BUILD" -j "$(nproc)"
export OURO_KERNELS_LIB="$PWD/$BUILD/libouro_kernels.so" OURO_TRT_BUILD_DIR="$PWD/$BUILD"

# 2. GPU tests (the sanitizer suite included: it is part of tests/gpu)
run_stage gpu_tests 420 "$PY" -m pytest tests/gpu -q -p no:cacheprovider --timeout 300 \
  --junitxml="$OUT_DIR/gpu_tests.xml"

# 3. benchmarks
run_stage bench_gemm 240 "$PY" tools/bench_gemm.py --tactics --reps 10 --iters 10 --json "$OUT_DIR/bench_gemm.json"
run_stage bench_scan 120 "$PY" tools/bench_scan_cuda.py --json "$OUT_DIR/bench_scan.json"

# 4. the traffic model, for the same shapes
run_stage perf_model 60 "$PY" tools/perf_model.py --lib "$OURO_KERNELS_LIB" --json "$OUT_DIR/perf_model.json"

# 5. one JSON
STAGES=""
for k in "${!RC[@]}"; do STAGES="$STAGES$k=${RC[$k]}:${SECONDS_OF[$k]},"; done
"$PY" - "$OUT_DIR" "$STAGES" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, stages = Path(sys.argv[1]), sys.argv[2]
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        return {"missing": f"{name}: {e}"}
report = {"stages": {}, "env": load("env.json")}
for item in filter(None, stages.split(",")):
    name, rest = item.split("=")
    rc, secs = rest.split(":")
    report["stages"][name] = {"exit": int(rc), "seconds": int(secs)}
try:
    root = ET.parse(out / "gpu_tests.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = []
    for tc in suite.iter("testcase"):
        bad = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
        if bad is not None:
            failed.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "message": (bad.get("message") or "")[:2000]})
    report["gpu_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    report["gpu_tests"]["failed"] = failed
except (OSError, ET.ParseError, AttributeError) as e:
    report["gpu_tests"] = {"missing": str(e)}
for name in ("bench_gemm.json", "bench_scan.json", "perf_model.json"):
    report[name.split(".")[0]] = load(name)
(out / "device_check.json").write_text(json.dumps(report, indent=1))
print(json.dumps({k: report[k] for k in ("stages", "gpu_tests")}, indent=1))
EOF
echo "wrote $OUT_DIR/device_check.json (log: $LOG)"
