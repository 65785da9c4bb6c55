# TensorRT plugin library libouro_trt_plugins.so (IPluginV3: OutlierLinear, SelectiveScan), its
# CPU unit tests (CTest) and the C++ deployment sample (tools/deploy, compiled only).
#
# TensorRT: only headers are needed (see OuroFindTensorRT.cmake for the hints). The library links
# `ouro_kernels` and the CUDA runtime statically, exports only getCreators/setLoggerFinder, and is
# linked with --no-undefined, so it provably needs no libnvinfer.
include(OuroFindTensorRT)
if(NOT TensorRT_FOUND)
  message(FATAL_ERROR
    "ouro: TensorRT headers (NvInfer.h, NvInferRuntime.h, NvInferPlugin.h) not found. "
    "Pass -DTensorRT_ROOT=<TensorRT install or SDK dir containing include/> (or set env TensorRT_ROOT / TRT_ROOT), "
    "or configure with -DOURO_BUILD_PLUGINS=OFF to build the CUDA kernels only.")
endif()
message(STATUS "ouro: TensorRT ${TensorRT_VERSION} headers at ${TensorRT_INCLUDE_DIR}")
find_package(CUDAToolkit REQUIRED)

set(_ouro_plugins_dir ${CMAKE_CURRENT_LIST_DIR}/..)
set(_ouro_repo_dir ${_ouro_plugins_dir}/..)

# ------------------------------------------------------------------ plugin objects (compiled once)
add_library(ouro_trt_plugins_obj OBJECT
  ${_ouro_plugins_dir}/common/plugin_utils.cpp
  ${_ouro_plugins_dir}/outlier_linear/OutlierLinearPlugin.cpp
  ${_ouro_plugins_dir}/selective_scan/SelectiveScanPlugin.cpp
  ${_ouro_plugins_dir}/plugin_registry.cpp)
target_include_directories(ouro_trt_plugins_obj PUBLIC
  ${_ouro_plugins_dir}/common ${_ouro_plugins_dir}/outlier_linear ${_ouro_plugins_dir}/selective_scan)
target_link_libraries(ouro_trt_plugins_obj PUBLIC TensorRT::headers CUDA::toolkit)
target_compile_options(ouro_trt_plugins_obj PRIVATE -Wall -Wextra -Wno-deprecated-declarations)
set_target_properties(ouro_trt_plugins_obj PROPERTIES
  POSITION_INDEPENDENT_CODE ON CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)

# ------------------------------------------------------------------ libouro_trt_plugins.so
set(_ouro_plugin_map ${CMAKE_CURRENT_LIST_DIR}/ouro_trt_plugins.map)
add_library(ouro_trt_plugins SHARED $<TARGET_OBJECTS:ouro_trt_plugins_obj>)
target_link_libraries(ouro_trt_plugins PRIVATE ouro_kernels CUDA::cudart_static)
target_link_options(ouro_trt_plugins PRIVATE
  "LINKER:--no-undefined"                       # every symbol resolved without libnvinfer
  "LINKER:--exclude-libs,ALL"                   # keep the static CUDA runtime's symbols private
  "LINKER:--version-script=${_ouro_plugin_map}") # export getCreators + setLoggerFinder only
set_target_properties(ouro_trt_plugins PROPERTIES
  LINK_DEPENDS ${_ouro_plugin_map}
  CUDA_RUNTIME_LIBRARY Static
  LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})

# ------------------------------------------------------------------ tests (CPU, no TensorRT runtime)
if(OURO_BUILD_TESTS)
  enable_testing()
  add_executable(ouro_plugin_tests ${_ouro_plugins_dir}/tests/test_plugins.cpp $<TARGET_OBJECTS:ouro_trt_plugins_obj>)
  target_link_libraries(ouro_plugin_tests PRIVATE ouro_trt_plugins_obj ouro_kernels CUDA::cudart_static)
  target_compile_options(ouro_plugin_tests PRIVATE -Wall -Wextra -Wno-deprecated-declarations)
  foreach(_group registry outlier_linear selective_scan field_blob)
    add_test(NAME plugins.${_group} COMMAND ouro_plugin_tests ${_group})
  endforeach()
  # Plugin -> kernel argument mapping, against a recording double of the kernel C ABI (no GPU).
  add_executable(ouro_plugin_enqueue_tests
    ${_ouro_plugins_dir}/tests/test_plugin_enqueue.cpp ${_ouro_plugins_dir}/tests/kernel_abi_recorder.cpp)
  target_link_libraries(ouro_plugin_enqueue_tests PRIVATE ouro_trt_plugins_obj)
  target_compile_options(ouro_plugin_enqueue_tests PRIVATE -Wall -Wextra -Wno-deprecated-declarations)
  add_test(NAME plugins.enqueue_mapping COMMAND ouro_plugin_enqueue_tests)
  # GPU runner of one plugin's enqueue (tests/gpu/test_plugins_gpu.py); built everywhere, run only on a GPU.
  add_executable(ouro_plugin_run ${_ouro_plugins_dir}/tests/plugin_gpu_run.cpp)
  target_link_libraries(ouro_plugin_run PRIVATE ouro_trt_plugins_obj ouro_kernels CUDA::cudart_static)
  target_compile_options(ouro_plugin_run PRIVATE -Wall -Wextra -Wno-deprecated-declarations)
  add_test(NAME plugins.library_exports_and_deps
           COMMAND ${CMAKE_COMMAND} -DLIB=$<TARGET_FILE:ouro_trt_plugins>
                   -P ${CMAKE_CURRENT_LIST_DIR}/CheckPluginLibrary.cmake)
endif()

# ------------------------------------------------------------------ C++ deployment sample
# Always compiled (so CI proves it builds against the headers); linked into an executable only
# where libnvinfer exists (a real TensorRT install).
set(_ouro_deploy_src ${_ouro_repo_dir}/tools/deploy/ouro_deploy.cpp)
if(EXISTS ${_ouro_deploy_src})
  add_library(ouro_deploy_obj OBJECT ${_ouro_deploy_src})
  target_link_libraries(ouro_deploy_obj PUBLIC TensorRT::headers CUDA::toolkit)
  target_compile_options(ouro_deploy_obj PRIVATE -Wall -Wextra -Wno-deprecated-declarations)
  if(TensorRT_nvinfer_LIBRARY)
    add_executable(ouro_deploy $<TARGET_OBJECTS:ouro_deploy_obj>)
    target_link_libraries(ouro_deploy PRIVATE ${TensorRT_nvinfer_LIBRARY} CUDA::cudart ${CMAKE_DL_LIBS})
    message(STATUS "ouro: deployment sample ouro_deploy links ${TensorRT_nvinfer_LIBRARY}")
  else()
    message(STATUS "ouro: libnvinfer not found: deployment sample compiled only (target ouro_deploy_obj)")
  endif()
endif()
