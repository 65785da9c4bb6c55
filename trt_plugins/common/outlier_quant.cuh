// OuroMamba dynamic outlier quantizer, device side (spec: ouro.calib.quantizers.outlier_quant_ref).
//
// One thread block handles one (image b, window w): tokens t0 .. t0+nt-1 (t0 = w*n_refresh,
// nt = min(n_refresh, L - t0)), rows row0+i of the [B*L, C] input with row0 = b*L + t0.
// The outlier list of the window is encoded by first[c] = the window position i at which channel c
// joined the list (kNever if it never did); the mask in force at position i is first[c] <= i.
#pragma once

#include "ouro_common.cuh"

namespace ouro
{

// Divisor of the std over C channels: max(C - correction, 1) (correction 0 or 1; 1 = Bessel, like torch.std).
__host__ __device__ __forceinline__ double std_divisor(int C, int correction)
{
    return static_cast<double>(C - correction > 1 ? C - correction : 1);
}

struct WindowPos
{
    int b, w, t0, nt;
    size_t row0;
};

__device__ __forceinline__ WindowPos window_of(int bw, int L, int n_refresh)
{
    const int W = (L + n_refresh - 1) / n_refresh;
    WindowPos p;
    p.b = bw / W;
    p.w = bw % W;
    p.t0 = p.w * n_refresh;
    p.nt = min(n_refresh, L - p.t0);
    p.row0 = static_cast<size_t>(p.b) * L + p.t0;
    return p;
}

// Shared scratch of the detection (static shared memory, 32 entries each).
struct DetectScratch
{
    float redf[32];
    double redd[32];
};

// Sequential mask evolution of one window (reference loop "for i in range(n)"):
//   a = |x| with the current outliers zeroed; trig = max(a)/qmax_I > S_I(t);
//   theta = mean(a) + k*std(a) (over all C channels, std divided by max(C - q.std_correction, 1)) or theta(t);
//   channels with trig && a > theta join the list at position i.
// mean/std are accumulated in double and rounded once to fp32 (the reference's fp32 reductions
// agree to a few ulp; a tie within that distance of theta is the only possible mismatch).
__device__ inline void detect_window(const void* x, int x_is_fp32, const WindowPos& wp, int C, const ouroActQuant_t& q,
                              uint16_t* first, DetectScratch& sc)
{
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        first[c] = kNever;
    __syncthreads();
    const float qi = static_cast<float>(qmax_of(q.bits));
    for (int i = 0; i < wp.nt; ++i)
    {
        const size_t base = (wp.row0 + i) * static_cast<size_t>(C);
        const int t = wp.t0 + i;
        float amax = 0.f;
        double sum = 0.0;
        for (int c = threadIdx.x; c < C; c += blockDim.x)
        {
            const float a = (first[c] < i) ? 0.f : fabsf(load_f(x, x_is_fp32, base + c));
            amax = fmaxf(amax, a);
            sum += static_cast<double>(a);
        }
        amax = block_reduce(amax, sc.redf, MaxOp(), 0.f);
        const bool trig = __fdiv_rn(amax, qi) > q.scale[t]; // uniform over the block
        if (trig)
        {
            float th;
            if (q.policy == OURO_POLICY_DYNAMIC)
            {
                sum = block_reduce(sum, sc.redd, SumOp(), 0.0);
                const double mean = sum / static_cast<double>(C);
                double ss = 0.0;
                for (int c = threadIdx.x; c < C; c += blockDim.x)
                {
                    const float a = (first[c] < i) ? 0.f : fabsf(load_f(x, x_is_fp32, base + c));
                    const double d = static_cast<double>(a) - mean;
                    ss += d * d;
                }
                ss = block_reduce(ss, sc.redd, SumOp(), 0.0);
                const float meanf = static_cast<float>(mean);
                const float stdf = static_cast<float>(sqrt(ss / std_divisor(C, q.std_correction)));
                th = __fadd_rn(meanf, __fmul_rn(q.k_sigma, stdf));
            }
            else
            {
                th = q.theta[t];
            }
            for (int c = threadIdx.x; c < C; c += blockDim.x)
            {
                if (first[c] == kNever && fabsf(load_f(x, x_is_fp32, base + c)) > th)
                    first[c] = static_cast<uint16_t>(i);
            }
        }
        __syncthreads();
    }
}

// Dynamic outlier scale of row i: S_O = max_{mask} |x| / qmax_O (1 if that max is 0, or fp16 outliers).
__device__ __forceinline__ float outlier_scale(float amax_masked, int bits_outlier)
{
    if (bits_outlier >= 16)
        return 1.f;
    return amax_masked > 0.f ? __fdiv_rn(amax_masked, static_cast<float>(qmax_of(bits_outlier))) : 1.f;
}

// Fake-quantized value of one element (x_hat = I_hat + O_hat, exactly one of them non-zero).
__device__ __forceinline__ float fake_quant_value(float x, bool outlier, float s_in, float qi, float s_out,
                                                  int bits_outlier)
{
    if (!outlier)
        return __fmul_rn(quant_code(x, s_in, qi), s_in);
    if (bits_outlier >= 16)
        return __half2float(__float2half_rn(x));
    return __fmul_rn(quant_code(x, s_out, static_cast<float>(qmax_of(bits_outlier))), s_out);
}

} // namespace ouro
