// OuroMamba outlier quantizer on the CPU (spec: ouro.calib.quantizers.outlier_quant_ref).
//
// Per (image, window), tokens in increasing t; at token t with the outlier list in force:
//   a     = |x_t| with the listed channels zeroed
//   trig  = max(a) / qmax_I > S_I(t)
//   theta = mean(a) + k * std(a)   (dynamic)   or theta[t]   (calibrated)
//   list |= trig & (a > theta)
// then the token is quantized with the updated list (inliers: S_I(t), outliers: S_O = max_list |x| / qmax_O).
#include "cpu_kernels.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cmath>

namespace ouro::ort::cpu
{

void serial_for(size_t n, const std::function<void(size_t)>& fn)
{
    for (size_t i = 0; i < n; ++i)
        fn(i);
}

namespace
{

typedef double v4d __attribute__((vector_size(32)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));

OURO_INLINE float qmax_f(int bits)
{
    return static_cast<float>((1 << (bits - 1)) - 1);
}

// torch/aten/src/ATen/native/cpu/utils.h CeilLog2: ceil(log2(x)), 1 for x <= 2.
OURO_INLINE int64_t ceil_log2(int64_t x)
{
    if (x <= 2)
        return 1;
    return 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

// PyTorch's cascade sum over `size` items of 4 interleaved rows (multi_row_sum in ATen's SumKernel.cpp):
// item i of row k is load(i * 4 + k). Chunks of 2^level_power items are summed, and the chunk sums are
// summed again on up to 4 levels. T is float (scalar rows) or v8f (rows of 8-lane vectors).
template <typename T, typename Load>
OURO_INLINE void multi_row_sum4(const Load& load, int64_t size, T (&ret)[4])
{
    constexpr int kLevels = 4;
    const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
    const int64_t step = int64_t(1) << level_power;
    const int64_t level_mask = step - 1;
    T acc[kLevels][4];
    for (auto& lv : acc)
        for (auto& v : lv)
            v = T{};
    int64_t i = 0;
    while (i + step <= size)
    {
        for (int64_t j = 0; j < step; ++j, ++i)
            for (int k = 0; k < 4; ++k)
                acc[0][k] += load(i * 4 + k);
        for (int j = 1; j < kLevels; ++j)
        {
            for (int k = 0; k < 4; ++k)
            {
                acc[j][k] += acc[j - 1][k];
                acc[j - 1][k] = T{};
            }
            if ((i & (level_mask << (j * level_power))) != 0)
                break;
        }
    }
    for (; i < size; ++i)
        for (int k = 0; k < 4; ++k)
            acc[0][k] += load(i * 4 + k);
    for (int j = 1; j < kLevels; ++j)
        for (int k = 0; k < 4; ++k)
            acc[0][k] += acc[j][k];
    for (int k = 0; k < 4; ++k)
        ret[k] = acc[0][k];
}

// ATen's row_sum: the row seen as (-1, 4), multi_row_sum over it, the remainder into the first partial,
// then the four partials added in order.
template <typename T, typename Load>
OURO_INLINE T row_sum(const Load& load, int64_t size)
{
    const int64_t size_ilp = size / 4;
    T part[4];
    multi_row_sum4<T>(load, size_ilp, part);
    for (int64_t i = size_ilp * 4; i < size; ++i)
        part[0] += load(i);
    for (int k = 1; k < 4; ++k)
        part[0] += part[k];
    return part[0];
}

// vectorized_inner_sum of ATen with Vectorized<float> of 8 lanes (its AVX2 kernel): a row of whole vectors
// summed by row_sum, the scalar tail added first, then the 8 lanes in order. Rows shorter than one vector go
// through the scalar row_sum.
OURO_INLINE float torch_sum(const float* a, int64_t n)
{
    constexpr int64_t V = 8;
    if (n < V)
        return row_sum<float>([a](int64_t i) { return a[i]; }, n);
    const int64_t nvec = n / V;
    const v8f lanes = row_sum<v8f>([a](int64_t i) { return load8(a + i * V); }, nvec);
    float acc = 0.0f;
    for (int64_t k = nvec * V; k < n; ++k)
        acc += a[k];
    for (int k = 0; k < 8; ++k)
        acc += lanes[k];
    return acc;
}

typedef float v4f __attribute__((vector_size(16)));

OURO_INLINE v4d widen4(const float* p)
{
    v4f f;
    std::memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, v4d);
}

// mean(a) + k * std(a): the mean is torch's fp32 sum / C; the std is computed in double (two passes, four
// partial sums each: at double precision their order does not reach the fp32 result), sqrt in double, rounded
// once, as torch's CPU std (Welford in double) does.
OURO_INLINE float threshold(const float* a, int C, float k_sigma, int std_correction)
{
    const float mean = torch_sum(a, C) / static_cast<float>(C);
    v4d s4 = {0, 0, 0, 0};
    int c = 0;
    for (; c + 4 <= C; c += 4)
        s4 += widen4(a + c);
    double sum = (s4[0] + s4[1]) + (s4[2] + s4[3]);
    for (; c < C; ++c)
        sum += a[c];
    const double mean_d = sum / C;
    const v4d m4 = {mean_d, mean_d, mean_d, mean_d};
    v4d q4 = {0, 0, 0, 0};
    c = 0;
    for (; c + 4 <= C; c += 4)
    {
        const v4d d = widen4(a + c) - m4;
        q4 += d * d;
    }
    double m2 = (q4[0] + q4[1]) + (q4[2] + q4[3]);
    for (; c < C; ++c)
        m2 += (a[c] - mean_d) * (a[c] - mean_d);
    const float stdf = static_cast<float>(std::sqrt(m2 / std::max(C - std_correction, 1)));
    return mean + k_sigma * stdf;
}

// a[c] = |x[c]| unless channel c joined before position i (then 0); returns max(a).
OURO_INLINE float masked_abs_max(const float* x, const int32_t* first, int i, int C, float* a)
{
    v8f m8 = splat(0.0f);
    const v8i pos = v8i{i, i, i, i, i, i, i, i};
    int c = 0;
    for (; c + 8 <= C; c += 8)
    {
        v8i f;
        std::memcpy(&f, first + c, sizeof f);
        const v8f v = select(f < pos, splat(0.0f), vabs(load8(x + c)));
        store8(a + c, v);
        m8 = vmax(m8, v);
    }
    float m = 0.0f;
    for (int k = 0; k < 8; ++k)
        m = m8[k] > m ? m8[k] : m;
    for (; c < C; ++c)
    {
        a[c] = first[c] < i ? 0.0f : std::fabs(x[c]);
        m = a[c] > m ? a[c] : m;
    }
    return m;
}

// The list update of token i and S_O: channels not yet listed with a > theta join at position i (first[c] = i);
// returns max over the updated list of |x| (0 if empty).
OURO_INLINE float join(const float* x, const float* a, int C, bool trig, float th, int i, int32_t* first)
{
    const v8i never = v8i{kNever, kNever, kNever, kNever, kNever, kNever, kNever, kNever};
    const v8i pos = v8i{i, i, i, i, i, i, i, i};
    const v8i on = trig ? ~v8i{} : v8i{};
    v8f m8 = splat(0.0f);
    int c = 0;
    for (; c + 8 <= C; c += 8)
    {
        v8i f;
        std::memcpy(&f, first + c, sizeof f);
        f = (v8i)select(on & (f == never) & (load8(a + c) > splat(th)), (v8f)pos, (v8f)f);
        std::memcpy(first + c, &f, sizeof f);
        m8 = vmax(m8, select(f <= pos, vabs(load8(x + c)), splat(0.0f)));
    }
    float m = 0.0f;
    for (int k = 0; k < 8; ++k)
        m = m8[k] > m ? m8[k] : m;
    for (; c < C; ++c)
    {
        if (trig && first[c] == kNever && a[c] > th)
            first[c] = i;
        if (first[c] <= i)
            m = std::max(m, std::fabs(x[c]));
    }
    return m;
}

// Quantizes row i of a window with the list in force (first[c] <= i); so = S_O.
OURO_INLINE void quantize_row(const float* x, const int32_t* first, int i, int C, float s, float qi, float so, float qo,
    bool fp16_out, float* in_codes, uint8_t* in_u8, float* x_hat)
{
    // inliers: q_in = clamp(round(x / S_I)) off the list, 0 on it; x_hat = q_in * S_I + O_hat, with
    // O_hat = clamp(round(x / S_O)) * S_O on the list (int outliers), 0 off it
    const v8i pos = v8i{i, i, i, i, i, i, i, i};
    int c = 0;
    for (; c + 8 <= C; c += 8)
    {
        v8i f;
        std::memcpy(&f, first + c, sizeof f);
        const v8i listed = f <= pos;
        const v8f xv = load8(x + c);
        const v8f qin = clamp_sym(round_even(select(listed, splat(0.0f), xv) / splat(s)), qi);
        if (in_codes)
            store8(in_codes + c, qin);
        if (in_u8)
        {
            const v8u8 b = __builtin_convertvector(__builtin_convertvector(qin, v8i) + 128, v8u8);
            std::memcpy(in_u8 + c, &b, sizeof b);
        }
        if (x_hat)
        {
            const v8f ohat = fp16_out ? splat(0.0f) : clamp_sym(round_even(select(listed, xv, splat(0.0f)) / splat(so)), qo) * splat(so);
            store8(x_hat + c, qin * splat(s) + ohat);
        }
    }
    for (; c < C; ++c)
    {
        const bool listed = first[c] <= i;
        const float qin = clamp_sym(round_even((listed ? 0.0f : x[c]) / s), qi);
        if (in_codes)
            in_codes[c] = qin;
        if (in_u8)
            in_u8[c] = static_cast<uint8_t>(static_cast<int>(qin) + 128);
        if (x_hat)
            x_hat[c] = qin * s + (fp16_out ? 0.0f : clamp_sym(round_even((listed ? x[c] : 0.0f) / so), qo) * so);
    }
    if (x_hat && fp16_out) // fp16 outliers: O_hat = fp16(x) on the list (q_in = 0 there)
        for (c = 0; c < C; ++c)
            if (first[c] <= i)
                x_hat[c] = 0.0f * s + half_to_float(float_to_half(x[c]));
}

} // namespace

float torch_order_sum(const float* a, int64_t n)
{
    return torch_sum(a, n);
}

float dynamic_threshold(const float* a, int C, float k_sigma, int std_correction)
{
    return threshold(a, C, k_sigma, std_correction);
}

__attribute__((target_clones("avx2", "default"))) void quantize_window(const float* x, int nt, int C, int t0,
    const ActQuant& q, int32_t* first, const WindowOut& out)
{
    const float qi = qmax_f(q.bits);
    const bool fp16_out = q.bits_outlier >= kFp16Outliers;
    const float qo = fp16_out ? 0.0f : qmax_f(q.bits_outlier);
    std::fill(first, first + C, kNever);
    thread_local std::vector<float> abuf;
    abuf.resize(static_cast<size_t>(C));
    float* a = abuf.data();
    for (int i = 0; i < nt; ++i)
    {
        const float* xr = x + static_cast<size_t>(i) * C;
        const int t = t0 + i;
        const float s = q.scale[t];
        const float amax = masked_abs_max(xr, first, i, C, a);
        const bool trig = amax / qi > s;
        const float th = !trig ? 0.0f : q.policy == 0 ? threshold(a, C, q.k_sigma, q.std_correction) : q.theta[t];
        const float omax = join(xr, a, C, trig, th, i, first);
        // S_O = max over the list of |x| / qmax_O (1 when that max is 0, and for fp16 outliers)
        const float so = fp16_out ? 1.0f : (omax > 0.0f ? omax / qo : 1.0f);
        const size_t row = static_cast<size_t>(i) * C;
        quantize_row(xr, first, i, C, s, qi, so, qo, fp16_out,
            out.inlier_codes ? out.inlier_codes + static_cast<size_t>(i) * out.ld : nullptr,
            out.inlier_u8 ? out.inlier_u8 + static_cast<size_t>(i) * out.ld : nullptr, out.x_hat ? out.x_hat + row : nullptr);
        if (out.outlier_scale)
            out.outlier_scale[i] = so;
        if (out.mask || out.outlier_codes) // debug outputs (tests)
            for (int c = 0; c < C; ++c)
            {
                const bool on = first[c] <= i;
                if (out.mask)
                    out.mask[row + c] = on ? 1 : 0;
                if (out.outlier_codes)
                {
                    const float outl = on ? xr[c] : 0.0f;
                    out.outlier_codes[row + c]
                        = fp16_out ? half_to_float(float_to_half(outl)) : clamp_sym(round_even(outl / so), qo);
                }
            }
    }
}

void outlier_fake_quant(const float* x, float* y, int B, int L, int C, const ActQuant& q, const ParallelFor& par)
{
    const int n = q.n_refresh;
    const int W = (L + n - 1) / n;
    parallel(par, static_cast<size_t>(B) * W, static_cast<size_t>(B) * L * C, [&](size_t bw) {
        const int b = static_cast<int>(bw / W);
        const int t0 = static_cast<int>(bw % W) * n;
        const int nt = std::min(n, L - t0);
        const size_t row0 = static_cast<size_t>(b) * L + t0;
        thread_local std::vector<int32_t> first;
        first.resize(static_cast<size_t>(C));
        WindowOut out;
        out.x_hat = y + row0 * C;
        quantize_window(x + row0 * C, nt, C, t0, q, first.data(), out);
    });
}

void widen_fp16(const uint16_t* src, float* dst, size_t n)
{
    for (size_t i = 0; i < n; ++i)
        dst[i] = half_to_float(src[i]);
}

void narrow_fp16(const float* src, uint16_t* dst, size_t n)
{
    for (size_t i = 0; i < n; ++i)
        dst[i] = float_to_half(src[i]);
}

} // namespace ouro::ort::cpu
