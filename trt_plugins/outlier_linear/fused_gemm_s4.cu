// Fused outlier-split GEMM on native int4 tensor cores (mma m16n8k64 s4; integer outliers). Compiled only for
// the architectures with int4 MMA in the build's list (sm_80/86/89, see cmake/OuroKernels.cmake); elsewhere
// OURO_WITH_S4=0 and the dispatcher never selects it.
#include "fused.h"

#if OURO_WITH_S4
#include "fused_gemm.cuh"
#endif

namespace ouro
{
namespace fused
{

bool gemm_s4_compiled()
{
    return OURO_WITH_S4 != 0;
}

ouroStatus_t launch_gemm_s4(const GemmArgs& a, int tile, cudaStream_t s)
{
#if OURO_WITH_S4
    return launch_any_tile<kOpS4, false>(a, tile, s);
#else
    (void) a, (void) tile, (void) s;
    return OURO_ERR_UNSUPPORTED_ARCH;
#endif
}

} // namespace fused
} // namespace ouro
