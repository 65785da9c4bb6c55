// CPU-emulator stand-in for <cuda_fp16.h> (tests only): IEEE binary16 through GCC's _Float16.
#pragma once

typedef _Float16 __half;
inline __half __float2half_rn(float f) { return static_cast<_Float16>(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
