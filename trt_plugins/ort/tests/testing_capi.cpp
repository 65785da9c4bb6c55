// libouro_ort_testing.so: the CPU kernels of libouro_ort_ops.so (the same object files) behind a small C ABI,
// so that tests/unit/test_ort_native.py can compare what onnxruntime never exposes (integer codes, outlier
// masks, the summation order of the mean, the exact-GEMM bound) with the PyTorch references through ctypes.
// Test-only: not installed, not loaded by the ops.
#include "cpu_kernels.h"

#include <algorithm>
#include <exception>
#include <vector>

#define OURO_TEST_API extern "C" __attribute__((visibility("default")))

using namespace ouro::ort::cpu;

namespace
{
ActQuant make_act(int bits, int bits_outlier, int n_refresh, int policy, float k_sigma, int std_correction,
    const float* scale, const float* theta)
{
    ActQuant q;
    q.bits = bits;
    q.bits_outlier = bits_outlier;
    q.n_refresh = n_refresh;
    q.policy = policy;
    q.k_sigma = k_sigma;
    q.std_correction = std_correction;
    q.scale = scale;
    q.theta = theta;
    return q;
}
} // namespace

// The quantizer over x [B, L, C], every output dense: inlier codes, mask (0/1), outlier codes, S_O [B, L], x_hat.
OURO_TEST_API int ouro_test_outlier_quant(const float* x, int B, int L, int C, int bits, int bits_outlier, int n_refresh,
    int policy, float k_sigma, int std_correction, const float* scale, const float* theta, float* inlier_codes,
    unsigned char* mask, float* outlier_codes, float* outlier_scale, float* x_hat)
{
    try
    {
        const ActQuant q = make_act(bits, bits_outlier, n_refresh, policy, k_sigma, std_correction, scale, theta);
        const int W = (L + n_refresh - 1) / n_refresh;
        std::vector<int32_t> first(static_cast<size_t>(C));
        for (int bw = 0; bw < B * W; ++bw)
        {
            const int b = bw / W, t0 = (bw % W) * n_refresh, nt = std::min(n_refresh, L - t0);
            const size_t r0 = static_cast<size_t>(b) * L + t0;
            WindowOut o;
            o.inlier_codes = inlier_codes + r0 * C;
            o.ld = static_cast<size_t>(C);
            o.mask = mask + r0 * C;
            o.outlier_codes = outlier_codes + r0 * C;
            o.outlier_scale = outlier_scale + r0;
            o.x_hat = x_hat + r0 * C;
            quantize_window(x + r0 * C, nt, C, t0, q, first.data(), o);
        }
        return 0;
    }
    catch (const std::exception&)
    {
        return 1;
    }
}

// outlier_fake_quant as the SelectiveScan op runs it (x_hat only).
OURO_TEST_API int ouro_test_fake_quant(const float* x, float* y, int B, int L, int C, int bits, int bits_outlier,
    int n_refresh, int policy, float k_sigma, int std_correction, const float* scale, const float* theta)
{
    try
    {
        outlier_fake_quant(x, y, B, L, C, make_act(bits, bits_outlier, n_refresh, policy, k_sigma, std_correction, scale, theta),
            serial_for);
        return 0;
    }
    catch (const std::exception&)
    {
        return 1;
    }
}

OURO_TEST_API float ouro_test_torch_order_sum(const float* a, long long n)
{
    return torch_order_sum(a, n);
}

OURO_TEST_API float ouro_test_dynamic_threshold(const float* a, int C, float k_sigma, int std_correction)
{
    return dynamic_threshold(a, C, k_sigma, std_correction);
}

OURO_TEST_API int ouro_test_exact_k_chunk(int a_bits, int w_max_abs)
{
    return exact_k_chunk(a_bits, w_max_abs);
}

// The library's own fp32 GEMM, C = A B (serial), for its exactness test on integer codes.
OURO_TEST_API void ouro_test_gemm(const float* A, const float* Bm, float* C, int M, int K, int N)
{
    gemm_f32(A, Bm, C, M, K, N, serial_for);
}

OURO_TEST_API void ouro_test_fp16_roundtrip(const float* src, float* dst, long long n)
{
    std::vector<uint16_t> h(static_cast<size_t>(n));
    narrow_fp16(src, h.data(), h.size());
    widen_fp16(h.data(), dst, h.size());
}
