// Native INT4 tensor-core GEMM with the inlier dequantization fused into the epilogue (sm_80 / sm_86 only;
// elsewhere OURO_WITH_S4=0 and the dispatcher never selects it).
#include "gemm.cuh"

#if OURO_WITH_S4
#include "gemm_cutlass.cuh"
#endif

namespace ouro
{

ouroStatus_t gemm_s4_tensorcore_dequant(int M, int N, int K, const void* A_packed, const void* B_packed,
                                        const InlierDequant& e, cudaStream_t s)
{
#if OURO_WITH_S4
    return run_cutlass_gemm_dequant<cutlass::int4b_t, 128, 64>(M, N, K, A_packed, B_packed, e, s);
#else
    (void) M, (void) N, (void) K, (void) A_packed, (void) B_packed, (void) e, (void) s;
    return OURO_ERR_UNSUPPORTED_ARCH;
#endif
}

} // namespace ouro
