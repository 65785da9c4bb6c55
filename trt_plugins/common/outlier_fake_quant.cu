// ouroOutlierFakeQuant: standalone OuroMamba fake quantization of x [B, L, C].
#include "outlier_quant.cuh"

namespace ouro
{

// ouroOutlierFakeQuant: grid = B * ceil(L / n_refresh) blocks, dynamic shared = C * sizeof(uint16_t).
__global__ void outlier_fake_quant_kernel(const void* x, int x_is_fp32, void* y,
                                          int y_is_fp32, int L, int C, ouroActQuant_t q)
{
    OURO_DYN_SMEM(uint16_t, first);
    __shared__ DetectScratch sc;
    const WindowPos wp = window_of(blockIdx.x, L, q.n_refresh);
    detect_window(x, x_is_fp32, wp, C, q, first, sc);
    const float qi = static_cast<float>(qmax_of(q.bits));
    for (int i = 0; i < wp.nt; ++i)
    {
        const size_t base = (wp.row0 + i) * static_cast<size_t>(C);
        float amax = 0.f;
        for (int c = threadIdx.x; c < C; c += blockDim.x)
            if (first[c] <= i)
                amax = fmaxf(amax, fabsf(load_f(x, x_is_fp32, base + c)));
        amax = block_reduce(amax, sc.redf, MaxOp(), 0.f);
        const float s_out = outlier_scale(amax, q.bits_outlier);
        const float s_in = q.scale[wp.t0 + i];
        for (int c = threadIdx.x; c < C; c += blockDim.x)
        {
            const float v = load_f(x, x_is_fp32, base + c);
            store_f(y, y_is_fp32, base + c, fake_quant_value(v, first[c] <= i, s_in, qi, s_out, q.bits_outlier));
        }
    }
}

ouroStatus_t launch_outlier_fake_quant(const void* x, int x_is_fp32, void* y, int y_is_fp32, int B, int L, int C,
                                       const ouroActQuant_t& q, cudaStream_t stream)
{
    if (x == nullptr || y == nullptr)
        return OURO_ERR_INVALID_ARGUMENT;
    if (B < 1 || L < 1 || C < 1 || (x_is_fp32 != 0 && x_is_fp32 != 1) || (y_is_fp32 != 0 && y_is_fp32 != 1))
        return OURO_ERR_INVALID_ARGUMENT;
    if (L > kMaxTokens || C > kMaxK)
        return OURO_ERR_UNSUPPORTED_SHAPE;
    const ouroStatus_t st = validate_act_quant(q, true);
    if (st != OURO_OK)
        return st;
    if (!is_aligned(x, x_is_fp32 ? 4 : 2) || !is_aligned(y, y_is_fp32 ? 4 : 2) || !is_aligned(q.scale, 4)
        || (q.theta && !is_aligned(q.theta, 4)))
        return OURO_ERR_MISALIGNED;
    const long long blocks = static_cast<long long>(B) * ceil_div(L, q.n_refresh);
    if (blocks > 2147483647LL)
        return OURO_ERR_UNSUPPORTED_SHAPE;
    const int threads = C <= 64 ? 32 : (C <= 1024 ? 128 : 256);
    launch_kernel(outlier_fake_quant_kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), C * sizeof(uint16_t), stream,
                  x, x_is_fp32, y, y_is_fp32, L, C, q);
    return launch_status();
}

} // namespace ouro

extern "C" OURO_API ouroStatus_t ouroOutlierFakeQuant(const void* x, void* y, int x_is_fp32, int B, int L, int C,
                                                      const ouroActQuant_t* q, cudaStream_t stream)
{
    if (q == nullptr)
        return OURO_ERR_INVALID_ARGUMENT;
    return ouro::launch_outlier_fake_quant(x, x_is_fp32, y, x_is_fp32, B, L, C, *q, stream);
}
