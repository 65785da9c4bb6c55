# Locate TensorRT. Only the headers are required (NvInfer.h, NvInferRuntime.h, NvInferPlugin*.h):
# the plugin library never links libnvinfer. libnvinfer is looked up too, optionally, for the
# C++ deployment sample (tools/deploy).
#
# Hints, in order: -DTensorRT_ROOT=<dir>, -DTRT_ROOT=<dir>, env TensorRT_ROOT / TRT_ROOT /
# TENSORRT_ROOT, then the standard install locations (Debian/Ubuntu packages, /usr/local/TensorRT*,
# /opt/tensorrt). Sets TensorRT_INCLUDE_DIR, TensorRT_VERSION, TensorRT_nvinfer_LIBRARY (may be
# NOTFOUND) and the imported target TensorRT::headers.
include_guard(GLOBAL)

set(_ouro_trt_hints "")
foreach(_v TensorRT_ROOT TRT_ROOT)
  if(${_v})
    list(APPEND _ouro_trt_hints ${${_v}})
  endif()
endforeach()
foreach(_v TensorRT_ROOT TRT_ROOT TENSORRT_ROOT)
  if(DEFINED ENV{${_v}})
    list(APPEND _ouro_trt_hints $ENV{${_v}})
  endif()
endforeach()
set(_ouro_trt_std /usr/local/TensorRT /usr/local/tensorrt /opt/tensorrt /usr/src/tensorrt)
file(GLOB _ouro_trt_versioned /usr/local/TensorRT-* /opt/TensorRT-*)
list(APPEND _ouro_trt_std ${_ouro_trt_versioned})

if(_ouro_trt_hints)
  # An explicit hint wins over anything found in a previous configure.
  find_path(TensorRT_INCLUDE_DIR NvInferRuntime.h HINTS ${_ouro_trt_hints} PATH_SUFFIXES include NO_DEFAULT_PATH)
endif()
find_path(TensorRT_INCLUDE_DIR NvInferRuntime.h
  PATHS ${_ouro_trt_std} /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu /usr/include
  PATH_SUFFIXES include)

set(TensorRT_FOUND FALSE)
if(TensorRT_INCLUDE_DIR)
  set(_ouro_trt_missing "")
  foreach(_h NvInfer.h NvInferRuntime.h NvInferPlugin.h NvInferPluginUtils.h NvInferVersion.h)
    if(NOT EXISTS ${TensorRT_INCLUDE_DIR}/${_h})
      list(APPEND _ouro_trt_missing ${_h})
    endif()
  endforeach()
  if(NOT _ouro_trt_missing)
    set(TensorRT_FOUND TRUE)
    file(STRINGS ${TensorRT_INCLUDE_DIR}/NvInferVersion.h _ouro_trt_ver
         REGEX "#define (TRT_(MAJOR|MINOR|PATCH)_ENTERPRISE|NV_TENSORRT_(MAJOR|MINOR|PATCH)) +[0-9]+")
    foreach(_part MAJOR MINOR PATCH)
      string(REGEX MATCH "(TRT_${_part}_ENTERPRISE|NV_TENSORRT_${_part}) +([0-9]+)" _m "${_ouro_trt_ver}")
      set(_ouro_trt_${_part} ${CMAKE_MATCH_2})
    endforeach()
    set(TensorRT_VERSION "${_ouro_trt_MAJOR}.${_ouro_trt_MINOR}.${_ouro_trt_PATCH}")
  endif()
endif()

get_filename_component(_ouro_trt_prefix "${TensorRT_INCLUDE_DIR}" DIRECTORY)
find_library(TensorRT_nvinfer_LIBRARY NAMES nvinfer nvinfer_11 nvinfer_10
  HINTS ${_ouro_trt_hints} ${_ouro_trt_prefix}
  PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu lib/aarch64-linux-gnu)

if(TensorRT_FOUND AND NOT TARGET TensorRT::headers)
  add_library(TensorRT::headers INTERFACE IMPORTED)
  # SYSTEM: TensorRT's own deprecation warnings are not ours to fix.
  set_target_properties(TensorRT::headers PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${TensorRT_INCLUDE_DIR}")
  set_property(TARGET TensorRT::headers PROPERTY INTERFACE_SYSTEM_INCLUDE_DIRECTORIES "${TensorRT_INCLUDE_DIR}")
endif()
