// One-pass OuroMamba outlier detection of one (image, window) (spec: ouro.calib.quantizers.outlier_quant_ref),
// shared by the outlier-split linear's activation prep and the selective scan's operand statistics.
//
// One thread block per window. Each row of x is read from global memory exactly once: rows are prefetched
// with cp.async into a ring of shared-memory row buffers (so the next rows are in flight while this one is
// processed), and everything else reads the row from shared memory. Per token i (t = t0 + i, row m):
//   1. one pass over the row: a = |x| with the current outliers zeroed; max(a), sum(a), sum(a^2), and the max
//      of |x| over the current outliers; ONE block reduction of those four values;
//   2. trig = max(a)/qmax_I > S_I(t); theta = mean + k*std (std from the sums, divided by
//      max(C - std_correction, 1)) or theta(t); new outliers exist iff trig and max(a) > theta;
//   3. if any: the channels with |x| > theta join the list at position i (slots in join order, numbered by a
//      block scan);
//   4. S_O = max(old-outlier max, max(a) if new outliers joined) / qmax_O: no second reduction, because the
//      largest new outlier is max(a) itself;
//   5. the caller's Emit writes what it needs for row m from the shared-memory row (codes, scales).
// Statistics: per-thread partial sums in fp32 (a few elements each), combined across threads in fp64 and
// rounded once to fp32; PyTorch reduces in fp32, so a channel within a few ulp of theta is the only possible
// disagreement (documented in KERNELS.md).
#pragma once

#include "mma.cuh"
#include "outlier_quant.cuh"

#include <type_traits>

