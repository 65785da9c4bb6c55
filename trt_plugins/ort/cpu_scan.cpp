// SelectiveScan on the CPU (spec: ouro.calib.scan.selective_scan_ref), fp32 state and arithmetic:
//   dt_t  = softplus(delta_t)                      (if delta_softplus)
//   h_t   = exp(dt_t A) * h_{t-1} + (dt_t B_t) u_t  (then TGQ fake quantization of h_t when h_bits > 0)
//   y_t   = C_t . h_t + Dskip u_t ;  out_t = y_t silu(z_t)
// Delta, B and C first go through the OuroMamba operand quantizer when their bits are > 0 (cpu_quant.cpp).
// One task per (image, block of 8 channels d) runs the whole recurrence with the 8 channels in vector lanes.
#include "cpu_kernels.h"
#include "cpu_vec.h"

#include <algorithm>

namespace ouro::ort::cpu
{
namespace
{

struct BlockArgs
{
    const float *u, *delta, *Bm, *Cm, *z; // offset to image b (z may be null)
    const float* At;    // [S, Dp] A transposed, D padded to Dp
    const float* Dskip; // [Dp] padded, or null
    float* out32;       // offset to image b, or null
    uint16_t* out16;    // offset to image b, or null
    int L, D, Dp, S, d0, nd;
    int reverse, softplus;
    int h_bits, h_group;
    const float *h_scale, *h_zero;
};

// Channels d0 .. d0 + 8 NV - 1 (NV = 2: sixteen full channels; NV = 1: nd <= 8 channels) through all L steps.
// Two independent vectors per step hide the latency of exp. h: S * NV * 8 floats (load8/store8: any alignment).
template <int NV>
OURO_INLINE void scan_lanes(const BlockArgs& a, float* h)
{
    const int L = a.L, D = a.D, S = a.S, d0 = a.d0, nd = a.nd;
    const bool full = nd == 8 * NV;
    auto load = [&](const float* p) { return full ? load8(p) : load_partial(p, nd); };
    for (int k = 0; k < S * NV; ++k)
        store8(h + 8 * k, splat(0.0f));
    v8f dsk[NV];
    for (int j = 0; j < NV; ++j)
        dsk[j] = a.Dskip ? load8(a.Dskip + d0 + 8 * j) : splat(0.0f);
    const float hq_max = a.h_bits > 0 ? static_cast<float>((1 << a.h_bits) - 1) : 0.0f;
    for (int i = 0; i < L; ++i)
    {
        const int t = a.reverse ? L - 1 - i : i;
        const size_t o = static_cast<size_t>(t) * D + d0;
        v8f uu[NV], dt[NV], y[NV];
        for (int j = 0; j < NV; ++j)
        {
            uu[j] = load(a.u + o + 8 * j);
            const v8f dd = load(a.delta + o + 8 * j);
            dt[j] = a.softplus ? vsoftplus(dd) : dd;
            y[j] = splat(0.0f);
        }
        const float* bt = a.Bm + static_cast<size_t>(t) * S;
        const float* ct = a.Cm + static_cast<size_t>(t) * S;
        v8f hs_scale = splat(1.0f), hs_zero = splat(0.0f);
        if (a.h_bits > 0)
        {
            const int g = i / a.h_group;
            hs_scale = splat(a.h_scale[g]);
            hs_zero = round_even(splat(a.h_zero[g]));
        }
        for (int s = 0; s < S; ++s)
        {
            const v8f bs = splat(bt[s]), cs = splat(ct[s]);
            for (int j = 0; j < NV; ++j)
            {
                float* hp = h + 8 * (s * NV + j);
                const v8f dA = vexp(dt[j] * load8(a.At + static_cast<size_t>(s) * a.Dp + d0 + 8 * j));
                v8f hv = dA * load8(hp) + (dt[j] * bs) * uu[j];
                if (a.h_bits > 0)
                {
                    // fake_quant_asym: (clamp(round(h / s) + z, 0, 2^b - 1) - z) * s
                    v8f qv = round_even(hv / hs_scale) + hs_zero;
                    qv = select(qv < splat(0.0f), splat(0.0f), qv);
                    qv = select(qv > splat(hq_max), splat(hq_max), qv);
                    hv = (qv - hs_zero) * hs_scale;
                }
                store8(hp, hv);
                y[j] = y[j] + hv * cs;
            }
        }
        for (int j = 0; j < NV; ++j)
        {
            if (a.Dskip)
                y[j] = y[j] + uu[j] * dsk[j];
            if (a.z)
                y[j] = y[j] * vsilu(load(a.z + o + 8 * j));
            if (a.out32)
            {
                if (full)
                    store8(a.out32 + o + 8 * j, y[j]);
                else
                    store_partial(a.out32 + o, y[j], nd);
            }
            else
                for (int k = 0; k < (full ? 8 : nd); ++k)
                    a.out16[o + 8 * j + k] = float_to_half(y[j][k]);
        }
    }
}

__attribute__((target_clones("avx2", "default"))) void scan_block(const BlockArgs& a, float* h)
{
    if (a.nd == 16)
        scan_lanes<2>(a, h);
    else
        scan_lanes<1>(a, h);
}

// fp32 view of an operand: the input itself, or a widened copy of an fp16 input.
const float* as_f32(const void* p, bool fp16, size_t n, std::vector<float>& buf)
{
    if (!p || !fp16)
        return static_cast<const float*>(p);
    buf.resize(n);
    widen_fp16(static_cast<const uint16_t*>(p), buf.data(), n);
    return buf.data();
}

} // namespace

void selective_scan(const ScanArgs& a, const ParallelFor& par)
{
    const int B = a.B, L = a.L, D = a.D, S = a.S;
    const size_t nLD = static_cast<size_t>(B) * L * D, nLS = static_cast<size_t>(B) * L * S;
    thread_local std::vector<float> ub, db, bb, cb, zb, dq, bq, cq, At, Dsk; // the caller's, reused across calls
    const float* u = as_f32(a.u, a.fp16, nLD, ub);
    const float* delta = as_f32(a.delta, a.fp16, nLD, db);
    const float* Bm = as_f32(a.Bm, a.fp16, nLS, bb);
    const float* Cm = as_f32(a.Cm, a.fp16, nLS, cb);
    const float* z = as_f32(a.z, a.fp16, nLD, zb);
    // operand quantization (OuroMamba dynamic outliers), before the recurrence
    if (a.delta_q.bits > 0)
    {
        if (dq.size() < nLD)
            dq.resize(nLD);
        outlier_fake_quant(delta, dq.data(), B, L, D, a.delta_q, par);
        delta = dq.data();
    }
    if (a.b_q.bits > 0)
    {
        if (bq.size() < nLS)
            bq.resize(nLS);
        outlier_fake_quant(Bm, bq.data(), B, L, S, a.b_q, par);
        Bm = bq.data();
    }
    if (a.c_q.bits > 0)
    {
        if (cq.size() < nLS)
            cq.resize(nLS);
        outlier_fake_quant(Cm, cq.data(), B, L, S, a.c_q, par);
        Cm = cq.data();
    }
    const int nblk = (D + 7) / 8;
    const int Dp = nblk * 8;
    At.assign(static_cast<size_t>(S) * Dp, 0.0f);
    for (int d = 0; d < D; ++d)
        for (int s = 0; s < S; ++s)
            At[static_cast<size_t>(s) * Dp + d] = a.A[static_cast<size_t>(d) * S + s];
    if (a.Dskip)
    {
        Dsk.assign(static_cast<size_t>(Dp), 0.0f);
        std::copy_n(a.Dskip, D, Dsk.data());
    }
    // (the buffers are thread_local: worker threads must see the caller's through plain pointers)
    const float* At_p = At.data();
    const float* Dsk_p = a.Dskip ? Dsk.data() : nullptr;
    // work items: blocks of 16 channels, the remainder as blocks of at most 8
    std::vector<std::pair<int, int>> blocks; // (d0, nd)
    int d = 0;
    for (; d + 16 <= D; d += 16)
        blocks.emplace_back(d, 16);
    for (; d < D; d += 8)
        blocks.emplace_back(d, std::min(8, D - d));
    const size_t nb = blocks.size();
    par(static_cast<size_t>(B) * nb, [&](size_t item) {
        const int b = static_cast<int>(item / nb);
        const int d0 = blocks[item % nb].first;
        const size_t oD = static_cast<size_t>(b) * L * D, oS = static_cast<size_t>(b) * L * S;
        BlockArgs ba{};
        ba.u = u + oD;
        ba.delta = delta + oD;
        ba.Bm = Bm + oS;
        ba.Cm = Cm + oS;
        ba.z = z ? z + oD : nullptr;
        ba.At = At_p;
        ba.Dskip = Dsk_p;
        ba.out32 = a.fp16 ? nullptr : static_cast<float*>(a.out) + oD;
        ba.out16 = a.fp16 ? static_cast<uint16_t*>(a.out) + oD : nullptr;
        ba.L = L;
        ba.D = D;
        ba.Dp = Dp;
        ba.S = S;
        ba.d0 = d0;
        ba.nd = blocks[item % nb].second;
        ba.reverse = a.reverse;
        ba.softplus = a.delta_softplus;
        ba.h_bits = a.h_bits;
        ba.h_group = a.h_group;
        ba.h_scale = a.h_scale;
        ba.h_zero = a.h_zero;
        thread_local std::vector<float> h;
        h.resize(static_cast<size_t>(S) * 16);
        scan_block(ba, h.data());
    });
    for (auto* v : {&ub, &db, &bb, &cb, &zb, &dq, &bq, &cq}) // big batches: give the memory back
        if (v->capacity() * sizeof(float) > (size_t(32) << 20))
            std::vector<float>().swap(*v);
}

} // namespace ouro::ort::cpu
