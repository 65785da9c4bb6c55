// Step 3 of the SEPARATE (five-kernel) outlier-split linear: the inlier GEMM paths (int32 accumulators,
// row-major D[M, N] = A[M, K] B[N, K]^T). One instantiation per .cu file. The fused path's GEMM: fused_gemm.cuh.
#pragma once

#include "ouro_common.cuh"

namespace ouro
{

// Step 3 GEMMs (int32 accumulators D[M, N] = A[M, K] B[N, K]^T), one instantiation per .cu file.
ouroStatus_t gemm_s8_tensorcore(int M, int N, int K, const int8_t* A, const int8_t* B, int32_t* D, cudaStream_t s);
ouroStatus_t gemm_s4_tensorcore(int M, int N, int K, const void* A_packed, const void* B_packed, int32_t* D,
                                cudaStream_t s);
bool gemm_s4_compiled();

ouroStatus_t gemm_simt(int M, int N, int K, const int8_t* A, const int8_t* w, int w_bits, int32_t* D, cudaStream_t s);

} // namespace ouro
