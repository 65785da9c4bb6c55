// The fused outlier-split linear: device code (host definitions: fused.h).
//
//   Y[M, N] = X[M, K] W[N, K]^T, row m = token t = m % L of image m / L, windows of n_refresh tokens.
//
// Kernel 1, act_prep_kernel (one block per (image, window)): reads each row of x once (window_prep.cuh) and
// writes the inlier codes (int8 [M, K] or packed int4 [M, K/2]), the window's outlier list in join order
// (slot_chan / slot_first / count), each row's outlier codes compacted to its list (a_out[m, slot], only the
// slots joined at or before that row: nothing that nothing reads) and S_O[m].
//
// Kernel 2, fused_gemm_kernel<Op, fp16 outliers, tile> (one CTA per BM x BN tile of y):
//   prologue   the union U of the outlier lists of the windows overlapping the CTA's BM rows, as a K-bit
//              bitmap in shared memory with prefix popcounts: rank(c) = position of channel c in U;
//   main loop  cp.async pipeline of A (codes) and B (weights) k-tiles, mma.sync into acc_in; while k-tile
//              kt sits in shared memory, the W rows of the union channels it contains (rank < 64) are
//              copied, K-major, into a slab Wg[n][rank]: the gather costs no extra global traffic;
//   outliers   per chunk of 64 union channels: the A slab [BM][64] (each row's compacted outlier codes
//              scattered to their union rank, zero elsewhere) and Wg (chunk 0 captured above, later chunks
//              gathered from global memory) run as one extra K-slab into a second accumulator acc_out
//              (mma s8, or fp16 mma with fp32 accumulation for fp16 outliers);
//   epilogue   y = float(acc_in) * (S_I(t) * s_w[n]) + float(acc_out) * (S_O[m] * s_w[n]) (+ bias[n]),
//              the reference's expression and roundings, written once (NaN rows for overflowing windows).
// Shared-memory tiles use a 16-byte XOR swizzle so that the 32-bit fragment loads are bank-conflict free.
#pragma once

#include "fused.h"
#include "mma.cuh"
#include "window_prep.cuh"

#include <type_traits>

