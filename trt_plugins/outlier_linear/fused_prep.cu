// Launch of the fused path's activation-prep kernel (fused_gemm.cuh, kernel 1).
#include "fused_gemm.cuh"

namespace ouro
{
namespace fused
{

namespace
{
template <typename Kernel>
ouroStatus_t launch_prep_kernel(Kernel kernel, unsigned blocks, int threads, size_t smem, cudaStream_t stream,
                                const PrepArgs& a)
{
    if (!allow_dynamic_smem(kernel, smem))
        return OURO_ERR_UNSUPPORTED_SHAPE;
    launch_kernel(kernel, dim3(blocks), dim3(threads), smem, stream, a);
    return launch_status();
}
} // namespace

ouroStatus_t launch_prep(const PrepArgs& a, bool x_fp32, bool pack_s4, cudaStream_t s)
{
    const long long blocks = static_cast<long long>(a.M / a.L) * ceil_div(a.L, a.n_refresh);
    if (blocks > 2147483647LL)
        return OURO_ERR_UNSUPPORTED_SHAPE;
    const size_t smem = prep_smem_bytes(a.K, x_fp32 ? 4 : 2, a.ring);
    const int threads = prep_threads(a.K);
    const unsigned nb = static_cast<unsigned>(blocks);
    if (x_fp32)
        return pack_s4 ? launch_prep_kernel(act_prep_kernel<float, true>, nb, threads, smem, s, a)
                       : launch_prep_kernel(act_prep_kernel<float, false>, nb, threads, smem, s, a);
    return pack_s4 ? launch_prep_kernel(act_prep_kernel<__half, true>, nb, threads, smem, s, a)
                   : launch_prep_kernel(act_prep_kernel<__half, false>, nb, threads, smem, s, a);
}

} // namespace fused
} // namespace ouro
