// Selective scan (Mamba-1 S6), token-major (B, L, D), fp32 state. Spec: ouro.calib.scan.selective_scan_ref.
//
// Kernel layout (selective_scan_kernel<XT, kSPL, kTGQ>): a block handles one image b and 32 channels d;
// each channel is spread over 4 lanes, each lane owning kSPL = ceil(S / 4) states (S <= 16), so one block is
// 128 threads and a warp runs 8 channels. Time is processed in chunks of kChunk = 32 steps:
//   1. the raw u, delta, z (32 channels) and B, C (S values) of the next chunk are prefetched with cp.async
//      into the other half of a double buffer while this chunk is computed;
//   2. one cooperative pass turns this chunk's raw delta into dt = softplus(fake-quant(delta)) and its B, C into
//      their fake-quantized values (OuroMamba, from the operand statistics of kernel 1): each element is
//      computed once per block, not once per lane, and no fp32 copy of delta goes through global memory;
//   3. each lane runs the recurrence of its states over sub-chunks of 8 steps with compile-time loops (dtype,
//      states per lane and TGQ are template parameters: no runtime branches inside), keeping the partial
//      products h_s * C_s of each step in registers;
//   4. a 2-stage butterfly over the 4 lanes reduces the 8 partial sums (6 shuffles per 8 steps instead of 2 per
//      step), then y = sum + u * Dskip, y *= silu(z), staged in shared memory and stored coalesced.
// Per step and state the arithmetic is the reference's: h = exp(dt * A) * h + (dt * B) * u (two roundings, no
// FMA), then TGQ (group = step index in scan order / h_group). Only the order of the sum over the S states
// differs (four partial sums, then the butterfly): within the tests' SCAN_RTOL.
//
// Kernel 0 (operand_stats_kernel): for each quantized operand (delta over D channels, B and C over S), the
// OuroMamba detection of every (image, window) (window_prep.cuh, one pass over the rows) writes the join
// position of every channel (first[bw][c], uint16) and S_O of every row: a few bytes per token instead of an
// fp32 copy of the operand.
#pragma once

#include "window_prep.cuh"

namespace ouro
{
namespace scan
{

constexpr int kChunk = 32;      // time steps per chunk
constexpr int kChannels = 32;   // channels d per block
constexpr int kLanes = 4;       // lanes per channel
constexpr int kThreads = kChannels * kLanes;
constexpr int kSub = 8;         // steps per butterfly (6 shuffles per lane per 8 steps)

// Fake quantization of one operand, from kernel 0's statistics (bits == 0: the operand is not quantized).
struct OperandQuant
{
    ouroActQuant_t q;
    const uint16_t* first; // [BW, C] join position of channel c in window bw (kNever: never)
    const float* s_out;    // [B * L] dynamic outlier scale of each row
    int W;                 // windows per image, ceil(L / q.n_refresh)
};

struct ScanArgs
{
    int B, L, D, S, reverse, softplus;
    const void* u;
    const void* delta;
    const float* A;
    const void* Bm;
    const void* Cm;
    const float* Dskip;
    const void* z;
    void* out;
    OperandQuant dq, bq, cq;
    int h_bits, h_group;
    const float* h_scale;
    const float* h_zero;
    int async_rows; // rows of u/delta/z/B/C are 16-byte multiples and 16-byte aligned: cp.async staging
};

// QMamba TGQ fake quantization of one state value (ouro.calib.scan.TemporalGroupQuant).
__device__ __forceinline__ float tgq_fake_quant(float h, float scale, float zero, int bits)
{
    if (bits >= 16)
        return __half2float(__float2half_rn(h));
    const float z = rintf(zero);
    const float hi = static_cast<float>((1 << bits) - 1);
    const float code = fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(h, scale)), z), 0.f), hi);
    return __fmul_rn(__fsub_rn(code, z), scale);
}

// Fake-quantized value of operand element (row m = b*L + t, channel c) (identity when not quantized).
__device__ __forceinline__ float operand_value(const OperandQuant& oq, float x, int b, int t, int c, int C, int L)
{
    if (oq.q.bits == 0)
        return x;
    const int n = oq.q.n_refresh;
    const int bw = b * oq.W + t / n;
    const bool outlier = oq.first[static_cast<size_t>(bw) * C + c] <= t % n;
    const float qi = static_cast<float>(qmax_of(oq.q.bits));
    return fake_quant_value(x, outlier, oq.q.scale[t], qi, oq.s_out[static_cast<size_t>(b) * L + t], oq.q.bits_outlier);
}

