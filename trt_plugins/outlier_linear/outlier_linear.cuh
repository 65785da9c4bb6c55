// Outlier-split linear, device kernels of the five-kernel SEPARATE epilogue, the exact checkable variant (host
// side: outlier_linear.cu; the fused variant: fused_gemm.cuh).
//
//   Y[M, N] = X[M, K] W[N, K]^T,  row m = token t = m % L of image b = m / L,
//   windows of n_refresh tokens per image, BW = B * ceil(L / n_refresh) windows in all.
//
// Workspace buffers (see LinearWorkspace in outlier_linear.cu):
//   a_in        inlier codes: int8 [M, K], or packed int4 [M, K/2] on the native s4 path
//   w8          int8 [N, K] copy of a 4-bit weight, for the INT8 tensor-core path
//   acc_in      int32 [M, N] inlier accumulators (GEMM output)
//   acc_out     int32 [M, N] outlier accumulators (fp32 for fp16 outliers); rows of windows without
//               outliers are not written (the combine step uses 0 there)
//   a_out       outlier codes, compacted along K: int8 [M, max_outliers] (fp16 for bits_outlier 16); only
//               the window's count slots of a row are written (the outlier GEMM reads no more)
//   s_out       fp32 [M] dynamic outlier scale S_O per token
//   row_s_in    fp32 [M] static inlier scale S_I(t) of each row (the fused epilogue's row vector)
//   slot_chan   int32 [BW, max_outliers]: channel k of each compacted slot (ascending k)
//   slot_first  int32 [BW, max_outliers]: window position at which that channel joined the list
//   count       int32 [BW]: number of outlier channels of the window (may exceed max_outliers)
//   flag        int32 [1]: bit 0 set if any window exceeded max_outliers
#pragma once

#include "gemm.cuh"
#include "outlier_quant.cuh"

#include <type_traits>

namespace ouro
{

struct LinearDev
{
    // problem
    int M, L, K, N, W, n_refresh, max_outliers, w_bits, x_is_fp32, bits_in, bits_out, policy, std_correction;
    float k_sigma;
    const void* x;
    const int8_t* w;
    const float* w_scale;
    const float* bias;
    const float* s_in;  // [L]
    const float* theta; // [L]
    void* y;
    // workspace
    int8_t* a_in;
    int packed_s4; // a_in holds packed int4
    int8_t* w8;
    int32_t* acc_in;
    void* acc_out;
    void* a_out;
    float* s_out;
    float* row_s_in;
    int32_t* slot_chan;
    int32_t* slot_first;
    int32_t* count;
    int32_t* flag;
    int32_t* report; // optional caller flag set on overflow (ouroOutlierLinearConfig_t::overflow_report)
    // debug outputs (may be null)
    int32_t* dbg_acc_in;
    int32_t* dbg_acc_out;
    int8_t* dbg_codes;
    uint8_t* dbg_mask;

