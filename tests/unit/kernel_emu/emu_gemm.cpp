// CPU stand-ins for the CUTLASS tensor-core GEMMs (tests only): plain integer loops with the same
// operand layouts (A row-major [M, K]; B = W row-major [N, K]; int4 packed low nibble first). The
// fused-epilogue variants apply the kernels' own ouro::dequant_inlier (the function the CUTLASS epilogue
// visitor calls per element) and round to fp16, with the CUTLASS path's shape requirement (N % 8 == 0).
#include "gemm.cuh"

#include <vector>

namespace ouro
{
namespace
{
int code(const void* p, bool s4, size_t row_len, int r, int k)
{
    if (!s4)
        return static_cast<const int8_t*>(p)[static_cast<size_t>(r) * row_len + k];
    const uint8_t b = static_cast<const uint8_t*>(p)[(static_cast<size_t>(r) * row_len + k) / 2];
    const int nib = (k & 1) ? (b >> 4) : (b & 0xF);
    return nib >= 8 ? nib - 16 : nib;
}

ouroStatus_t ref_gemm(int M, int N, int K, const void* A, const void* B, int32_t* D, bool s4)
{
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n)
        {
            int32_t acc = 0;
            for (int k = 0; k < K; ++k)
                acc += code(A, s4, K, m, k) * code(B, s4, K, n, k);
            D[static_cast<size_t>(m) * N + n] = acc;
        }
    return OURO_OK;
}
ouroStatus_t ref_gemm_dequant(int M, int N, int K, const void* A, const void* B, const InlierDequant& e, bool s4)
{
    std::vector<int32_t> acc(static_cast<size_t>(M) * N);
    ref_gemm(M, N, K, A, B, acc.data(), s4);
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n)
        {
            const size_t i = static_cast<size_t>(m) * N + n;
            const float v = dequant_inlier(static_cast<float>(acc[i]), e.row_scale[m], e.col_scale[n],
                                           e.bias ? e.bias[n] : 0.f);
            e.y[i] = __float2half_rn(v);
        }
    return OURO_OK;
}
} // namespace

ouroStatus_t gemm_s8_tensorcore_dequant(int M, int N, int K, const int8_t* A, const int8_t* B, const InlierDequant& e,
                                        cudaStream_t)
{
    return (K % 16 || N % 8) ? OURO_ERR_UNSUPPORTED_SHAPE : ref_gemm_dequant(M, N, K, A, B, e, false);
}

ouroStatus_t gemm_s4_tensorcore_dequant(int M, int N, int K, const void* A, const void* B, const InlierDequant& e,
                                        cudaStream_t)
{
    return (K % 32 || N % 8) ? OURO_ERR_UNSUPPORTED_SHAPE : ref_gemm_dequant(M, N, K, A, B, e, true);
}

ouroStatus_t gemm_s8_tensorcore(int M, int N, int K, const int8_t* A, const int8_t* B, int32_t* D, cudaStream_t)
{
    return (K % 16 || N % 4) ? OURO_ERR_UNSUPPORTED_SHAPE : ref_gemm(M, N, K, A, B, D, false);
}

ouroStatus_t gemm_s4_tensorcore(int M, int N, int K, const void* A, const void* B, int32_t* D, cudaStream_t)
{
    return (K % 32 || N % 4) ? OURO_ERR_UNSUPPORTED_SHAPE : ref_gemm(M, N, K, A, B, D, true);
}

bool gemm_s4_compiled()
{
    return true;
}
} // namespace ouro
