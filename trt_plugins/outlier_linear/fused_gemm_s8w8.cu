// Fused outlier-split GEMM, int8 activation codes x int8 weights (every tile, integer and fp16 outliers).
#include "fused_gemm.cuh"

namespace ouro
{
namespace fused
{

ouroStatus_t launch_gemm_s8w8(const GemmArgs& a, bool fp16_outliers, int tile, cudaStream_t s)
{
    return fp16_outliers ? launch_any_tile<kOpS8W8, true>(a, tile, s) : launch_any_tile<kOpS8W8, false>(a, tile, s);
}

} // namespace fused
} // namespace ouro