namespace ouro
{
namespace fused
{

// ------------------------------------------------------------------ shared-memory tile addressing
// A tile row of RB bytes (RB = 32, 64 or 128) holds CPR = RB / 16 chunks of 16 bytes; chunk c of row r is
// stored at chunk c ^ ((r * CPR / 8) % CPR): the 8 rows of an mma fragment then hit 8 different chunk columns.
template <int RB>
__device__ __forceinline__ int soff(int row, int byte)
{
    constexpr int kCpr = RB / 16;
    const int chunk = (byte >> 4) ^ ((row * kCpr / 8) % kCpr);
    return row * RB + (chunk << 4) + (byte & 15);
}

template <int RB>
__device__ __forceinline__ uint32_t lds32(const char* base, int row, int byte)
{
    return *reinterpret_cast<const uint32_t*>(base + soff<RB>(row, byte));
}

template <int RB>
__device__ __forceinline__ uint32_t lds16(const char* base, int row, int byte)
{
    return *reinterpret_cast<const uint16_t*>(base + soff<RB>(row, byte));
}

// Four packed int4 (low nibble first) -> four sign-extended int8 in one register.
__device__ __forceinline__ uint32_t expand_s4x4(uint32_t v)
{
    const uint32_t x = (v & 0xFu) | ((v & 0xF0u) << 4) | ((v & 0xF00u) << 8) | ((v & 0xF000u) << 12);
    return x | ((x & 0x08080808u) * 0x1Eu); // nibble >= 8: set the byte's high nibble (two's complement)
}

__device__ __forceinline__ int nibble_at(const char* base, int byte_off, int odd)
{
    const uint8_t b = static_cast<uint8_t>(base[byte_off]);
    const int nib = odd ? (b >> 4) : (b & 0xF);
    return nib >= 8 ? nib - 16 : nib;
}

__device__ __forceinline__ int window_index(int m, int L, int W, int n_refresh)
{
    const int t = m % L;
    return (m / L) * W + t / n_refresh;
}

// ------------------------------------------------------------------ kernel 1: activation prep
template <typename XT, bool kPackS4>
__global__ void __launch_bounds__(kPrepMaxThreads) act_prep_kernel(PrepArgs d)
{
    OURO_DYN_SMEM(Vec16, smem_v);
    char* smem = reinterpret_cast<char*>(smem_v);
    __shared__ PrepShared sh;
    const int bw = blockIdx.x;
    const WindowPos wp = window_of(bw, d.L, d.n_refresh);
    const int K = d.K;
    const int maxO = d.max_outliers;
    const int T = blockDim.x;
    const bool fp16_out = d.q.bits_outlier >= 16;
    const float qi = static_cast<float>(qmax_of(d.q.bits));
    const float qo = fp16_out ? 0.f : static_cast<float>(qmax_of(d.q.bits_outlier));
    const size_t slot0 = static_cast<size_t>(bw) * maxO;

    auto on_new = [&](int c, int slot, int i) {
        if (slot < maxO)
        {
            d.slot_chan[slot0 + slot] = c;
            d.slot_first[slot0 + slot] = i;
        }
    };
    auto emit = [&](int /*i*/, size_t m, int t, const XT* xs, const uint16_t* first, const TokenDecision& dec,
                    int count) {
        const float s_in = d.q.scale[t];
        for (int c0 = threadIdx.x * 8; c0 < K; c0 += T * 8)
        {
            int code[8];
#pragma unroll
            for (int e = 0; e < 8; ++e)
            {
                const int c = c0 + e;
                code[e] = first[c] != kNever ? 0 : static_cast<int>(quant_code(to_f(xs[c]), s_in, qi));
            }
            if (kPackS4)
            {
                uint32_t packed = 0;
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    packed |= (static_cast<uint32_t>(code[e]) & 0xFu) << (4 * e);
                *reinterpret_cast<uint32_t*>(d.a_in + (m * K + c0) / 2) = packed;
            }
            else
            {
                uint32_t lo = 0, hi = 0;
#pragma unroll
                for (int e = 0; e < 4; ++e)
                {
                    lo |= (static_cast<uint32_t>(code[e]) & 0xFFu) << (8 * e);
                    hi |= (static_cast<uint32_t>(code[e + 4]) & 0xFFu) << (8 * e);
                }
                uint32_t* dst = reinterpret_cast<uint32_t*>(d.a_in + m * K + c0);
                dst[0] = lo;
                dst[1] = hi;
            }
            if (d.dbg_codes)
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    d.dbg_codes[m * K + c0 + e] = static_cast<int8_t>(code[e]);
            if (d.dbg_mask)
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    d.dbg_mask[m * K + c0 + e] = first[c0 + e] != kNever;
        }
        const int cnt = min(count, maxO);
        for (int s = threadIdx.x; s < cnt; s += T)
        {
            const float v = to_f(xs[d.slot_chan[slot0 + s]]);
            const size_t o = m * maxO + s;
            if (fp16_out)
                static_cast<__half*>(d.a_out)[o] = __float2half_rn(v);
            else
                static_cast<int8_t*>(d.a_out)[o] = static_cast<int8_t>(quant_code(v, dec.s_out, qo));
        }
        if (threadIdx.x == 0)
            d.s_out[m] = dec.s_out;
    };
    const int count = prep_window(static_cast<const XT*>(d.x), K, wp, d.q, d.ring, smem, sh, emit, on_new);
    if (threadIdx.x == 0)
    {
        d.count[bw] = count;
        if (count > maxO)
        {
            atomicOr(d.flag, 1);
            if (d.report)
                *reinterpret_cast<volatile int32_t*>(d.report) = 1;
        }
    }
}

// ------------------------------------------------------------------ kernel 2: the fused GEMM
template <int kOp, bool kF16Out, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32) fused_gemm_kernel(GemmArgs d)
{
    constexpr int T = WARPS_M * WARPS_N * 32;
    constexpr bool kS4 = kOp == kOpS4;
    constexpr bool kW4 = kOp == kOpS8W4;
    constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N; // warp tile
    constexpr int MI = WTM / 16, NI = WTN / 8;
    static_assert(WTM % 16 == 0 && WTN % 8 == 0 && MI * NI <= 16, "warp tile");
    constexpr int RBA = row_bytes_a();
    constexpr int RBB = row_bytes_b(kOp);
    constexpr int KPS = k_per_stage(kOp);
    constexpr int SLAB = slab_row_bytes(kF16Out);
    constexpr int STAGE_A = BM * RBA;
    constexpr int STAGE = STAGE_A + BN * RBB;
    constexpr int MAIN = STAGES * STAGE > (BM + BN) * SLAB ? STAGES * STAGE : (BM + BN) * SLAB;
    using AccOut = typename std::conditional<kF16Out, float, int>::type;

    OURO_DYN_SMEM(Vec16, smem_v);
    char* smem = reinterpret_cast<char*>(smem_v);
    char* wg0 = smem + MAIN;
    uint32_t* bitmap = reinterpret_cast<uint32_t*>(wg0 + BN * SLAB);
    __shared__ int s_scan[33];

    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int g = lane >> 2, q = lane & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int M = d.M, N = d.N, K = d.K, maxO = d.max_outliers;
    const int nwords = (K + 31) / 32;
    int* prefix = reinterpret_cast<int*>(bitmap + nwords);

    // ---- prologue: the union of the tile's outlier channels
    for (int w = tid; w < nwords; w += T)
        bitmap[w] = 0u;
    __syncthreads();
    const int m_last = min(m0 + BM, M) - 1;
    const int bw_lo = window_index(m0, d.L, d.W, d.n_refresh);
    const int bw_hi = window_index(m_last, d.L, d.W, d.n_refresh);
    for (int bw = bw_lo; bw <= bw_hi; ++bw)
    {
        const int cnt = d.count[bw];
        if (cnt > maxO)
            continue; // overflowing window: its rows are NaN, its outliers are not needed
        for (int s = tid; s < cnt; s += T)
        {
            const int c = d.slot_chan[static_cast<size_t>(bw) * maxO + s];
            atomicOr(&bitmap[c >> 5], 1u << (c & 31));
        }
    }
    __syncthreads();
    int U = 0;
    for (int w0 = 0; w0 < nwords; w0 += T)
    {
        const int w = w0 + tid;
        const int pc = w < nwords ? __popc(bitmap[w]) : 0;
        int total = 0;
        const int pre = block_exclusive_scan(pc, s_scan, &total);
        if (w < nwords)
            prefix[w] = U + pre;
        U += total;
    }
    __syncthreads();
    auto rank = [&](int c) { return prefix[c >> 5] + __popc(bitmap[c >> 5] & ((1u << (c & 31)) - 1u)); };

    int acc[MI][NI][4];
    AccOut acc_o[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e)
            {
                acc[mi][ni][e] = 0;
                acc_o[mi][ni][e] = 0;
            }

    // ---- main loop
    const char* A = static_cast<const char*>(d.a);
    const char* B = reinterpret_cast<const char*>(d.w);
    const int a_row = kS4 ? K / 2 : K;
    const int b_row = (kS4 || kW4) ? K / 2 : K;
    const int KT = (K + KPS - 1) / KPS;
    auto load_stage = [&](int kt, int st) {
        char* sa = smem + st * STAGE;
        char* sb = sa + STAGE_A;
        for (int idx = tid; idx < BM * (RBA / 16); idx += T)
        {
            const int r = idx / (RBA / 16), ch = idx % (RBA / 16);
            const int gm = m0 + r, kb = kt * RBA + ch * 16;
            const bool ok = gm < M && kb < a_row;
            cp_async_16(sa + soff<RBA>(r, ch * 16), ok ? A + static_cast<size_t>(gm) * a_row + kb : A, ok ? 16 : 0);
        }
        for (int idx = tid; idx < BN * (RBB / 16); idx += T)
        {
            const int r = idx / (RBB / 16), ch = idx % (RBB / 16);
            const int gn = n0 + r, kb = kt * RBB + ch * 16;
            const bool ok = gn < N && kb < b_row;
            cp_async_16(sb + soff<RBB>(r, ch * 16), ok ? B + static_cast<size_t>(gn) * b_row + kb : B, ok ? 16 : 0);
        }
    };
    // Copies the W rows of the union channels (rank < kUnionChunk) held by k-tile kt into Wg0[n][rank].
    auto capture = [&](int kt, const char* sb) {
        const int k0 = kt * KPS;
        const int wlo = k0 >> 5;
        constexpr int kWords = KPS / 32;
        int nb = 0;
#pragma unroll
        for (int w = 0; w < kWords; ++w)
            nb += wlo + w < nwords ? __popc(bitmap[wlo + w]) : 0;
        for (int e = tid; e < nb * BN; e += T)
        {
            const int n = e % BN;
            int b = e / BN, c = -1;
            for (int w = 0; w < kWords && c < 0; ++w)
            {
                uint32_t bits = wlo + w < nwords ? bitmap[wlo + w] : 0u;
                const int pc = __popc(bits);
                if (b < pc)
                {
                    for (; b > 0; --b)
                        bits &= bits - 1u;
                    c = (wlo + w) * 32 + __ffs(static_cast<int>(bits)) - 1;
                }
                else
                    b -= pc;
            }
            const int j = rank(c);
            if (j >= kUnionChunk)
                continue;
            const int kl = c - k0;
            const int v = kW4 || kS4 ? nibble_at(sb, soff<RBB>(n, kl >> 1), kl & 1)
                                     : static_cast<int>(static_cast<int8_t>(sb[soff<RBB>(n, kl)]));
            if (kF16Out)
                *reinterpret_cast<__half*>(wg0 + soff<SLAB>(n, 2 * j)) = __float2half_rn(static_cast<float>(v));
            else
                wg0[soff<SLAB>(n, j)] = static_cast<char>(v);
        }
    };

    if (U > 0)
        for (int idx = tid; idx < BN * SLAB / 16; idx += T)
            *reinterpret_cast<Vec16*>(wg0 + idx * 16) = Vec16{{0u, 0u, 0u, 0u}};
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
    {
        if (s < KT)
            load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt)
    {
        cp_async_wait<STAGES - 2>();
        __syncthreads(); // stage kt landed for every thread; stage kt - 1 is free
        const char* sa = smem + (kt % STAGES) * STAGE;
        const char* sb = sa + STAGE_A;
        if (U > 0)
            capture(kt, sb);
        if (kt + STAGES - 1 < KT)
            load_stage(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);
        cp_async_commit();
#pragma unroll
        for (int ks = 0; ks < 2; ++ks)
        {
            uint32_t af[MI][4], bf[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
            {
                const int r = wm * WTM + mi * 16 + g;
                const int kb = ks * 32 + 4 * q;
                af[mi][0] = lds32<RBA>(sa, r, kb);
                af[mi][1] = lds32<RBA>(sa, r + 8, kb);
                af[mi][2] = lds32<RBA>(sa, r, kb + 16);
                af[mi][3] = lds32<RBA>(sa, r + 8, kb + 16);
            }
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
            {
                const int n = wn * WTN + ni * 8 + g;
                if (kW4)
                {
                    bf[ni][0] = expand_s4x4(lds16<RBB>(sb, n, ks * 16 + 2 * q));
                    bf[ni][1] = expand_s4x4(lds16<RBB>(sb, n, ks * 16 + 8 + 2 * q));
                }
                else
                {
                    bf[ni][0] = lds32<RBB>(sb, n, ks * 32 + 4 * q);
                    bf[ni][1] = lds32<RBB>(sb, n, ks * 32 + 16 + 4 * q);
                }
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
                {
                    if (kS4)
                        mma_s4_m16n8k64(acc[mi][ni], af[mi], bf[ni]);
                    else
                        mma_s8_m16n8k32(acc[mi][ni], af[mi], bf[ni]);
                }
        }
    }
    cp_async_wait<0>();
    __syncthreads(); // every stage consumed: the main buffer is free for the outlier slabs

    // ---- the outlier term: chunks of kUnionChunk union channels as extra K-slabs into acc_o
    constexpr int SUB = T >= BM ? T / BM : 1; // threads per row of the A slab
    const int nch = (U + kUnionChunk - 1) / kUnionChunk;
    for (int ch = 0; ch < nch; ++ch)
    {
        char* slab = smem;
        char* wgx = smem + BM * SLAB;
        const char* wg = ch == 0 ? wg0 : wgx;
        for (int idx = tid; idx < BM * SLAB / 16; idx += T)
            *reinterpret_cast<Vec16*>(slab + idx * 16) = Vec16{{0u, 0u, 0u, 0u}};
        if (ch > 0)
            for (int idx = tid; idx < BN * SLAB / 16; idx += T)
                *reinterpret_cast<Vec16*>(wgx + idx * 16) = Vec16{{0u, 0u, 0u, 0u}};
        __syncthreads();
        const int u_lo = ch * kUnionChunk;
        const int u_here = min(U - u_lo, kUnionChunk);
        if (ch > 0)
        {
            // W rows of union ranks [u_lo, u_lo + u_here) gathered from global memory (rare: > 64 channels)
            for (int e = tid; e < u_here * BN; e += T)
            {
                const int n = e % BN, r = u_lo + e / BN;
                int lo = 0, hi = nwords - 1; // last word whose prefix <= r
                while (lo < hi)
                {
                    const int mid = (lo + hi + 1) / 2;
                    if (prefix[mid] <= r)
                        lo = mid;
                    else
                        hi = mid - 1;
                }
                uint32_t bits = bitmap[lo];
                for (int b = r - prefix[lo]; b > 0; --b)
                    bits &= bits - 1u;
                const int c = lo * 32 + __ffs(static_cast<int>(bits)) - 1;
                const int v = n0 + n < N ? w_code(d.w, d.w_bits, K, n0 + n, c) : 0;
                if (kF16Out)
                    *reinterpret_cast<__half*>(wgx + soff<SLAB>(n, 2 * (r - u_lo))) = __float2half_rn(static_cast<float>(v));
                else
                    wgx[soff<SLAB>(n, r - u_lo)] = static_cast<char>(v);
            }
        }
        // A slab: each row's compacted outlier codes at their union rank
        for (int e = tid; e < BM * SUB; e += T)
        {
            const int r = e / SUB, part = e % SUB;
            const int m = m0 + r;
            if (m >= M)
                continue;
            const int t = m % d.L;
            const int bw = (m / d.L) * d.W + t / d.n_refresh;
            const int i = t % d.n_refresh;
            const int cnt = d.count[bw];
            if (cnt > maxO)
                continue;
            const size_t base = static_cast<size_t>(bw) * maxO;
            for (int s = part; s < cnt; s += SUB)
            {
                if (d.slot_first[base + s] > i)
                    continue;
                const int j = rank(d.slot_chan[base + s]) - u_lo;
                if (j < 0 || j >= kUnionChunk)
                    continue;
                const size_t o = static_cast<size_t>(m) * maxO + s;
                if (kF16Out)
                    *reinterpret_cast<__half*>(slab + soff<SLAB>(r, 2 * j)) = static_cast<const __half*>(d.a_out)[o];
                else
                    slab[soff<SLAB>(r, j)] = static_cast<const char*>(d.a_out)[o];
            }
        }
        __syncthreads();
        constexpr int kStepK = kF16Out ? 16 : 32; // union channels per mma
        const int nks = (u_here + kStepK - 1) / kStepK;
        for (int ks = 0; ks < nks; ++ks)
        {
            uint32_t af[MI][4], bf[NI][2];
            const int kb = ks * 32 + 4 * q; // both: 32 bytes per k-step
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
            {
                const int r = wm * WTM + mi * 16 + g;
                af[mi][0] = lds32<SLAB>(slab, r, kb);
                af[mi][1] = lds32<SLAB>(slab, r + 8, kb);
                af[mi][2] = lds32<SLAB>(slab, r, kb + 16);
                af[mi][3] = lds32<SLAB>(slab, r + 8, kb + 16);
            }
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
            {
                const int n = wn * WTN + ni * 8 + g;
                bf[ni][0] = lds32<SLAB>(wg, n, kb);
                bf[ni][1] = lds32<SLAB>(wg, n, kb + 16);
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
                {
                    if constexpr (kF16Out)
                        mma_f16_m16n8k16(acc_o[mi][ni], af[mi], bf[ni]);
                    else
                        mma_s8_m16n8k32(acc_o[mi][ni], af[mi], bf[ni]);
                }
        }
        __syncthreads(); // the next chunk overwrites the slabs
    }

    // ---- epilogue: y written once
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h)
        {
            const int m = m0 + wm * WTM + mi * 16 + g + 8 * h;
            if (m >= M)
                continue;
            const int t = m % d.L;
            const bool bad = d.count[(m / d.L) * d.W + t / d.n_refresh] > maxO;
            const float s_in = d.s_in[t];
            const float s_o = d.s_out[m];
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int e2 = 0; e2 < 2; ++e2)
                {
                    const int n = n0 + wn * WTN + ni * 8 + 2 * q + e2;
                    if (n >= N)
                        continue;
                    const int ai = acc[mi][ni][2 * h + e2];
                    const AccOut ao = acc_o[mi][ni][2 * h + e2];
                    const float sw = d.w_scale[n];
                    const float aof = kF16Out ? static_cast<float>(ao) : __int2float_rn(static_cast<int>(ao));
                    float y = __fadd_rn(__fmul_rn(__int2float_rn(ai), __fmul_rn(s_in, sw)),
                                        __fmul_rn(aof, __fmul_rn(s_o, sw)));
                    if (d.bias)
                        y = __fadd_rn(y, d.bias[n]);
                    if (bad)
                        y = __int_as_float(0x7fc00000);
                    const size_t o = static_cast<size_t>(m) * N + n;
                    store_f(d.y, d.y_is_fp32, o, y);
                    if (d.dbg_acc_in)
                        d.dbg_acc_in[o] = ai;
                    if (d.dbg_acc_out && !kF16Out)
                        d.dbg_acc_out[o] = static_cast<int>(ao);
                }
        }
}

// ------------------------------------------------------------------ launch helpers
// Shared memory above 48 KB needs an opt-in per kernel and device (allow_dynamic_smem: once).
template <typename Kernel>
inline ouroStatus_t launch_with_smem(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                     const GemmArgs& a)
{
    if (!allow_dynamic_smem(kernel, smem))
        return OURO_ERR_UNSUPPORTED_SHAPE;
    launch_kernel(kernel, grid, block, smem, stream, a);
    return launch_status();
}

template <int kOp, bool kF16Out, int kTile>
ouroStatus_t launch_tile(const GemmArgs& a, cudaStream_t stream)
{
    constexpr TileShape t = kTiles[kTile];
    const dim3 grid(static_cast<unsigned>(ceil_div(a.N, t.bn)), static_cast<unsigned>(ceil_div(a.M, t.bm)));
    if (grid.y > 65535u)
        return OURO_ERR_UNSUPPORTED_SHAPE;
    return launch_with_smem(fused_gemm_kernel<kOp, kF16Out, t.bm, t.bn, t.warps_m, t.warps_n, t.stages>, grid,
                            dim3(gemm_threads(t)), gemm_smem_bytes(kOp, kF16Out, t, a.K), stream, a);
}

template <int kOp, bool kF16Out>
ouroStatus_t launch_any_tile(const GemmArgs& a, int tile, cudaStream_t stream)
{
    static_assert(kNumTiles == 5, "one case per tile");
    switch (tile)
    {
    case 0: return launch_tile<kOp, kF16Out, 0>(a, stream);
    case 1: return launch_tile<kOp, kF16Out, 1>(a, stream);
    case 2: return launch_tile<kOp, kF16Out, 2>(a, stream);
    case 3: return launch_tile<kOp, kF16Out, 3>(a, stream);
    case 4: return launch_tile<kOp, kF16Out, 4>(a, stream);
    }
    return OURO_ERR_INVALID_ARGUMENT;
}

} // namespace fused
} // namespace ouro
