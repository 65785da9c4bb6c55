// Step 3 of the outlier-split linear: the inlier GEMM paths (int32 accumulators, row-major
// D[M, N] = A[M, K] B[N, K]^T). One instantiation per .cu file.
#pragma once

#include "ouro_common.cuh"

namespace ouro
{

// Step 3 GEMMs (int32 accumulators D[M, N] = A[M, K] B[N, K]^T), one instantiation per .cu file.
ouroStatus_t gemm_s8_tensorcore(int M, int N, int K, const int8_t* A, const int8_t* B, int32_t* D, cudaStream_t s);
ouroStatus_t gemm_s4_tensorcore(int M, int N, int K, const void* A_packed, const void* B_packed, int32_t* D,
                                cudaStream_t s);
bool gemm_s4_compiled();

// Step 3 with the inlier dequantization fused into the GEMM epilogue (tensor-core paths, fp16 y):
//   y[m, n] = half( dequant_inlier(float(acc[m, n]), row_scale[m], col_scale[n], bias ? bias[n] : 0) )
// The int32 accumulator never leaves the registers. Needs N % 8 == 0 and 16-byte aligned y, col_scale, bias.
struct InlierDequant
{
    const float* row_scale; // [M]  S_I(t) of each row
    const float* col_scale; // [N]  per-output-channel weight scale s_w
    const float* bias;      // [N] or null
    __half* y;              // [M, N] row-major
};
ouroStatus_t gemm_s8_tensorcore_dequant(int M, int N, int K, const int8_t* A, const int8_t* B, const InlierDequant& e,
                                        cudaStream_t s);
ouroStatus_t gemm_s4_tensorcore_dequant(int M, int N, int K, const void* A_packed, const void* B_packed,
                                        const InlierDequant& e, cudaStream_t s);
ouroStatus_t gemm_simt(int M, int N, int K, const int8_t* A, const int8_t* w, int w_bits, int32_t* D, cudaStream_t s);

} // namespace ouro
