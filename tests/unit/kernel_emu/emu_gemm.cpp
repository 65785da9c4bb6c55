// CPU stand-ins for the CUTLASS tensor-core GEMMs of the SEPARATE epilogue (tests only): plain integer loops
// with the same operand layouts (A row-major [M, K]; B = W row-major [N, K]; int4 packed low nibble first) and
// CUTLASS's shape requirements. The fused path's GEMM is the project's own kernel and runs here as written
// (its mma.sync and cp.async instructions are emulated in emu_runtime.cpp).
#include "gemm.cuh"


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
} // namespace

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
