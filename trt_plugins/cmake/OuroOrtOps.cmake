# onnxruntime custom-op library libouro_ort_ops.so: ouro::OutlierLinear and ouro::SelectiveScan on the CPU
# and CUDA execution providers (sources in trt_plugins/ort/). With OURO_BUILD_TESTS also its test-only ctypes
# twin (libouro_ort_testing.so), the C++ session test (CTest ort.*) and the C++ sample ouro_ort_run.
#
# onnxruntime C API headers (onnxruntime_c_api.h, ORT_API_VERSION >= 17), from the include/ folder of an
# onnxruntime release archive (onnxruntime-linux-x64-<version>.tgz): -DONNXRUNTIME_ROOT=<dir>, -DORT_ROOT,
# env ONNXRUNTIME_ROOT / ORT_ROOT, then /usr/local, /usr and /opt/onnxruntime*. The library never links
# libonnxruntime: onnxruntime hands it the API when it loads it (RegisterCustomOps).
# libonnxruntime (the C++ test and sample only): <root>/lib, else the `onnxruntime` wheel of the Python on PATH.
#
# OURO_BUILD_ORT_OPS: AUTO (default: build it when the headers are found), ON (headers required), OFF.
include_guard(GLOBAL)

set(OURO_BUILD_ORT_OPS AUTO CACHE STRING "Build libouro_ort_ops.so: AUTO (when the onnxruntime headers are found), ON, OFF")
set_property(CACHE OURO_BUILD_ORT_OPS PROPERTY STRINGS AUTO ON OFF)
if(OURO_BUILD_ORT_OPS STREQUAL "OFF")
  return()
endif()

set(_ouro_ort_hints "")
foreach(_v ONNXRUNTIME_ROOT ORT_ROOT)
  if(${_v})
    list(APPEND _ouro_ort_hints ${${_v}})
  endif()
  if(DEFINED ENV{${_v}})
    list(APPEND _ouro_ort_hints $ENV{${_v}})
  endif()
endforeach()
if(_ouro_ort_hints)
  find_path(ONNXRUNTIME_INCLUDE_DIR onnxruntime_c_api.h HINTS ${_ouro_ort_hints}
    PATH_SUFFIXES include include/onnxruntime NO_DEFAULT_PATH)
endif()
file(GLOB _ouro_ort_std /opt/onnxruntime*)
find_path(ONNXRUNTIME_INCLUDE_DIR onnxruntime_c_api.h PATHS ${_ouro_ort_std} /usr/local /usr
  PATH_SUFFIXES include include/onnxruntime include/onnxruntime/core/session)

set(_ouro_ort_api 0)
if(ONNXRUNTIME_INCLUDE_DIR)
  file(STRINGS ${ONNXRUNTIME_INCLUDE_DIR}/onnxruntime_c_api.h _ouro_ort_ver REGEX "^#define ORT_API_VERSION [0-9]+")
  string(REGEX MATCH "[0-9]+" _ouro_ort_api "${_ouro_ort_ver}")
endif()
if(NOT ONNXRUNTIME_INCLUDE_DIR OR _ouro_ort_api LESS 17)
  set(_ouro_ort_msg "onnxruntime C API headers (onnxruntime_c_api.h, onnxruntime >= 1.17) not found: pass "
    "-DONNXRUNTIME_ROOT=<onnxruntime release archive, containing include/> (or set env ONNXRUNTIME_ROOT)")
  if(OURO_BUILD_ORT_OPS STREQUAL "ON")
    message(FATAL_ERROR "ouro: ${_ouro_ort_msg}, or configure with -DOURO_BUILD_ORT_OPS=OFF")
  endif()
  message(STATUS "ouro: libouro_ort_ops.so not built: ${_ouro_ort_msg}")
  return()
endif()
message(STATUS "ouro: onnxruntime C API ${_ouro_ort_api} headers at ${ONNXRUNTIME_INCLUDE_DIR}")

set(_ouro_ort_dir ${CMAKE_CURRENT_LIST_DIR}/../ort)
find_package(CUDAToolkit REQUIRED)

function(_ouro_ort_flags tgt)
  # -ffp-contract=off: no fused multiply-add behind the code's back (the quantizers and the epilogue must
  # round exactly as the PyTorch references do).
  target_compile_options(${tgt} PRIVATE -O3 -ffp-contract=off -Wall -Wextra -Wno-psabi)
  target_include_directories(${tgt} PRIVATE ${_ouro_ort_dir})
  set_target_properties(${tgt} PROPERTIES POSITION_INDEPENDENT_CODE ON CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON)
endfunction()

# CPU kernels, compiled once (no onnxruntime dependency).
add_library(ouro_ort_cpu OBJECT ${_ouro_ort_dir}/cpu_quant.cpp ${_ouro_ort_dir}/cpu_linear.cpp ${_ouro_ort_dir}/cpu_scan.cpp)
_ouro_ort_flags(ouro_ort_cpu)

set(_ouro_ort_map ${_ouro_ort_dir}/ouro_ort_ops.map)
add_library(ouro_ort_ops SHARED $<TARGET_OBJECTS:ouro_ort_cpu>
  ${_ouro_ort_dir}/ort_common.cpp ${_ouro_ort_dir}/ort_ops_cpu.cpp ${_ouro_ort_dir}/ort_ops_cuda.cpp
  ${_ouro_ort_dir}/ort_register.cpp)
