// Shared device/host helpers of the ouro kernels (internal; the public ABI is ouro_kernels.h).
//
// Numerics conventions (same as ouro.calib.quantizers): fp32 arithmetic, IEEE division
// (__fdiv_rn), round-half-to-even (rintf), no FMA contraction where the reference has two
// roundings (explicit __fmul_rn / __fadd_rn).
#pragma once

#include "ouro_kernels.h"

#include <cuda_fp16.h>
#include <stdint.h>

#include <mutex>
#include <vector>

namespace ouro
{

constexpr int kMaxK = 16384;        // channels of one token handled by one block (shared-memory bound)
constexpr int kMaxTokens = 65534;   // L limit: window positions are stored as uint16
constexpr uint16_t kNever = 0xFFFF; // "channel never became an outlier in this window"
constexpr int kMaxState = 16;       // selective scan: d_state held in registers
constexpr size_t kWsAlign = 256;

inline bool is_aligned(const void* p, size_t a)
{
    return (reinterpret_cast<uintptr_t>(p) % a) == 0;
}

__host__ __device__ inline size_t align_up(size_t x, size_t a = kWsAlign)
{
    return (x + a - 1) / a * a;
}

__host__ __device__ inline int ceil_div(int a, int b)
{
    return (a + b - 1) / b;
}

#ifndef OURO_CPU_EMULATION
// Dynamic shared memory of a kernel, and kernel launches. Both go through these two names so that the
// sources also compile for the CPU emulator used by tests/unit/test_kernels_cpu_emulation.py.
#define OURO_DYN_SMEM(T, name) extern __shared__ T name[]

template <typename... KArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args... args)
{
    kernel<<<grid, block, smem, stream>>>(args...);
}
#endif

// Status of the launch just made: cudaPeekAtLastError right after the launch (it does not clear the error, so
// an error of some other library's launch is neither swallowed nor reset here).
inline ouroStatus_t launch_status()
{
    return cudaPeekAtLastError() == cudaSuccess ? OURO_OK : OURO_ERR_CUDA;
}

// Record of the dynamic shared memory granted to each (kernel, device) (host side, thread-safe).
inline bool smem_grant(const void* fn, int dev, size_t smem, bool record)
{
    struct Grant
    {
        const void* fn;
        int dev;
        size_t bytes;
    };
    static std::mutex mu;
    static std::vector<Grant> grants;
    std::lock_guard<std::mutex> lock(mu);
    for (Grant& g : grants)
        if (g.fn == fn && g.dev == dev)
        {
            if (record && smem > g.bytes)
                g.bytes = smem;
            return g.bytes >= smem;
        }
    if (record)
        grants.push_back(Grant{fn, dev, smem});
    return record;
}

// Opts a kernel in to `smem` bytes of dynamic shared memory (needed above 48 KB), once per kernel and device: later
// launches (e.g. inside a CUDA graph capture) make no attribute call. False if the device refuses.
template <typename Kernel>
inline bool allow_dynamic_smem(Kernel kernel, size_t smem)
{
    if (smem <= 48 * 1024)
        return true;
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess)
        return false;
    const void* key = reinterpret_cast<const void*>(kernel);
    if (smem_grant(key, dev, smem, false))
        return true;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) != cudaSuccess)
        return false;
    return smem_grant(key, dev, smem, true);
}

// Bump allocator over a caller-provided workspace (sizes rounded to 256 B).
struct WsCarver
{
    char* base;
    size_t off = 0;
    explicit WsCarver(void* b) : base(static_cast<char*>(b)) {}
    void* take(size_t bytes)
    {
        void* p = base ? base + off : nullptr;
        off += align_up(bytes);
        return p;
    }
};

__host__ __device__ inline int qmax_of(int bits)
{
    return (1 << (bits - 1)) - 1;
}

__device__ __forceinline__ float load_f(const void* p, int is_fp32, size_t i)
{
    return is_fp32 ? static_cast<const float*>(p)[i] : __half2float(static_cast<const __half*>(p)[i]);
}

__device__ __forceinline__ void store_f(void* p, int is_fp32, size_t i, float v)
{
    if (is_fp32)
        static_cast<float*>(p)[i] = v;
    else
        static_cast<__half*>(p)[i] = __float2half_rn(v);
}

// clamp(round_half_even(x / s), -q, q) with IEEE division.
__device__ __forceinline__ float quant_code(float x, float s, float q)
{
    return fminf(fmaxf(rintf(__fdiv_rn(x, s)), -q), q);
}

// Weight code w[n, k]: int8 [N, K], or int4 packed two per byte along K (low nibble = even k).
__device__ __forceinline__ int w_code(const int8_t* w, int w_bits, int K, int n, int k)
{
    if (w_bits == 8)
        return w[static_cast<size_t>(n) * K + k];
    const uint8_t byte = reinterpret_cast<const uint8_t*>(w)[static_cast<size_t>(n) * (K / 2) + k / 2];
    const int nib = (k & 1) ? (byte >> 4) : (byte & 0xF);
    return nib >= 8 ? nib - 16 : nib;
}

struct MaxOp
{
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp
{
    __device__ double operator()(double a, double b) const { return a + b; }
};

// Block-wide reduction (blockDim.x a multiple of 32, at most 1024). Every thread gets the result;
// the order of operations is fixed, so the result is deterministic. `red` holds 32 entries.
template <typename T, typename Op>
__device__ T block_reduce(T v, T* red, Op op, T identity)
{
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads(); // `red` may still be read by a previous call
    if (lane == 0)
        red[warp] = v;
    __syncthreads();
    T r = identity;
    for (int i = 0; i < nw; ++i)
        r = op(r, red[i]);
    return r;
}

// 16 bytes moved by one vector load/store (LDG.128 / STS.128 on the GPU).
struct alignas(16) Vec16
{
    uint32_t w[4];
};

// Block-wide exclusive prefix sum of one int per thread (every thread must call it; blockDim.x a multiple of
// 32, at most 1024). Returns this thread's prefix; *total receives the sum. `red` holds 33 ints.
__device__ inline int block_exclusive_scan(int v, int* red, int* total)
{
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nw = blockDim.x >> 5;
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1)
    {
        const int n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o)
            incl += n;
    }
    __syncthreads(); // `red` may still be read by a previous call
    if (lane == 31)
        red[warp] = incl;
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < nw; ++w)
    {
        before += w < warp ? red[w] : 0;
        all += red[w];
    }
    *total = all;
    return before + incl - v;
}

// ---------------------------------------------------------------------------------------------
// Host-side helpers (ouro_status.cu)
// ---------------------------------------------------------------------------------------------
// Validates an activation quantizer; `required` = the operand must be quantized (bits != 0).
ouroStatus_t validate_act_quant(const ouroActQuant_t& q, bool required);
// Compute capability of the current device as 10*major+minor.
ouroStatus_t device_cc(int* cc);

// Fake quantization with an explicit output dtype (the public API uses y dtype = x dtype).
ouroStatus_t launch_outlier_fake_quant(const void* x, int x_is_fp32, void* y, int y_is_fp32, int B, int L, int C,
                                       const ouroActQuant_t& q, cudaStream_t stream);

} // namespace ouro