// ------------------------------------------------------------------ kernel 0: operand statistics
struct StatsArgs
{
    int L, C;
    ouroActQuant_t q;
    const void* x;   // [B, L, C]
    uint16_t* first; // [BW, C]
    float* s_out;    // [B * L]
    int ring;
};

template <typename XT, bool kVec>
__global__ void __launch_bounds__(kPrepMaxThreads) operand_stats_kernel(StatsArgs d)
{
    OURO_DYN_SMEM(Vec16, smem_v);
    char* smem = reinterpret_cast<char*>(smem_v);
    __shared__ PrepShared sh;
    const int bw = blockIdx.x;
    const WindowPos wp = window_of(bw, d.L, d.q.n_refresh);
    auto emit = [&](int, size_t m, int, const XT*, const uint16_t*, const TokenDecision& dec, int) {
        if (threadIdx.x == 0)
            d.s_out[m] = dec.s_out;
    };
    auto on_new = [](int, int, int) {};
    prep_window<XT, kVec>(static_cast<const XT*>(d.x), d.C, wp, d.q, d.ring, smem, sh, emit, on_new);
    const uint16_t* first = prep_first<XT>(smem, d.ring, d.C);
    for (int c = threadIdx.x; c < d.C; c += blockDim.x)
        d.first[static_cast<size_t>(bw) * d.C + c] = first[c];
}

// ------------------------------------------------------------------ kernel 1: the scan
template <typename XT>
struct alignas(16) ChunkSmem // 16-byte aligned: cp.async targets
{
    XT u[2][kChunk][kChannels];
    XT delta[2][kChunk][kChannels];
    XT z[2][kChunk][kChannels];
    XT b[2][kChunk][kMaxState];
    XT c[2][kChunk][kMaxState];
    float dt[kChunk][kChannels];
    float bq[kChunk][kMaxState];
    float cq[kChunk][kMaxState];
    XT out[kChunk][kChannels];
};

