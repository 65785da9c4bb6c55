// Fused outlier-split GEMM, int8 activation codes x packed int4 weights unpacked in registers (every tile,
// integer and fp16 outliers): the path of 4-bit weights where native int4 MMA is missing (sm_90) or the
// activations have more than 4 bits.
#include "fused_gemm.cuh"

namespace ouro
{
namespace fused
{

ouroStatus_t launch_gemm_s8w4(const GemmArgs& a, bool fp16_outliers, int tile, cudaStream_t s)
{
    return fp16_outliers ? launch_any_tile<kOpS8W4, true>(a, tile, s) : launch_any_tile<kOpS8W4, false>(a, tile, s);
}

} // namespace fused
} // namespace ouro