_ouro_ort_flags(ouro_ort_ops)
target_include_directories(ouro_ort_ops SYSTEM PRIVATE ${ONNXRUNTIME_INCLUDE_DIR})
target_link_libraries(ouro_ort_ops PRIVATE ouro_kernels CUDA::cudart_static)
target_link_options(ouro_ort_ops PRIVATE
  "LINKER:--no-undefined"                   # needs no libonnxruntime (nor anything else unresolved)
  "LINKER:--exclude-libs,ALL"               # keep the static CUDA runtime's symbols private
  "LINKER:--version-script=${_ouro_ort_map}") # exports RegisterCustomOps only
set_target_properties(ouro_ort_ops PROPERTIES
  LINK_DEPENDS ${_ouro_ort_map}
  CUDA_RUNTIME_LIBRARY Static
  LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})

# ------------------------------------------------------------------ libonnxruntime (C++ test and sample)
set(_ouro_ort_lib "")
find_library(ONNXRUNTIME_LIBRARY NAMES onnxruntime HINTS ${_ouro_ort_hints} PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH)
if(ONNXRUNTIME_LIBRARY)
  set(_ouro_ort_lib ${ONNXRUNTIME_LIBRARY})
else()
  # The onnxruntime wheel ships libonnxruntime.so.1.<minor>.<patch> (SONAME libonnxruntime.so.1) and no
  # unversioned name: link it through symbolic links in the build tree, found there at run time (RPATH).
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND ${Python3_EXECUTABLE} -c "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))"
      OUTPUT_VARIABLE _ouro_ort_capi RESULT_VARIABLE _ouro_ort_rc ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(_ouro_ort_rc EQUAL 0)
      file(GLOB _ouro_ort_wheel_lib ${_ouro_ort_capi}/libonnxruntime.so.*)
      list(FILTER _ouro_ort_wheel_lib INCLUDE REGEX "libonnxruntime\\.so\\.[0-9]+\\.[0-9]+\\.[0-9]+$")
    endif()
  endif()
  if(_ouro_ort_wheel_lib)
    list(GET _ouro_ort_wheel_lib 0 _ouro_ort_real)
    string(REGEX MATCH "libonnxruntime\\.so\\.[0-9]+" _ouro_ort_soname "${_ouro_ort_real}")
    set(_ouro_ort_links ${CMAKE_BINARY_DIR}/onnxruntime_lib)
    file(MAKE_DIRECTORY ${_ouro_ort_links})
    file(CREATE_LINK ${_ouro_ort_real} ${_ouro_ort_links}/${_ouro_ort_soname} SYMBOLIC)
    file(CREATE_LINK ${_ouro_ort_real} ${_ouro_ort_links}/libonnxruntime.so SYMBOLIC)
    set(_ouro_ort_lib ${_ouro_ort_links}/libonnxruntime.so)
  endif()
endif()
if(_ouro_ort_lib)
  message(STATUS "ouro: C++ onnxruntime test and sample link ${_ouro_ort_lib}")
  get_filename_component(_ouro_ort_libdir ${_ouro_ort_lib} DIRECTORY)
  add_library(ouro_onnxruntime SHARED IMPORTED)
  set_target_properties(ouro_onnxruntime PROPERTIES IMPORTED_LOCATION ${_ouro_ort_lib})
  set_property(TARGET ouro_onnxruntime PROPERTY INTERFACE_SYSTEM_INCLUDE_DIRECTORIES ${ONNXRUNTIME_INCLUDE_DIR})
  set_target_properties(ouro_onnxruntime PROPERTIES INTERFACE_INCLUDE_DIRECTORIES ${ONNXRUNTIME_INCLUDE_DIR})
  # C++ sample: runs an ouro ONNX graph through onnxruntime with libouro_ort_ops.so, no Python involved.
  add_executable(ouro_ort_run ${_ouro_ort_dir}/../../tools/deploy/ouro_ort_run.cpp)
  target_link_libraries(ouro_ort_run PRIVATE ouro_onnxruntime)
  target_compile_options(ouro_ort_run PRIVATE -Wall -Wextra)
  set_target_properties(ouro_ort_run PROPERTIES BUILD_RPATH ${_ouro_ort_libdir})
else()
  message(STATUS "ouro: libonnxruntime not found (ONNXRUNTIME_ROOT/lib or the onnxruntime wheel): C++ test and sample skipped")
endif()

# ------------------------------------------------------------------ tests
if(OURO_BUILD_TESTS)
  enable_testing()
  # The CPU kernels behind a small C ABI, for the ctypes tests of tests/unit/test_ort_native.py.
  add_library(ouro_ort_testing SHARED $<TARGET_OBJECTS:ouro_ort_cpu> ${_ouro_ort_dir}/tests/testing_capi.cpp)
  _ouro_ort_flags(ouro_ort_testing)
  set_target_properties(ouro_ort_testing PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})
  if(_ouro_ort_lib)
    add_executable(ouro_ort_tests ${_ouro_ort_dir}/tests/test_ort_session.cpp)
    target_link_libraries(ouro_ort_tests PRIVATE ouro_onnxruntime)
    target_compile_options(ouro_ort_tests PRIVATE -Wall -Wextra -ffp-contract=off) # the scalar reference rounds like the spec
    set_target_properties(ouro_ort_tests PROPERTIES BUILD_RPATH ${_ouro_ort_libdir})
    foreach(_group register outlier_linear selective_scan errors)
      add_test(NAME ort.${_group} COMMAND ouro_ort_tests $<TARGET_FILE:ouro_ort_ops> ${_group})
    endforeach()
  endif()
endif()
