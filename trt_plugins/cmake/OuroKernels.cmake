# ouro CUDA kernels: targets `ouro_kernels` (static, PIC) and `ouro_kernels_shared` (libouro_kernels.so,
# CUDA runtime linked statically, loaded by the Python ctypes binding ouro.exporter.cuda_kernels).
#
# CUTLASS headers: -DCUTLASS_DIR=<dir containing include/cutlass>, or env CUTLASS_DIR, else the
# nvidia-cutlass wheel (`cutlass_library/source/include`) of the Python found on PATH.

set(_ouro_src ${CMAKE_CURRENT_LIST_DIR}/..)

# ------------------------------------------------------------------ CUTLASS discovery
if(NOT CUTLASS_DIR AND DEFINED ENV{CUTLASS_DIR})
  set(CUTLASS_DIR $ENV{CUTLASS_DIR})
endif()
set(OURO_CUTLASS_INCLUDE "")
if(CUTLASS_DIR)
  foreach(_cand ${CUTLASS_DIR}/include ${CUTLASS_DIR})
    if(EXISTS ${_cand}/cutlass/gemm/device/gemm.h)
      set(OURO_CUTLASS_INCLUDE ${_cand})
      break()
    endif()
  endforeach()
else()
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND ${Python3_EXECUTABLE} -c "import cutlass_library, os; print(os.path.dirname(cutlass_library.__file__))"
      OUTPUT_VARIABLE _ouro_cl RESULT_VARIABLE _ouro_cl_rc ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(_ouro_cl_rc EQUAL 0 AND EXISTS ${_ouro_cl}/source/include/cutlass/gemm/device/gemm.h)
      set(OURO_CUTLASS_INCLUDE ${_ouro_cl}/source/include)
    endif()
  endif()
endif()
if(NOT OURO_CUTLASS_INCLUDE)
  message(FATAL_ERROR
    "ouro: CUTLASS headers not found. Either pass -DCUTLASS_DIR=<cutlass checkout> (containing include/cutlass), "
    "or install the headers wheel into the Python on PATH: pip install --no-deps nvidia-cutlass")
endif()
message(STATUS "ouro: CUTLASS include ${OURO_CUTLASS_INCLUDE}")

# ------------------------------------------------------------------ sources
set(OURO_KERNEL_SOURCES
  ${_ouro_src}/common/ouro_status.cu
  ${_ouro_src}/common/outlier_fake_quant.cu
  ${_ouro_src}/outlier_linear/outlier_linear.cu
  ${_ouro_src}/outlier_linear/gemm_s8_sm80.cu
  ${_ouro_src}/outlier_linear/gemm_simt.cu
  ${_ouro_src}/outlier_linear/fused_prep.cu
  ${_ouro_src}/outlier_linear/fused_gemm_s8w8.cu
  ${_ouro_src}/outlier_linear/fused_gemm_s8w4.cu
  ${_ouro_src}/selective_scan/selective_scan.cu
)

# The native INT4 tensor-core GEMMs are only dispatched on sm_80/86/87/89 (Hopper has no int4 MMA): compile
# them for those architectures only (in their own object library); elsewhere a stub reports "not compiled".
set(_ouro_s4_archs "")
foreach(_a ${CMAKE_CUDA_ARCHITECTURES})
  string(REGEX MATCH "^[0-9]+" _num "${_a}")
  if(_num STREQUAL "80" OR _num STREQUAL "86" OR _num STREQUAL "87" OR _num STREQUAL "89")
    list(APPEND _ouro_s4_archs ${_a})
  endif()
endforeach()

function(_ouro_kernel_flags tgt)
  target_include_directories(${tgt} PUBLIC ${_ouro_src}/common)
  target_include_directories(${tgt} PRIVATE ${_ouro_src})
  target_include_directories(${tgt} SYSTEM PRIVATE ${OURO_CUTLASS_INCLUDE})
  # IEEE division/sqrt, no fast math: the kernels must match the PyTorch references bit-exactly.
  target_compile_options(${tgt} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -prec-div=true -prec-sqrt=true -ftz=false -Xcudafe --diag_suppress=177>)
  set_target_properties(${tgt} PROPERTIES POSITION_INDEPENDENT_CODE ON CUDA_SEPARABLE_COMPILATION OFF
    CXX_VISIBILITY_PRESET hidden CUDA_VISIBILITY_PRESET hidden)
endfunction()

find_package(CUDAToolkit REQUIRED)

# Every source is compiled once (object libraries), then archived and linked twice.
add_library(ouro_kernels_s4 OBJECT ${_ouro_src}/outlier_linear/gemm_s4_sm80.cu
  ${_ouro_src}/outlier_linear/fused_gemm_s4.cu)
_ouro_kernel_flags(ouro_kernels_s4)
if(_ouro_s4_archs)
  set_target_properties(ouro_kernels_s4 PROPERTIES CUDA_ARCHITECTURES "${_ouro_s4_archs}")
  target_compile_definitions(ouro_kernels_s4 PRIVATE OURO_WITH_S4=1)
else()
  target_compile_definitions(ouro_kernels_s4 PRIVATE OURO_WITH_S4=0)
endif()

add_library(ouro_kernels_obj OBJECT ${OURO_KERNEL_SOURCES})
_ouro_kernel_flags(ouro_kernels_obj)

add_library(ouro_kernels STATIC $<TARGET_OBJECTS:ouro_kernels_obj> $<TARGET_OBJECTS:ouro_kernels_s4>)
target_include_directories(ouro_kernels PUBLIC ${_ouro_src}/common)
target_link_libraries(ouro_kernels PUBLIC CUDA::cudart_static)
set_target_properties(ouro_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON LINKER_LANGUAGE CUDA)

add_library(ouro_kernels_shared SHARED $<TARGET_OBJECTS:ouro_kernels_obj> $<TARGET_OBJECTS:ouro_kernels_s4>)
target_include_directories(ouro_kernels_shared PUBLIC ${_ouro_src}/common)
set_target_properties(ouro_kernels_shared PROPERTIES
  OUTPUT_NAME ouro_kernels
  LINKER_LANGUAGE CUDA
  CUDA_RUNTIME_LIBRARY Static
  LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})
