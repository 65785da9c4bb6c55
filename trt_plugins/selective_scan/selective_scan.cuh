// Selective scan (Mamba-1 S6), token-major (B, L, D), fp32 state in registers.
// Spec: ouro.calib.scan.selective_scan_ref. One thread per (b, d) runs the recurrence over L tokens in
// scan order (t = L-1 .. 0 when reverse), holding h[S] (S <= kMaxState) in registers. Per step:
//   dt = softplus(delta) (threshold 20, like torch) or delta
//   h_s = exp(dt * A[d, s]) * h_s + (dt * B_s) * u          (two roundings, no FMA, like the reference)
//   h_s = TGQ(h_s, group i / h_group)                     (optional, i = step index in scan order)
//   y = sum_s h_s * C_s (s ascending) ; y += u * Dskip ; y *= z / (1 + exp(-z))
#pragma once

#include "ouro_common.cuh"

namespace ouro
{

struct ScanDev
{
    int B, L, D, S, reverse, softplus;
    const void* u;
    int u_fp32;
    const void* delta;
    int delta_fp32;
    const float* A;
    const void* Bm;
    int b_fp32;
    const void* Cm;
    int c_fp32;
    const float* Dskip;
    const void* z;
    int z_fp32;
    void* out;
    int out_fp32;
    int h_bits, h_group;
    const float* h_scale;
    const float* h_zero;
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

constexpr int kScanThreads = 128;

// grid = (ceil(D / 128), B), block = 128.
__global__ void __launch_bounds__(kScanThreads) selective_scan_kernel(ScanDev p)
{
    const int d = blockIdx.x * kScanThreads + threadIdx.x;
    const int b = blockIdx.y;
    if (d >= p.D)
        return;
    const int S = p.S;
    float a[kMaxState];
    float h[kMaxState];
#pragma unroll
    for (int s = 0; s < kMaxState; ++s)
    {
        a[s] = s < S ? p.A[static_cast<size_t>(d) * S + s] : 0.f;
        h[s] = 0.f;
    }
    const float dskip = p.Dskip ? p.Dskip[d] : 0.f;
    for (int i = 0; i < p.L; ++i)
    {
        const int t = p.reverse ? p.L - 1 - i : i;
        const size_t row = static_cast<size_t>(b) * p.L + t;
        const size_t ud = row * p.D + d;
        const size_t bs = row * S;
        const float u = load_f(p.u, p.u_fp32, ud);
        float dt = load_f(p.delta, p.delta_fp32, ud);
        if (p.softplus)
            dt = dt > 20.f ? dt : log1pf(expf(dt));
        float hs_scale = 1.f, hs_zero = 0.f;
        if (p.h_bits)
        {
            const int g = i / p.h_group;
            hs_scale = p.h_scale[g];
            hs_zero = p.h_zero[g];
        }
        float y = 0.f;
#pragma unroll
        for (int s = 0; s < kMaxState; ++s)
        {
            if (s < S)
            {
                const float dA = expf(__fmul_rn(dt, a[s]));
                const float dBu = __fmul_rn(__fmul_rn(dt, load_f(p.Bm, p.b_fp32, bs + s)), u);
                float hv = __fadd_rn(__fmul_rn(dA, h[s]), dBu);
                if (p.h_bits)
                    hv = tgq_fake_quant(hv, hs_scale, hs_zero, p.h_bits);
                h[s] = hv;
                y = __fadd_rn(y, __fmul_rn(hv, load_f(p.Cm, p.c_fp32, bs + s)));
            }
        }
        if (p.Dskip)
            y = __fadd_rn(y, __fmul_rn(u, dskip));
        if (p.z)
        {
            const float zv = load_f(p.z, p.z_fp32, ud);
            y = __fmul_rn(y, __fdiv_rn(zv, __fadd_rn(1.f, expf(-zv))));
        }
        store_f(p.out, p.out_fp32, ud, y);
    }
}

} // namespace ouro
