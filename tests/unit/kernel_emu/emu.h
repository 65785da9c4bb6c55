// CPU emulator for the ouro CUDA kernels (tests only; force-included with -include emu.h and
// -DOURO_CPU_EMULATION). Every CUDA thread of a block runs as a fiber; __syncthreads() switches back to
// the scheduler, which resumes every fiber of the block in turn, so barrier semantics hold. __shared__
// variables become function statics (blocks run one after another). fp32 intrinsics are plain IEEE
// operations; compile with -ffp-contract=off so nothing is fused.
//
// Warp-level operations (shuffles, the tensor-core mma.sync instructions) are collectives: each thread
// deposits its operands in a per-block slot, waits for one scheduler round (a barrier) and then reads the
// other lanes' slots. They therefore must be called by every thread of the block the same number of times,
// which is how the ouro kernels use them (uniform loops). The mma emulation implements the PTX ISA
// fragment layouts (m16n8k32 s8, m16n8k64 s4, m16n8k16 f16/f32), so a fragment indexing error in a kernel
// changes its result here.
//
// cp.async is emulated with its real completion semantics: a copy lands in shared memory only when the
// issuing thread waits for its group (cp.async.wait_group), so a kernel that reads a stage before waiting
// reads stale data and fails its test.
#pragma once

#include <math.h>
#include <cstring>
#include <functional>
#include <vector>

#include "cuda_runtime.h"
#include "cuda_fp16.h"

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

// ------------------------------------------------------------------ fibers (emu_runtime.cpp)
void run_block(const dim3& block, std::function<void()> body);
void yield();   // one scheduler round: the barrier
int tid();      // flat thread index of the running fiber
int nthreads(); // threads in the block
long round_id(); // scheduler rounds so far (changes at every barrier)

// ------------------------------------------------------------------ collectives
// Double-buffered exchange slots (index parity of the thread's collective counter): one barrier per
// collective suffices, because a thread can only overwrite a buffer after the next barrier, which every
// reader of that buffer must have reached first.
struct Slot
{
    uint32_t u[8];
    double d;
};
Slot* slots(int parity); // [1024] per parity
int& collective_count(int tid);

template <typename F>
inline void collective(const Slot& mine, F&& read)
{
    const int t = tid();
    const int par = collective_count(t)++ & 1;
    Slot* s = slots(par);
    s[t] = mine;
    yield();
    read(s, t);
}

// ------------------------------------------------------------------ cp.async (per-thread pending groups)
void cp_async(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int keep_groups);
void cp_async_reset(); // drop pending copies (end of a block)
} // namespace emu

inline void __syncthreads()
{
    emu::yield();
}
inline void __syncwarp(unsigned = 0xffffffffu)
{
    emu::yield(); // stronger than a warp barrier; the kernels call it uniformly
}
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
inline emu::Slot emu_pack(T v)
{
    static_assert(sizeof(T) <= sizeof(emu::Slot::u), "value too large for an exchange slot");
    emu::Slot s{};
    std::memcpy(s.u, &v, sizeof(T));
    return s;
}
template <typename T>
inline T emu_unpack(const emu::Slot& s)
{
    T v;
    std::memcpy(&v, s.u, sizeof(T));
    return v;
}

// Warp shuffles: lane l of the caller's warp reads the value of lane src(l) (width 32).
template <typename T, typename Src>
inline T emu_shfl(T v, Src src)
{
    T r{};
    emu::collective(emu_pack(v), [&](emu::Slot* s, int t) {
        const int base = t & ~31;
        const int lane = t & 31;
        const int from = src(lane);
        r = (from < 0 || from > 31 || base + from >= emu::nthreads()) ? v : emu_unpack<T>(s[base + from]);
    });
    return r;
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32)
{
    return emu_shfl(v, [=](int l) { return l ^ lane_mask; });
}
template <typename T>
T __shfl_sync(unsigned, T v, int src_lane, int = 32)
{
    return emu_shfl(v, [=](int) { return src_lane & 31; });
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32)
{
    return emu_shfl(v, [=](int l) { return l >= static_cast<int>(delta) ? l - static_cast<int>(delta) : l; });
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32)
{
    return emu_shfl(v, [=](int l) { return l + static_cast<int>(delta) <= 31 ? l + static_cast<int>(delta) : l; });
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
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int atomicOr(int* p, int v)
{
    const int old = *p;
    *p = old | v;
    return old;
}
inline unsigned atomicOr(unsigned* p, unsigned v)
{
    const unsigned old = *p;
    *p = old | v;
    return old;
}
inline int atomicAdd(int* p, int v)
{
    const int old = *p;
    *p = old + v;
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
                // shared memory starts each block with garbage on a GPU; here with a pattern, not zeros
                std::memset(emu::dyn_smem.data(), 0x5A, emu::dyn_smem.size());
                emu::run_block(block, [&] { kernel(args...); });
                emu::cp_async_reset();
            }
}

// ------------------------------------------------------------------ mma.cuh stand-ins
// cp.async of `bytes` (16) bytes; only the first src_bytes are read from global memory, the rest are zeros.
inline void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes)
{
    emu::cp_async(smem_dst, gmem_src, 16, src_bytes);
}
inline void cp_async_commit()
{
    emu::cp_async_commit();
}
template <int N>
inline void cp_async_wait()
{
    emu::cp_async_wait(N);
}

void mma_s8_m16n8k32(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
void mma_s4_m16n8k64(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
void mma_f16_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
} // namespace ouro