// grid = (ceil(D / 32), B), block = 128. kSPL states per lane (S <= 4 * kSPL). p.async_rows: 16-byte cp.async
// staging (rows 16-byte aligned), else plain loads (a uniform branch outside the recurrence).
template <typename XT, int kSPL, bool kTGQ>
__global__ void __launch_bounds__(kThreads) selective_scan_kernel(ScanArgs p)
{
    __shared__ ChunkSmem<XT> sm;
    const int tid = threadIdx.x;
    const int cl = tid / kLanes;  // channel within the block
    const int lane4 = tid % kLanes;
    const int d0 = blockIdx.x * kChannels;
    const int d = d0 + cl;
    const int b = blockIdx.y;
    const int L = p.L, D = p.D, S = p.S;
    const bool dvalid = d < D;
    constexpr int kVecX = 16 / static_cast<int>(sizeof(XT)); // elements per 16-byte copy

    float a[kSPL], h[kSPL];
#pragma unroll
    for (int j = 0; j < kSPL; ++j)
    {
        const int s = lane4 * kSPL + j;
        a[j] = (dvalid && s < S) ? p.A[static_cast<size_t>(d) * S + s] : 0.f;
        h[j] = 0.f;
    }
    const float dskip = (p.Dskip && dvalid) ? p.Dskip[d] : 0.f;

    const int nchunks = (L + kChunk - 1) / kChunk;
    // Stage the raw inputs of chunk ci into buffer buf (step i of the chunk = token t(i) in scan order).
    auto stage = [&](int ci, int buf) {
        const int i0 = ci * kChunk;
        const XT* U = static_cast<const XT*>(p.u);
        const XT* Dl = static_cast<const XT*>(p.delta);
        const XT* Z = static_cast<const XT*>(p.z);
        const XT* Bm = static_cast<const XT*>(p.Bm);
        const XT* Cm = static_cast<const XT*>(p.Cm);
        if (p.async_rows)
        {
            constexpr int kVecRow = kChannels / kVecX; // 16-byte pieces per row of 32 channels
            for (int e = tid; e < kChunk * kVecRow; e += kThreads)
            {
                const int j = e / kVecRow, v = e % kVecRow;
                const int i = i0 + j;
                const int t = p.reverse ? L - 1 - i : i;
                const int dd = d0 + v * kVecX;
                const bool ok = i < L && dd < D;
                const size_t off = (static_cast<size_t>(b) * L + (ok ? t : 0)) * D + (ok ? dd : 0);
                cp_async_16(&sm.u[buf][j][v * kVecX], U + off, ok ? 16 : 0);
                cp_async_16(&sm.delta[buf][j][v * kVecX], Dl + off, ok ? 16 : 0);
                if (Z)
                    cp_async_16(&sm.z[buf][j][v * kVecX], Z + off, ok ? 16 : 0);
            }
            const int vs = (S + kVecX - 1) / kVecX; // S * sizeof(XT) % 16 == 0 on this path
            for (int e = tid; e < kChunk * vs; e += kThreads)
            {
                const int j = e / vs, v = e % vs;
                const int i = i0 + j;
                const int t = p.reverse ? L - 1 - i : i;
                const bool ok = i < L;
                const size_t off = (static_cast<size_t>(b) * L + (ok ? t : 0)) * S + v * kVecX;
                cp_async_16(&sm.b[buf][j][v * kVecX], Bm + off, ok ? 16 : 0);
                cp_async_16(&sm.c[buf][j][v * kVecX], Cm + off, ok ? 16 : 0);
            }
        }
        else
        {
            for (int e = tid; e < kChunk * kChannels; e += kThreads)
            {
                const int j = e / kChannels, c = e % kChannels;
                const int i = i0 + j;
                const int t = p.reverse ? L - 1 - i : i;
                const bool ok = i < L && d0 + c < D;
                const size_t off = (static_cast<size_t>(b) * L + t) * D + d0 + c;
                sm.u[buf][j][c] = ok ? U[off] : XT(0.f);
                sm.delta[buf][j][c] = ok ? Dl[off] : XT(0.f);
                sm.z[buf][j][c] = (ok && Z) ? Z[off] : XT(0.f);
            }
            for (int e = tid; e < kChunk * S; e += kThreads)
            {
                const int j = e / S, s = e % S;
                const int i = i0 + j;
                const int t = p.reverse ? L - 1 - i : i;
                const bool ok = i < L;
                const size_t off = (static_cast<size_t>(b) * L + t) * S + s;
                sm.b[buf][j][s] = ok ? Bm[off] : XT(0.f);
                sm.c[buf][j][s] = ok ? Cm[off] : XT(0.f);
            }
        }
        cp_async_commit();
    };

    stage(0, 0);
    for (int ci = 0; ci < nchunks; ++ci)
    {
        const int buf = ci & 1;
        cp_async_wait<0>();
        __syncthreads(); // chunk ci landed; the previous chunk's buffers and the out staging are free
        if (ci + 1 < nchunks)
            stage(ci + 1, buf ^ 1); // in flight while this chunk is computed
        const int i0 = ci * kChunk;
        const int nsteps = min(kChunk, L - i0);
        // 2. dt, B and C of the chunk, fake-quantized once per block
        for (int e = tid; e < kChunk * kChannels; e += kThreads)
        {
            const int j = e / kChannels, c = e % kChannels;
            float dt = 0.f;
            if (j < nsteps && d0 + c < D)
            {
                const int i = i0 + j;
                const int t = p.reverse ? L - 1 - i : i;
                dt = operand_value(p.dq, to_f(sm.delta[buf][j][c]), b, t, d0 + c, D, L);
                if (p.softplus)
                    dt = dt > 20.f ? dt : log1pf(expf(dt));
            }
            sm.dt[j][c] = dt;
        }
        for (int e = tid; e < kChunk * kMaxState; e += kThreads)
        {
            const int j = e / kMaxState, s = e % kMaxState;
            float bv = 0.f, cv = 0.f;
            if (j < nsteps && s < S)
            {
                const int i = i0 + j;
                const int t = p.reverse ? L - 1 - i : i;
                bv = operand_value(p.bq, to_f(sm.b[buf][j][s]), b, t, s, S, L);
                cv = operand_value(p.cq, to_f(sm.c[buf][j][s]), b, t, s, S, L);
            }
            sm.bq[j][s] = bv;
            sm.cq[j][s] = cv;
        }
        __syncthreads();
        // 3. the recurrence of this lane's states over sub-chunks of kSub steps; part[j] = sum over its states
        // of h * C at step j; 4. a butterfly over the 4 lanes of the channel: lane l ends with the complete sums
        // of steps 4 * (l >> 1) + 2 * (l & 1) + {0, 1} of the sub-chunk
#pragma unroll 1
        for (int j0 = 0; j0 < kChunk; j0 += kSub)
        {
            float part[kSub];
#pragma unroll
            for (int jj = 0; jj < kSub; ++jj)
            {
                const int j = j0 + jj;
                part[jj] = 0.f;
                if (j < nsteps)
                {
                    const float dt = sm.dt[j][cl];
                    const float u = to_f(sm.u[buf][j][cl]);
                    float hs_scale = 1.f, hs_zero = 0.f;
                    if (kTGQ)
                    {
                        const int g = (i0 + j) / p.h_group;
                        hs_scale = p.h_scale[g];
                        hs_zero = p.h_zero[g];
                    }
#pragma unroll
                    for (int k = 0; k < kSPL; ++k)
                    {
                        const int s = lane4 * kSPL + k;
                        const float bv = sm.bq[j][s];
                        const float cv = sm.cq[j][s];
                        const float dA = expf(__fmul_rn(dt, a[k]));
                        const float dBu = __fmul_rn(__fmul_rn(dt, bv), u);
                        float hv = __fadd_rn(__fmul_rn(dA, h[k]), dBu);
                        if (kTGQ)
                            hv = tgq_fake_quant(hv, hs_scale, hs_zero, p.h_bits);
                        h[k] = hv;
                        part[jj] = __fadd_rn(part[jj], __fmul_rn(hv, cv));
                    }
                }
            }
            const bool hi2 = (lane4 >> 1) & 1;
            float half[kSub / 2];
#pragma unroll
            for (int jj = 0; jj < kSub / 2; ++jj)
            {
                const float send = hi2 ? part[jj] : part[jj + kSub / 2];
                const float keep = hi2 ? part[jj + kSub / 2] : part[jj];
                half[jj] = __fadd_rn(keep, __shfl_xor_sync(0xffffffffu, send, 2));
            }
            const bool hi1 = lane4 & 1;
#pragma unroll
            for (int jj = 0; jj < kSub / 4; ++jj)
            {
                const float send = hi1 ? half[jj] : half[jj + kSub / 4];
                const float keep = hi1 ? half[jj + kSub / 4] : half[jj];
                const int j = j0 + (kSub / 2) * (hi2 ? 1 : 0) + (kSub / 4) * (hi1 ? 1 : 0) + jj;
                float y = __fadd_rn(keep, __shfl_xor_sync(0xffffffffu, send, 1));
                const float u = to_f(sm.u[buf][j][cl]);
                if (p.Dskip)
                    y = __fadd_rn(y, __fmul_rn(u, dskip));
                if (p.z)
                {
                    const float zv = to_f(sm.z[buf][j][cl]);
                    y = __fmul_rn(y, __fdiv_rn(zv, __fadd_rn(1.f, expf(-zv))));
                }
                if constexpr (std::is_same<XT, float>::value)
                    sm.out[j][cl] = y;
                else
                    sm.out[j][cl] = __float2half_rn(y);
            }
        }
        __syncthreads();
        // coalesced store of the chunk's outputs
        XT* O = static_cast<XT*>(p.out);
        for (int e = tid; e < kChunk * kChannels; e += kThreads)
        {
            const int j = e / kChannels, c = e % kChannels;
            const int i = i0 + j;
            if (i < L && d0 + c < D)
            {
                const int t = p.reverse ? L - 1 - i : i;
                O[(static_cast<size_t>(b) * L + t) * D + d0 + c] = sm.out[j][c];
            }
        }
    }
    cp_async_wait<0>();
}

} // namespace scan
} // namespace ouro