    __device__ ouroActQuant_t act() const
    {
        ouroActQuant_t q;
        q.bits = bits_in;
        q.bits_outlier = bits_out;
        q.n_refresh = n_refresh;
        q.policy = policy;
        q.k_sigma = k_sigma;
        q.std_correction = std_correction;
        q.scale = s_in;
        q.theta = theta;
        return q;
    }
};

constexpr int kExtractThreads = 256;

// Step 1: outlier detection + extraction. grid = BW, block = kExtractThreads, dyn smem = K * 2 B.
__global__ void __launch_bounds__(kExtractThreads) outlier_extract_kernel(LinearDev d)
{
    OURO_DYN_SMEM(uint16_t, first);
    __shared__ DetectScratch sc;
    __shared__ int scan[kExtractThreads + 1];
    const int bw = blockIdx.x;
    const WindowPos wp = window_of(bw, d.L, d.n_refresh);
    const int K = d.K;
    const int maxO = d.max_outliers;
    detect_window(d.x, d.x_is_fp32, wp, K, d.act(), first, sc);

    // Compaction: slots in ascending channel order; thread j owns channels [c0, c1).
    const int chunk = (K + blockDim.x - 1) / blockDim.x;
    const int c0 = min(K, static_cast<int>(threadIdx.x) * chunk);
    const int c1 = min(K, c0 + chunk);
    int mine = 0;
    for (int c = c0; c < c1; ++c)
        mine += first[c] != kNever;
    scan[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0)
    {
        int run = 0;
        for (int j = 0; j < static_cast<int>(blockDim.x); ++j)
        {
            const int v = scan[j];
            scan[j] = run;
            run += v;
        }
        scan[blockDim.x] = run;
    }
    __syncthreads();
    const int base = scan[threadIdx.x];
    const int total = scan[blockDim.x];
    {
        int slot = base;
        for (int c = c0; c < c1; ++c)
        {
            if (first[c] == kNever)
                continue;
            if (slot < maxO)
            {
                d.slot_chan[static_cast<size_t>(bw) * maxO + slot] = c;
                d.slot_first[static_cast<size_t>(bw) * maxO + slot] = first[c];
            }
            ++slot;
        }
    }
    if (threadIdx.x == 0)
    {
        d.count[bw] = total;
        if (total > maxO)
        {
            atomicOr(d.flag, 1);
            if (d.report)
                *reinterpret_cast<volatile int32_t*>(d.report) = 1;
        }
    }

    // Extraction: per token, dynamic scale over the active outliers, codes into the compacted buffer.
    const bool fp16_out = d.bits_out >= 16;
    const float qo = fp16_out ? 0.f : static_cast<float>(qmax_of(d.bits_out));
    for (int i = 0; i < wp.nt; ++i)
    {
        const size_t m = wp.row0 + i;
        const size_t xrow = m * static_cast<size_t>(K);
        float amax = 0.f;
        for (int c = c0; c < c1; ++c)
            if (first[c] <= i)
                amax = fmaxf(amax, fabsf(load_f(d.x, d.x_is_fp32, xrow + c)));
        amax = block_reduce(amax, sc.redf, MaxOp(), 0.f);
        const float s_o = outlier_scale(amax, d.bits_out);
        if (threadIdx.x == 0)
            d.s_out[m] = s_o;
        int slot = base;
        for (int c = c0; c < c1; ++c)
        {
            if (first[c] == kNever)
                continue;
            if (slot < maxO)
            {
                const float v = first[c] <= i ? load_f(d.x, d.x_is_fp32, xrow + c) : 0.f;
                const size_t o = m * maxO + slot;
                if (fp16_out)
                    static_cast<__half*>(d.a_out)[o] = __float2half_rn(v);
                else
                    static_cast<int8_t*>(d.a_out)[o] = static_cast<int8_t>(quant_code(v, s_o, qo));
            }
            ++slot;
        }
    }
}

constexpr int kQuantThreads = 256;

// Step 2: inlier quantization of one row per block. dyn smem = 2 * K bytes.
__global__ void __launch_bounds__(kQuantThreads) inlier_quant_kernel(LinearDev d)
{
    OURO_DYN_SMEM(int8_t, smem);
    int8_t* codes = smem;
    uint8_t* maskv = reinterpret_cast<uint8_t*>(smem + d.K);
    const int m = blockIdx.x;
    const int K = d.K;
    const int t = m % d.L;
    const int b = m / d.L;
    const int i = t % d.n_refresh;
    const int bw = b * d.W + t / d.n_refresh;
    const float s = d.s_in[t];
    const float qi = static_cast<float>(qmax_of(d.bits_in));
    if (threadIdx.x == 0)
        d.row_s_in[m] = s;
    const size_t xrow = static_cast<size_t>(m) * K;
    for (int c = threadIdx.x; c < K; c += blockDim.x)
    {
        codes[c] = static_cast<int8_t>(quant_code(load_f(d.x, d.x_is_fp32, xrow + c), s, qi));
        maskv[c] = 0;
    }
    __syncthreads();
    const int cnt = min(d.count[bw], d.max_outliers);
    for (int j = threadIdx.x; j < cnt; j += blockDim.x)
    {
        const size_t o = static_cast<size_t>(bw) * d.max_outliers + j;
        if (d.slot_first[o] <= i)
        {
            const int c = d.slot_chan[o];
            codes[c] = 0;
            maskv[c] = 1;
        }
    }
    __syncthreads();
    if (d.packed_s4)
    {
        uint8_t* out = reinterpret_cast<uint8_t*>(d.a_in) + static_cast<size_t>(m) * (K / 2);
        for (int j = threadIdx.x; j < K / 2; j += blockDim.x)
            out[j] = static_cast<uint8_t>((codes[2 * j] & 0xF) | ((codes[2 * j + 1] & 0xF) << 4));
    }
    else
    {
        for (int c = threadIdx.x; c < K; c += blockDim.x)
            d.a_in[xrow + c] = codes[c];
    }
    if (d.dbg_codes)
        for (int c = threadIdx.x; c < K; c += blockDim.x)
            d.dbg_codes[xrow + c] = codes[c];
    if (d.dbg_mask)
        for (int c = threadIdx.x; c < K; c += blockDim.x)
            d.dbg_mask[xrow + c] = maskv[c];
}

// Step 2 (4-bit weights on the INT8 path): unpack int4 [N, K/2] into int8 [N, K].
__global__ void unpack_w4_kernel(const int8_t* __restrict__ w, int8_t* __restrict__ w8, int N, int K)
{
    const size_t total = static_cast<size_t>(N) * K;
    for (size_t e = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; e < total;
         e += static_cast<size_t>(gridDim.x) * blockDim.x)
    {
        const int n = static_cast<int>(e / K);
        const int k = static_cast<int>(e % K);
        w8[e] = static_cast<int8_t>(w_code(w, 4, K, n, k));
    }
}

constexpr int kOutGemmThreads = 128;

// Step 4: outlier GEMM on the compacted outliers. grid = (BW, ceil(N / 128)), block = 128.
// acc_out[m, n] = sum_j a_out[m, j] * w[n, slot_chan[j]]: int32 for integer outliers (exact); for fp16
// outliers accumulated in float64 and rounded once to fp32, like the reference's float64 einsum.
template <bool kFp16Outliers>
__global__ void __launch_bounds__(kOutGemmThreads) outlier_gemm_kernel(LinearDev d)
{
    using AccT = typename std::conditional<kFp16Outliers, double, int>::type;
    __shared__ int s_chan[kOutGemmThreads];
    __shared__ AccT s_a[kOutGemmThreads];
    const int bw = blockIdx.x;
    const WindowPos wp = window_of(bw, d.L, d.n_refresh);
    const int n = blockIdx.y * kOutGemmThreads + threadIdx.x;
    const int maxO = d.max_outliers;
    const int cnt = min(d.count[bw], maxO);
    if (cnt == 0)
        return; // the combine step reads no accumulator for windows without outliers
    for (int i = 0; i < wp.nt; ++i)
    {
        const size_t m = wp.row0 + i;
        AccT acc = 0;
        for (int j0 = 0; j0 < cnt; j0 += kOutGemmThreads)
        {
            const int jn = min(kOutGemmThreads, cnt - j0);
            if (static_cast<int>(threadIdx.x) < jn)
            {
                const int j = j0 + threadIdx.x;
                s_chan[threadIdx.x] = d.slot_chan[static_cast<size_t>(bw) * maxO + j];
                if (kFp16Outliers)
                    s_a[threadIdx.x] = static_cast<AccT>(__half2float(static_cast<const __half*>(d.a_out)[m * maxO + j]));
                else
                    s_a[threadIdx.x] = static_cast<AccT>(static_cast<const int8_t*>(d.a_out)[m * maxO + j]);
            }
            __syncthreads();
            if (n < d.N)
                for (int jj = 0; jj < jn; ++jj)
                    acc += s_a[jj] * static_cast<AccT>(w_code(d.w, d.w_bits, d.K, n, s_chan[jj]));
            __syncthreads();
        }
        if (n < d.N)
        {
            const size_t o = m * static_cast<size_t>(d.N) + n;
            if (kFp16Outliers)
                static_cast<float*>(d.acc_out)[o] = static_cast<float>(acc);
            else
                static_cast<int32_t*>(d.acc_out)[o] = static_cast<int32_t>(acc);
        }
    }
}

// Step 5: fused dequantization + combination (+ bias), exactly the reference's fp32 expression
//   y = float(acc_in) * (S_I(t) * s_w[n]) + float(acc_out) * (S_O[m] * s_w[n])  (+ bias[n]).
// Rows of a window whose outliers exceeded max_outliers are set to NaN (never silently wrong).
// grid = (ceil(N / 256), min(M, 65535)), block = 256; rows grid-strided over gridDim.y.
constexpr int kCombineThreads = 256;

__global__ void __launch_bounds__(kCombineThreads) combine_kernel(LinearDev d)
{
    const bool fp16_out = d.bits_out >= 16;
    const int n = blockIdx.x * kCombineThreads + threadIdx.x;
    if (n >= d.N)
        return;
    const float sw = d.w_scale[n];
    const float bias = d.bias ? d.bias[n] : 0.f;
    for (int m = blockIdx.y; m < d.M; m += gridDim.y)
    {
        const int t = m % d.L;
        const int bw = (m / d.L) * d.W + t / d.n_refresh;
        const size_t e = static_cast<size_t>(m) * d.N + n;
        const int32_t ai = d.acc_in[e];
        const int cnt = min(d.count[bw], d.max_outliers);
        const int32_t ao_i = (cnt == 0 || fp16_out) ? 0 : static_cast<const int32_t*>(d.acc_out)[e];
        const float ao = fp16_out ? (cnt == 0 ? 0.f : static_cast<const float*>(d.acc_out)[e]) : __int2float_rn(ao_i);
        float y = __fadd_rn(__fmul_rn(__int2float_rn(ai), __fmul_rn(d.s_in[t], sw)),
                            __fmul_rn(ao, __fmul_rn(d.s_out[m], sw)));
        if (d.bias)
            y = __fadd_rn(y, bias);
        if (d.count[bw] > d.max_outliers)
            y = __int_as_float(0x7fc00000); // NaN
        store_f(d.y, d.x_is_fp32, e, y);
        if (d.dbg_acc_in)
            d.dbg_acc_in[e] = ai;
        if (d.dbg_acc_out && !fp16_out)
            d.dbg_acc_out[e] = ao_i;
    }
}

} // namespace ouro