namespace ouro
{

constexpr int kPrepMaxThreads = 256;
constexpr int kPrepRingBytes = 32768; // shared memory for the prefetched rows of x
constexpr int kPrepMaxRing = 8;

struct RowStats
{
    float amax_a;   // max |x| over channels not yet in the list
    float amax_old; // max |x| over channels already in the list
    double sum;     // sum of a
    double sumsq;   // sum of a^2
};

__device__ inline RowStats combine(RowStats a, const RowStats& b)
{
    a.amax_a = fmaxf(a.amax_a, b.amax_a);
    a.amax_old = fmaxf(a.amax_old, b.amax_old);
    a.sum += b.sum;
    a.sumsq += b.sumsq;
    return a;
}

// Block-wide reduction of RowStats (fixed order: deterministic); every thread gets the result.
__device__ inline RowStats block_reduce_stats(RowStats v, RowStats* red)
{
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
    {
        RowStats other;
        other.amax_a = __shfl_xor_sync(0xffffffffu, v.amax_a, o);
        other.amax_old = __shfl_xor_sync(0xffffffffu, v.amax_old, o);
        other.sum = __shfl_xor_sync(0xffffffffu, v.sum, o);
        other.sumsq = __shfl_xor_sync(0xffffffffu, v.sumsq, o);
        v = combine(v, other);
    }
    __syncthreads(); // `red` may still be read by the previous call
    if (lane == 0)
        red[warp] = v;
    __syncthreads();
    RowStats r = red[0];
    for (int w = 1; w < nw; ++w)
        r = combine(r, red[w]);
    return r;
}

struct TokenDecision
{
    bool any_new; // channels join the list at this token
    float theta;  // threshold (valid when any_new)
    float s_out;  // dynamic outlier scale S_O of this row (1 for fp16 outliers or no outliers)
};

__device__ inline TokenDecision decide(const RowStats& r, int C, const ouroActQuant_t& q, int t)
{
    TokenDecision dec{false, 0.f, 1.f};
    const float qi = static_cast<float>(qmax_of(q.bits));
    const bool trig = __fdiv_rn(r.amax_a, qi) > q.scale[t];
    if (trig)
    {
        if (q.policy == OURO_POLICY_DYNAMIC)
        {
            const double mean = r.sum / static_cast<double>(C);
            const double ss = fmax(r.sumsq - r.sum * mean, 0.0); // sum (a - mean)^2
            const float meanf = static_cast<float>(mean);
            const float stdf = static_cast<float>(sqrt(ss / std_divisor(C, q.std_correction)));
            dec.theta = __fadd_rn(meanf, __fmul_rn(q.k_sigma, stdf));
        }
        else
        {
            dec.theta = q.theta[t];
        }
        dec.any_new = r.amax_a > dec.theta;
    }
    dec.s_out = outlier_scale(fmaxf(r.amax_old, dec.any_new ? r.amax_a : 0.f), q.bits_outlier);
    return dec;
}

template <typename XT>
__device__ __forceinline__ float to_f(XT v)
{
    if constexpr (std::is_same<XT, float>::value)
        return v;
    else
        return __half2float(v);
}

// Host side: threads per prep block (one thread per 8 channels, whole warps, at most 256) and ring depth.
inline int prep_threads(int C)
{
    const int chunks = (C + 7) / 8;
    const int t = (chunks + 31) / 32 * 32;
    return t < 32 ? 32 : (t > kPrepMaxThreads ? kPrepMaxThreads : t);
}
inline int prep_ring(int C, int x_bytes, int n_refresh)
{
    int r = kPrepRingBytes / (C * x_bytes);
    r = r > kPrepMaxRing ? kPrepMaxRing : r;
    r = r > n_refresh ? n_refresh : r;
    return r < 2 ? 2 : r;
}
// Dynamic shared memory of a prep block: the ring of rows, then first[C] (uint16).
inline size_t prep_smem_bytes(int C, int x_bytes, int ring)
{
    return align_up(static_cast<size_t>(ring) * C * x_bytes, 16) + static_cast<size_t>(C) * sizeof(uint16_t);
}

struct PrepShared
{
    RowStats red[32];
    int scan[33];
};

// The first[C] list of a prep block (after the ring of rows in its dynamic shared memory).
template <typename XT>
__device__ __forceinline__ uint16_t* prep_first(char* smem, int ring, int C)
{
    return reinterpret_cast<uint16_t*>(smem + align_up(static_cast<size_t>(ring) * C * sizeof(XT), 16));
}

// Runs the detection over the window wp of x [rows, C]. kVec: C % 8 == 0 and 16-byte aligned rows (cp.async
// prefetch, 8 channels per thread step); otherwise plain loads, one channel per step. smem: the dynamic shared
// memory (prep_smem_bytes). emit(i, m, t, xs, first, dec, count) is called by every thread for each token after
// the list is updated (xs: the row in shared memory; first[c] = join position or kNever); on_new(c, slot, i) is
// called by the thread owning channel c for each channel joining the list. Returns the final list length
// (uniform); first[] (prep_first) then holds every channel's join position. Ends with a barrier.
template <typename XT, bool kVec = true, typename Emit, typename OnNew>
__device__ int prep_window(const XT* __restrict__ x, int C, const WindowPos& wp, const ouroActQuant_t& q, int ring,
                           char* smem, PrepShared& sh, Emit&& emit, OnNew&& on_new)
{
    static_assert(sizeof(XT) == 2 || sizeof(XT) == 4, "fp16 or fp32 rows");
    constexpr int kPerVec = 16 / sizeof(XT); // elements per 16-byte copy
    constexpr int E = kVec ? 8 : 1;          // channels per thread step
    XT* rows = reinterpret_cast<XT*>(smem);
    uint16_t* first = prep_first<XT>(smem, ring, C);
    const int T = blockDim.x;
    for (int c = threadIdx.x; c < C; c += T)
        first[c] = kNever;

    auto load_row = [&](int i) {
        if (i < wp.nt)
        {
            const XT* src = x + (wp.row0 + i) * static_cast<size_t>(C);
            XT* dst = rows + static_cast<size_t>(i % ring) * C;
            if (kVec)
                for (int v = threadIdx.x; v < C / kPerVec; v += T)
                    cp_async_16(dst + v * kPerVec, src + v * kPerVec, 16);
            else
                for (int c = threadIdx.x; c < C; c += T)
                    dst[c] = src[c]; // read after the barrier that precedes the row's turn
        }
        cp_async_commit(); // one group per row, empty past the window: uniform group counting
    };
    for (int i = 0; i < ring - 1; ++i)
        load_row(i);

    int count = 0;
    for (int i = 0; i < wp.nt; ++i)
    {
        // ring-1+i groups are committed and row i is group i: wait until at most ring-2 are in flight.
        switch (ring)
        {
        case 2: cp_async_wait<0>(); break;
        case 3: cp_async_wait<1>(); break;
        case 4: cp_async_wait<2>(); break;
        case 5: cp_async_wait<3>(); break;
        case 6: cp_async_wait<4>(); break;
        case 7: cp_async_wait<5>(); break;
        default: cp_async_wait<6>(); break;
        }
        __syncthreads(); // row i visible to all threads; buffer (i - 1) % ring free
        load_row(i + ring - 1);
        const XT* xs = rows + static_cast<size_t>(i % ring) * C;
        const int t = wp.t0 + i;
        const size_t m = wp.row0 + i;

        // 1. statistics, one pass (8 channels per thread step; fp32 partials)
        float amax_a = 0.f, amax_old = 0.f, sum = 0.f, sumsq = 0.f;
        for (int c0 = threadIdx.x * E; c0 < C; c0 += T * E)
        {
#pragma unroll
            for (int e = 0; e < E; ++e)
            {
                const int c = c0 + e;
                const float av = fabsf(to_f(xs[c]));
                const bool old = first[c] != kNever;
                const float a = old ? 0.f : av;
                amax_a = fmaxf(amax_a, a);
                amax_old = fmaxf(amax_old, old ? av : 0.f);
                sum = __fadd_rn(sum, a);
                sumsq = __fadd_rn(sumsq, __fmul_rn(a, a));
            }
        }
        const RowStats st = block_reduce_stats(RowStats{amax_a, amax_old, sum, sumsq}, sh.red);
        const TokenDecision dec = decide(st, C, q, t);

        // 3. new outliers (uniform branch)
        if (dec.any_new)
        {
            int mine = 0;
            for (int c0 = threadIdx.x * E; c0 < C; c0 += T * E)
#pragma unroll
                for (int e = 0; e < E; ++e)
                    mine += first[c0 + e] == kNever && fabsf(to_f(xs[c0 + e])) > dec.theta;
            int total = 0;
            int slot = count + block_exclusive_scan(mine, sh.scan, &total);
            for (int c0 = threadIdx.x * E; c0 < C; c0 += T * E)
#pragma unroll
                for (int e = 0; e < E; ++e)
                {
                    const int c = c0 + e;
                    if (first[c] == kNever && fabsf(to_f(xs[c])) > dec.theta)
                    {
                        first[c] = static_cast<uint16_t>(i);
                        on_new(c, slot++, i);
                    }
                }
            count += total;
            __syncthreads(); // first[] and whatever on_new wrote visible to the block
        }
        emit(i, m, t, xs, first, dec, count);
        __syncthreads(); // row i's buffer may be refilled after this
    }
    cp_async_wait<0>();
    return count;
}

} // namespace ouro
