// Tensor-core and asynchronous-copy primitives of sm_80+ (inline PTX). The CPU emulator
// (tests/unit/kernel_emu/emu.h) provides the same functions with the same fragment layouts, so the kernels
// that use them are checked on a CPU.
//
// Fragment layouts (PTX ISA "Matrix fragments for mma.m16n8k*"), lane = 4 * g + q:
//   m16n8k32 s8   a[r]: rows g + 8 * (r & 1), k = 16 * (r >> 1) + 4 q .. +3 (4 bytes); b[r]: column g, same k
//   m16n8k64 s4   as s8 with 8 nibbles per register: k = 32 * (r >> 1) + 8 q .. +7 (low nibble first)
//   m16n8k16 f16  a[r]: rows g + 8 * (r & 1), k = 8 * (r >> 1) + 2 q, +1 (low half first); b[r]: k = 8 r + 2 q
//   d[0], d[1] at row g, columns 2 q, 2 q + 1; d[2], d[3] at row g + 8.
#pragma once

#include <stdint.h>

#ifndef OURO_CPU_EMULATION
namespace ouro
{

__device__ __forceinline__ void mma_s8_m16n8k32(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2])
{
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_s4_m16n8k64(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2])
{
    asm volatile("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_f16_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 16-byte global -> shared copy that bypasses L1; only the first src_bytes (0..16) are read, the rest of the
// 16 bytes are zero-filled (so out-of-range rows and K tails become zeros without a branch on the data).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes)
{
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::);
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

} // namespace ouro
#endif
