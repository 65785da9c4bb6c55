// CPU emulator for the ouro CUDA kernels (tests only; force-included with -include emu.h and
// -DOURO_CPU_EMULATION). Every CUDA thread of a block runs as a ucontext fiber; __syncthreads()
// switches back to the scheduler, which resumes every fiber of the block in turn, so barrier
// semantics hold. __shared__ variables become function statics (blocks run one after another).
// Warp shuffles are emulated through a block-wide exchange (they are only used by block_reduce,
// where every thread of the block takes part). fp32 intrinsics are plain IEEE operations; compile
// with -ffp-contract=off so nothing is fused.
#pragma once

#include <math.h>
#include <cstring>
#include <functional>
#include <ucontext.h>
#include <vector>

#include "cuda_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct EmuUint3
{
    unsigned x = 0, y = 0, z = 0;
};
inline EmuUint3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu
{
inline std::vector<char> dyn_smem;

struct Scheduler
{
    ucontext_t main_ctx;
    std::vector<ucontext_t> ctx;
    std::vector<std::vector<char>> stacks;
    std::vector<int> done;
    int cur = 0;
    std::function<void()> body;
};
inline Scheduler sched;

inline void trampoline()
{
    sched.body();
    sched.done[sched.cur] = 1;
    swapcontext(&sched.ctx[sched.cur], &sched.main_ctx);
}

inline void syncthreads()
{
    swapcontext(&sched.ctx[sched.cur], &sched.main_ctx);
}

inline void run_block(const dim3& block, std::function<void()> body)
{
    const int n = static_cast<int>(block.x * block.y * block.z);
    constexpr size_t kStack = 256 * 1024;
    sched.body = std::move(body);
    sched.ctx.resize(n);
    sched.stacks.resize(n);
    sched.done.assign(n, 0);
    for (int t = 0; t < n; ++t)
    {
        sched.stacks[t].resize(kStack);
        getcontext(&sched.ctx[t]);
        sched.ctx[t].uc_stack.ss_sp = sched.stacks[t].data();
        sched.ctx[t].uc_stack.ss_size = kStack;
        sched.ctx[t].uc_link = nullptr;
        makecontext(&sched.ctx[t], trampoline, 0);
    }
    // OURO_EMU_ORDER=reverse resumes the fibers in reverse order: a missing barrier (a race) then
    // changes the result, which the tests detect by comparing both orders with the reference.
    const char* order = getenv("OURO_EMU_ORDER");
    const bool reverse = order && strcmp(order, "reverse") == 0;
    for (;;)
    {
        bool ran = false;
        for (int i = 0; i < n; ++i)
        {
            const int t = reverse ? n - 1 - i : i;
            if (sched.done[t])
                continue;
            sched.cur = t;
            threadIdx.x = t % block.x;
            threadIdx.y = (t / block.x) % block.y;
            threadIdx.z = t / (block.x * block.y);
            swapcontext(&sched.main_ctx, &sched.ctx[t]);
            ran = true;
        }
        if (!ran)
            break;
    }
}
} // namespace emu

inline void __syncthreads()
{
    emu::syncthreads();
}

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask)
{
    static std::vector<T> slots(1024);
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    slots[tid] = v;
    __syncthreads();
    const T r = slots[tid ^ static_cast<unsigned>(lane_mask)];
    __syncthreads();
    return r;
}

inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __int2float_rn(int v) { return static_cast<float>(v); }
inline float __int_as_float(int v)
{
    float f;
    std::memcpy(&f, &v, sizeof f);
    return f;
}
inline int atomicOr(int* p, int v)
{
    const int old = *p;
    *p = old | v;
    return old;
}
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

#define OURO_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(emu::dyn_smem.data())

namespace ouro
{
template <typename... KArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args)
{
    emu::dyn_smem.assign(smem + 16, 0);
    blockDim.x = block.x, blockDim.y = block.y, blockDim.z = block.z;
    gridDim.x = grid.x, gridDim.y = grid.y, gridDim.z = grid.z;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x)
            {
                blockIdx.x = x, blockIdx.y = y, blockIdx.z = z;
                emu::run_block(block, [&] { kernel(args...); });
            }
}
} // namespace ouro
