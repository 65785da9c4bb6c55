// Eight-lane fp32 helpers of the CPU kernels (GCC/Clang vector extensions: one source, AVX2 where the
// calling function is compiled for it, SSE2 pairs otherwise; see OURO_CPU_CLONES in cpu_kernels.h).
//
// Numerics conventions (ouro.calib.quantizers): IEEE fp32 operations, one rounding each (the library is
// compiled with -ffp-contract=off: no fused multiply-add is formed behind our back), round-half-to-even,
// IEEE division. exp/log1p here are our own polynomials (about 1-2 ulp); they are used only by the
// selective scan, whose reference comparison is within a named fp32 tolerance, never by a quantizer.
#pragma once

#include <cstdint>
#include <cstring>

namespace ouro::ort::cpu
{

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define OURO_INLINE inline __attribute__((always_inline))

OURO_INLINE v8f load8(const float* p)
{
    v8f v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

OURO_INLINE void store8(float* p, v8f v)
{
    std::memcpy(p, &v, sizeof v);
}

// First n (< 8) lanes from p, the others 0.
OURO_INLINE v8f load_partial(const float* p, int n)
{
    float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(t, p, sizeof(float) * n);
    return load8(t);
}

OURO_INLINE void store_partial(float* p, v8f v, int n)
{
    float t[8];
    store8(t, v);
    std::memcpy(p, t, sizeof(float) * n);
}

OURO_INLINE v8f splat(float x)
{
#if defined(__clang__) || __GNUC__ >= 12
    const v8f r = {x}; // one vbroadcastss (a braced list of eight x compiles to a chain of inserts)
    return __builtin_shufflevector(r, r, 0, 0, 0, 0, 0, 0, 0, 0);
#else
    v8f r;
    for (int i = 0; i < 8; ++i)
        r[i] = x;
    return r;
#endif
}

OURO_INLINE v8f vabs(v8f x)
{
    return (v8f)((v8i)x & 0x7FFFFFFF);
}

// Lane-wise select (mask lanes are 0 or -1, as produced by vector comparisons).
OURO_INLINE v8f select(v8i m, v8f a, v8f b)
{
    return (v8f)((m & (v8i)a) | (~m & (v8i)b));
}

OURO_INLINE v8f vmax(v8f a, v8f b)
{
    return select(a > b, a, b);
}

// round-half-to-even: exact for |x| < 2^22 through the 1.5 * 2^23 shift; larger values are integers already.
OURO_INLINE v8f round_even(v8f x)
{
    const v8f shift = splat(12582912.0f);
    const v8f r = (x + shift) - shift;
    return select(vabs(x) < splat(4194304.0f), r, x);
}

OURO_INLINE float round_even(float x)
{
    if (!(x < 4194304.0f && x > -4194304.0f))
        return x;
    return (x + 12582912.0f) - 12582912.0f; // IEEE semantics (no -ffast-math): two roundings, never folded
}

// clamp(v, -q, q); NaN propagates (as torch.clamp).
OURO_INLINE v8f clamp_sym(v8f v, float q)
{
    v = select(v < splat(-q), splat(-q), v);
    return select(v > splat(q), splat(q), v);
}

OURO_INLINE float clamp_sym(float v, float q)
{
    v = v < -q ? -q : v;
    return v > q ? q : v;
}

// exp(x) for x <= 88 (larger inputs are clamped to 88: every caller needs exp of a non-positive argument,
// or a sigmoid whose result no longer changes there). Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
// degree-7 Taylor polynomial of e^r (truncation below 1e-8), scale by 2^n built in the exponent field.
// x < -87.33 (below the smallest normal) returns 0.
OURO_INLINE v8f vexp(v8f x)
{
    const v8i under = x < splat(-87.33654f);
    x = select(x > splat(88.0f), splat(88.0f), x);
    x = select(under, splat(-87.33654f), x);
    const v8f shift = splat(12582912.0f); // |x log2 e| < 128 here: the 1.5 * 2^23 shift rounds half to even
    const v8f n = (x * splat(1.44269504088896341f) + shift) - shift;
    v8f r = x - n * splat(0.693359375f); // 0.693359375 has 9 significant bits: n * it is exact
    r = r - n * splat(-2.12194440e-4f);
    // Estrin's scheme (a shallow dependency chain: the scan is latency-bound on this)
    const v8f r2 = r * r;
    const v8f r4 = r2 * r2;
    const v8f p01 = splat(1.0f) + r;
    const v8f p23 = splat(0.5f) + r * splat(1.0f / 6.0f);
    const v8f p45 = splat(1.0f / 24.0f) + r * splat(1.0f / 120.0f);
    const v8f p67 = splat(1.0f / 720.0f) + r * splat(1.0f / 5040.0f);
    const v8f p = (p01 + r2 * p23) + r4 * (p45 + r2 * p67);
    const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    return select(under, splat(0.0f), p * (v8f)e);
}

// Natural log of positive normal u: u = m 2^k with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s),
// s = (m-1)/(m+1), |s| <= 0.172, odd series to s^9 (truncation below 1e-9).
OURO_INLINE v8f vlog(v8f u)
{
    const v8i ui = (v8i)u;
    v8i k = ((ui >> 23) & 0xFF) - 127;
    v8f m = (v8f)((ui & 0x007FFFFF) | 0x3F800000);
    const v8i big = m > splat(1.41421356f);
    m = select(big, m * splat(0.5f), m);
    k = k - big; // big lanes are -1: k + 1
    const v8f s = (m - splat(1.0f)) / (m + splat(1.0f));
    const v8f s2 = s * s;
    v8f p = splat(1.0f / 9.0f);
    p = p * s2 + splat(1.0f / 7.0f);
    p = p * s2 + splat(1.0f / 5.0f);
    p = p * s2 + splat(1.0f / 3.0f);
    p = p * s2 + splat(1.0f);
    const v8f kf = __builtin_convertvector(k, v8f);
    return kf * splat(0.693145752f) + (kf * splat(1.42860677e-6f) + splat(2.0f) * s * p);
}

// softplus(x) = x for x > 20 (torch's threshold), else log1p(exp(x)); log1p(e) = log(1+e) * e / ((1+e) - 1)
// corrects the rounding of 1 + e.
OURO_INLINE v8f vsoftplus(v8f x)
{
    const v8f e = vexp(x);
    const v8f u = splat(1.0f) + e;
    const v8f d = u - splat(1.0f);
    const v8i one = d == splat(0.0f);
    const v8f safe_d = select(one, splat(1.0f), d);
    const v8f l = select(one, e, vlog(u) * (e / safe_d));
    return select(x > splat(20.0f), x, l);
}

// silu(z) = z / (1 + exp(-z)).
OURO_INLINE v8f vsilu(v8f z)
{
    return z / (splat(1.0f) + vexp(-z));
}

// ---------------------------------------------------------------------------------------- fp16
// IEEE binary16 <-> binary32, exact (round-half-to-even on the narrowing side), subnormals included.
OURO_INLINE float half_to_float(uint16_t h)
{
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1Fu;
    const uint32_t m = h & 0x3FFu;
    uint32_t bits;
    if (e == 0)
    {
        const float f = static_cast<float>(m) * 5.9604644775390625e-8f; // m * 2^-24, exact
        std::memcpy(&bits, &f, 4);
        bits |= sign;
    }
    else if (e == 31)
        bits = sign | 0x7F800000u | (m << 13);
    else
        bits = sign | ((e + 112u) << 23) | (m << 13);
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

OURO_INLINE uint16_t float_to_half(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) // inf, NaN (quiet)
        return sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u);
    if (ax >= 0x477FF000u) // >= 65520 rounds to infinity
        return sign | 0x7C00u;
    if (ax < 0x38800000u) // below 2^-14: a half subnormal (or zero); v * 2^24 is exact, then round to integer
    {
        float v;
        std::memcpy(&v, &ax, 4);
        return sign | static_cast<uint16_t>(round_even(v * 16777216.0f));
    }
    uint32_t h = ax - 0x38000000u; // rebias the exponent by 112
    h += 0xFFFu + ((h >> 13) & 1u); // round the 13 dropped bits half to even (a carry bumps the exponent)
    return sign | static_cast<uint16_t>(h >> 13);
}

} // namespace ouro::ort::cpu
