// CPU-emulator stand-in for <cuda_runtime.h> (tests only): the few runtime types and calls the ouro
// kernels' host code uses, acting on host memory. See emu.h.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void* cudaStream_t;
typedef int* cudaEvent_t;
typedef enum
{
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1
} cudaError_t;
enum cudaDeviceAttr
{
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76
};
enum cudaFuncAttribute
{
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8
};
#define cudaHostAllocMapped 0x02
enum cudaMemcpyKind
{
    cudaMemcpyDeviceToHost = 2
};

struct dim3
{
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaHostAlloc(void** p, size_t n, unsigned) { *p = calloc(1, n); return *p ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaFreeHost(void* p) { free(p); return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
// Compute capability from env OURO_EMU_CC (e.g. "80", "90"), default 90; SM count from OURO_EMU_SMS, default 132.
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int)
{
    if (a == cudaDevAttrMultiProcessorCount)
    {
        const char* s = getenv("OURO_EMU_SMS");
        *v = s ? atoi(s) : 132;
        return cudaSuccess;
    }
    const char* e = getenv("OURO_EMU_CC");
    const int cc = e ? atoi(e) : 90;
    *v = a == cudaDevAttrComputeCapabilityMajor ? cc / 10 : cc % 10;
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { memcpy(d, s, n); return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = nullptr; return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) { *ms = 0.f; return cudaSuccess; }
inline cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
