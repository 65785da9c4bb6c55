// INT8 tensor-core GEMM (sm_80+; the path for sm_89/sm_90 and for every INT8 operand).
#include "gemm_cutlass.cuh"
#include "gemm.cuh"

namespace ouro
{

ouroStatus_t gemm_s8_tensorcore(int M, int N, int K, const int8_t* A, const int8_t* B, int32_t* D, cudaStream_t s)
{
    return run_cutlass_gemm<int8_t, 64, 32>(M, N, K, A, B, D, s);
}

} // namespace ouro
