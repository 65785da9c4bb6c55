// INT8 tensor-core GEMM with the inlier dequantization fused into the epilogue (sm_80+).
#include "gemm_cutlass.cuh"

namespace ouro
{

ouroStatus_t gemm_s8_tensorcore_dequant(int M, int N, int K, const int8_t* A, const int8_t* B, const InlierDequant& e,
                                        cudaStream_t s)
{
    return run_cutlass_gemm_dequant<int8_t, 64, 32>(M, N, K, A, B, e, s);
}

} // namespace ouro
