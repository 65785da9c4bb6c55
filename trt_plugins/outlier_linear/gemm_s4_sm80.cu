// Native INT4 tensor-core GEMM (sm_80 / 86 / 89). Compiled only for those architectures (see
// cmake/OuroKernels.cmake); elsewhere OURO_WITH_S4=0 and the dispatcher never selects it.
#include "gemm.cuh"

#if OURO_WITH_S4
#include "gemm_cutlass.cuh"
#endif

namespace ouro
{

bool gemm_s4_compiled()
{
    return OURO_WITH_S4 != 0;
}

ouroStatus_t gemm_s4_tensorcore(int M, int N, int K, const void* A_packed, const void* B_packed, int32_t* D,
                                cudaStream_t s)
{
#if OURO_WITH_S4
    return run_cutlass_gemm<cutlass::int4b_t, 128, 64>(M, N, K, A_packed, B_packed, D, s);
#else
    (void) M, (void) N, (void) K, (void) A_packed, (void) B_packed, (void) D, (void) s;
    return OURO_ERR_UNSUPPORTED_ARCH;
#endif
}

} // namespace ouro
