// Outlier-split linear: argument validation, workspace layout, path dispatch, the five-step pipeline.
#include "outlier_linear.cuh"

#include <algorithm>

namespace ouro
{
namespace
{

struct LinearSizes
{
    size_t a_in, w8, acc_in, acc_out, a_out, s_out, row_s, slot, count, flag;

    size_t total() const
    {
        return align_up(a_in) + align_up(w8) + align_up(acc_in) + align_up(acc_out) + align_up(a_out)
            + align_up(s_out) + align_up(row_s) + 2 * align_up(slot) + align_up(count) + align_up(flag);
    }
};

size_t num_windows(int M, int L, int n_refresh)
{
    return static_cast<size_t>(M / L) * static_cast<size_t>(ceil_div(L, n_refresh));
}

LinearSizes sizes_of(int M, int L, int K, int N, int w_bits, int bits_outlier, int n_refresh, int max_outliers)
{
    const size_t BW = num_windows(M, L, n_refresh);
    const size_t MN = static_cast<size_t>(M) * N;
    LinearSizes s;
    s.a_in = static_cast<size_t>(M) * K;
    s.w8 = w_bits == 4 ? static_cast<size_t>(N) * K : 0;
    s.acc_in = MN * sizeof(int32_t);
    s.acc_out = MN * sizeof(int32_t); // int32 or fp32
    s.a_out = static_cast<size_t>(M) * max_outliers * (bits_outlier >= 16 ? 2 : 1);
    s.s_out = static_cast<size_t>(M) * sizeof(float);
    s.row_s = static_cast<size_t>(M) * sizeof(float);
    s.slot = BW * max_outliers * sizeof(int32_t);
    s.count = BW * sizeof(int32_t);
    s.flag = sizeof(int32_t);
    return s;
}

bool shape_ok(int M, int L, int K, int N, int n_refresh, int max_outliers)
{
    return M >= 1 && L >= 1 && K >= 1 && N >= 1 && n_refresh >= 1 && M % L == 0 && max_outliers >= 0
        && max_outliers <= K;
}

ouroStatus_t validate(const ouroOutlierLinearParams_t* p)
{
    if (p == nullptr)
        return OURO_ERR_INVALID_ARGUMENT;
    if (!shape_ok(p->M, p->L, p->K, p->N, p->act.n_refresh < 1 ? 1 : p->act.n_refresh, p->max_outliers))
        return OURO_ERR_INVALID_ARGUMENT;
    if (p->x_is_fp32 != 0 && p->x_is_fp32 != 1)
        return OURO_ERR_INVALID_ARGUMENT;
    if (p->w_bits != 4 && p->w_bits != 8)
        return OURO_ERR_INVALID_ARGUMENT;
    ouroStatus_t st = validate_act_quant(p->act, true);
    if (st != OURO_OK)
        return st;
    if (p->x == nullptr || p->w == nullptr || p->w_scale == nullptr || p->y == nullptr)
        return OURO_ERR_INVALID_ARGUMENT;
    if (p->K > kMaxK || p->L > kMaxTokens || (p->w_bits == 4 && p->K % 2 != 0))
        return OURO_ERR_UNSUPPORTED_SHAPE;
    const void* a16[] = {p->x, p->w, p->y, p->workspace, p->acc_inlier, p->acc_outlier, p->inlier_codes,
                         p->outlier_mask};
    for (const void* q : a16)
        if (q && !is_aligned(q, 16))
            return OURO_ERR_MISALIGNED;
    const void* a4[] = {p->w_scale, p->bias, p->act.scale, p->act.theta};
    for (const void* q : a4)
        if (q && !is_aligned(q, 4))
            return OURO_ERR_MISALIGNED;
    const size_t need = sizes_of(p->M, p->L, p->K, p->N, p->w_bits, p->act.bits_outlier, p->act.n_refresh,
                                 p->max_outliers)
                            .total();
    if (p->workspace == nullptr || p->workspace_size < need)
        return OURO_ERR_WORKSPACE;
    if (num_windows(p->M, p->L, p->act.n_refresh) > 2147483647ull)
        return OURO_ERR_UNSUPPORTED_SHAPE;
    return OURO_OK;
}

LinearDev make_dev(const ouroOutlierLinearParams_t* p, ouroGemmPath_t path)
{
    LinearDev d{};
    d.M = p->M;
    d.L = p->L;
    d.K = p->K;
    d.N = p->N;
    d.n_refresh = p->act.n_refresh;
    d.W = ceil_div(p->L, p->act.n_refresh);
    d.max_outliers = p->max_outliers;
    d.w_bits = p->w_bits;
    d.x_is_fp32 = p->x_is_fp32;
    d.bits_in = p->act.bits;
    d.bits_out = p->act.bits_outlier;
    d.policy = p->act.policy;
    d.k_sigma = p->act.k_sigma;
    d.x = p->x;
    d.w = p->w;
    d.w_scale = p->w_scale;
    d.bias = p->bias;
    d.s_in = p->act.scale;
    d.theta = p->act.theta;
    d.y = p->y;
    const LinearSizes s = sizes_of(p->M, p->L, p->K, p->N, p->w_bits, p->act.bits_outlier, p->act.n_refresh,
                                   p->max_outliers);
    WsCarver ws(p->workspace);
    d.a_in = static_cast<int8_t*>(ws.take(s.a_in));
    d.w8 = static_cast<int8_t*>(ws.take(s.w8));
    d.acc_in = static_cast<int32_t*>(ws.take(s.acc_in));
    d.acc_out = ws.take(s.acc_out);
    d.a_out = ws.take(s.a_out);
    d.s_out = static_cast<float*>(ws.take(s.s_out));
    d.row_s_in = static_cast<float*>(ws.take(s.row_s));
    d.slot_chan = static_cast<int32_t*>(ws.take(s.slot));
    d.slot_first = static_cast<int32_t*>(ws.take(s.slot));
    d.count = static_cast<int32_t*>(ws.take(s.count));
    d.flag = static_cast<int32_t*>(ws.take(s.flag));
    d.packed_s4 = path == OURO_PATH_SM80_S4_TENSORCORE;
    d.dbg_acc_in = p->acc_inlier;
    d.dbg_acc_out = p->acc_outlier;
    d.dbg_codes = p->inlier_codes;
    d.dbg_mask = p->outlier_mask;
    return d;
}

// Path selection by compute capability and shape. requested = OURO_PATH_NONE: automatic.
ouroStatus_t choose_path(const ouroOutlierLinearParams_t* p, ouroGemmPath_t requested, ouroGemmPath_t* path)
{
    int cc = 0;
    ouroStatus_t st = device_cc(&cc);
    if (st != OURO_OK)
        return st;
    if (cc < 80)
        return OURO_ERR_UNSUPPORTED_ARCH;
    const bool s4_arch = (cc == 80 || cc == 86 || cc == 87) && gemm_s4_compiled();
    const bool s4_operands = p->w_bits == 4 && p->act.bits <= 4;
    const bool s4_shape = p->K % 32 == 0 && p->N % 4 == 0;
    const bool s8_shape = p->K % 16 == 0 && p->N % 4 == 0;
    switch (requested)
    {
    case OURO_PATH_NONE:
        *path = (s4_arch && s4_operands && s4_shape) ? OURO_PATH_SM80_S4_TENSORCORE
            : s8_shape                               ? OURO_PATH_S8_TENSORCORE
                                                     : OURO_PATH_SIMT_FALLBACK;
        return OURO_OK;
    case OURO_PATH_SM80_S4_TENSORCORE:
        if (!s4_arch)
            return OURO_ERR_UNSUPPORTED_ARCH;
        if (!s4_operands)
            return OURO_ERR_INVALID_ARGUMENT;
        if (!s4_shape)
            return OURO_ERR_UNSUPPORTED_SHAPE;
        *path = requested;
        return OURO_OK;
    case OURO_PATH_S8_TENSORCORE:
        if (!s8_shape)
            return OURO_ERR_UNSUPPORTED_SHAPE;
        *path = requested;
        return OURO_OK;
    case OURO_PATH_SIMT_FALLBACK: *path = requested; return OURO_OK;
    }
    return OURO_ERR_INVALID_ARGUMENT;
}

// Epilogue selection. The fused epilogue (inlier dequantization inside the CUTLASS GEMM, outlier GEMM +
// dequantization + combination in one kernel) needs a tensor-core path, fp16 x/y, N % 8 == 0 and 16-byte
// aligned w_scale / bias (vector loads in the epilogue); it has no int32 accumulators to report, so the
// debug accumulator outputs select the separate (exact) epilogue.
ouroStatus_t choose_epilogue(const ouroOutlierLinearParams_t* p, ouroGemmPath_t path, ouroEpilogue_t requested,
                             ouroEpilogue_t* epi)
{
    const bool tensor_core = path == OURO_PATH_SM80_S4_TENSORCORE || path == OURO_PATH_S8_TENSORCORE;
    const bool shape_ok = tensor_core && p->x_is_fp32 == 0 && p->N % 8 == 0 && is_aligned(p->w_scale, 16)
        && (p->bias == nullptr || is_aligned(p->bias, 16));
    const bool wants_acc = p->acc_inlier != nullptr || p->acc_outlier != nullptr;
    switch (requested)
    {
    case OURO_EPILOGUE_AUTO: *epi = shape_ok && !wants_acc ? OURO_EPILOGUE_FUSED : OURO_EPILOGUE_SEPARATE; return OURO_OK;
    case OURO_EPILOGUE_SEPARATE: *epi = requested; return OURO_OK;
    case OURO_EPILOGUE_FUSED:
        if (wants_acc)
            return OURO_ERR_INVALID_ARGUMENT;
        if (!shape_ok)
            return OURO_ERR_UNSUPPORTED_SHAPE;
        *epi = requested;
        return OURO_OK;
    }
    return OURO_ERR_INVALID_ARGUMENT;
}

ouroStatus_t launched()
{
    return cudaGetLastError() == cudaSuccess ? OURO_OK : OURO_ERR_CUDA;
}

// One pipeline step (0..4, numbering of ouroOutlierLinearProfiled). With the fused epilogue, step 2 also
// dequantizes the inlier term, step 3 also adds the outlier term, and step 4 has nothing left to do.
ouroStatus_t run_step(int step, const LinearDev& d, ouroGemmPath_t path, bool fused, cudaStream_t stream)
{
    const unsigned BW = static_cast<unsigned>(num_windows(d.M, d.L, d.n_refresh));
    switch (step)
    {
    case 0:
        if (cudaMemsetAsync(d.flag, 0, sizeof(int32_t), stream) != cudaSuccess)
            return OURO_ERR_CUDA;
        launch_kernel(outlier_extract_kernel, dim3(BW), dim3(kExtractThreads), d.K * sizeof(uint16_t), stream, d);
        return launched();
    case 1:
        launch_kernel(inlier_quant_kernel, dim3(static_cast<unsigned>(d.M)), dim3(kQuantThreads), 2 * d.K, stream, d);
        if (d.w_bits == 4 && path == OURO_PATH_S8_TENSORCORE)
        {
            const size_t n = static_cast<size_t>(d.N) * d.K;
            const unsigned blocks = static_cast<unsigned>(std::min<size_t>((n + 255) / 256, 65535));
            launch_kernel(unpack_w4_kernel, dim3(blocks), dim3(256), 0, stream, d.w, d.w8, d.N, d.K);
        }
        return launched();
    case 2:
        if (fused)
        {
            const InlierDequant e{d.row_s_in, d.w_scale, d.bias, static_cast<__half*>(d.y)};
            if (path == OURO_PATH_SM80_S4_TENSORCORE)
                return gemm_s4_tensorcore_dequant(d.M, d.N, d.K, d.a_in, d.w, e, stream);
            return gemm_s8_tensorcore_dequant(d.M, d.N, d.K, d.a_in, d.w_bits == 4 ? d.w8 : d.w, e, stream);
        }
        switch (path)
        {
        case OURO_PATH_SM80_S4_TENSORCORE: return gemm_s4_tensorcore(d.M, d.N, d.K, d.a_in, d.w, d.acc_in, stream);
        case OURO_PATH_S8_TENSORCORE:
            return gemm_s8_tensorcore(d.M, d.N, d.K, d.a_in, d.w_bits == 4 ? d.w8 : d.w, d.acc_in, stream);
        case OURO_PATH_SIMT_FALLBACK: return gemm_simt(d.M, d.N, d.K, d.a_in, d.w, d.w_bits, d.acc_in, stream);
        default: return OURO_ERR_INVALID_ARGUMENT;
        }
    case 3:
    {
        const dim3 grid(BW, static_cast<unsigned>(ceil_div(d.N, kOutGemmThreads)));
        const bool fp16_out = d.bits_out >= 16;
        auto* kernel = fused ? (fp16_out ? outlier_gemm_kernel<true, true> : outlier_gemm_kernel<false, true>)
                             : (fp16_out ? outlier_gemm_kernel<true, false> : outlier_gemm_kernel<false, false>);
        launch_kernel(kernel, grid, dim3(kOutGemmThreads), 0, stream, d);
        return launched();
    }
    case 4:
    {
        if (fused)
            return OURO_OK;
        const dim3 grid(static_cast<unsigned>(ceil_div(d.N, kCombineThreads)), static_cast<unsigned>(std::min(d.M, 65535)));
        launch_kernel(combine_kernel, grid, dim3(kCombineThreads), 0, stream, d);
        return launched();
    }
    }
    return OURO_ERR_INVALID_ARGUMENT;
}

ouroStatus_t run_pipeline(const ouroOutlierLinearParams_t* p, ouroGemmPath_t requested, ouroEpilogue_t requested_epi,
                          cudaStream_t stream, ouroGemmPath_t* path_out, ouroEpilogue_t* epi_out, float* step_ms)
{
    if (path_out)
        *path_out = OURO_PATH_NONE;
    if (epi_out)
        *epi_out = OURO_EPILOGUE_AUTO;
    ouroStatus_t st = validate(p);
    if (st != OURO_OK)
        return st;
    ouroGemmPath_t path = OURO_PATH_NONE;
    st = choose_path(p, requested, &path);
    if (st != OURO_OK)
        return st;
    ouroEpilogue_t epi = OURO_EPILOGUE_AUTO;
    st = choose_epilogue(p, path, requested_epi, &epi);
    if (st != OURO_OK)
        return st;
    const bool fused = epi == OURO_EPILOGUE_FUSED;
    const LinearDev d = make_dev(p, path);
    cudaEvent_t ev[6] = {};
    if (step_ms)
        for (auto& e : ev)
            if (cudaEventCreate(&e) != cudaSuccess)
                return OURO_ERR_CUDA;
    for (int s = 0; s < 5 && st == OURO_OK; ++s)
    {
        if (step_ms)
            cudaEventRecord(ev[s], stream);
        st = run_step(s, d, path, fused, stream);
    }
    if (step_ms)
    {
        cudaEventRecord(ev[5], stream);
        if (cudaEventSynchronize(ev[5]) != cudaSuccess && st == OURO_OK)
            st = OURO_ERR_CUDA;
        for (int s = 0; s < 5; ++s)
        {
            step_ms[s] = 0.f;
            if (st == OURO_OK)
                cudaEventElapsedTime(&step_ms[s], ev[s], ev[s + 1]);
        }
        for (auto& e : ev)
            cudaEventDestroy(e);
        if (st == OURO_OK)
        {
            int32_t flag = 0;
            if (cudaMemcpy(&flag, d.flag, sizeof(flag), cudaMemcpyDeviceToHost) != cudaSuccess)
                return OURO_ERR_CUDA;
            if (flag)
                st = OURO_ERR_OUTLIER_CAPACITY;
        }
    }
    if (path_out)
        *path_out = path;
    if (epi_out)
        *epi_out = epi;
    return st;
}

} // namespace
} // namespace ouro

using namespace ouro;

extern "C" OURO_API size_t ouroOutlierLinearWorkspaceSize(int M, int L, int K, int N, int w_bits, int act_bits,
                                                          int bits_outlier, int n_refresh, int max_outliers)
{
    (void) act_bits;
    if (!shape_ok(M, L, K, N, n_refresh, max_outliers))
        return 0;
    return sizes_of(M, L, K, N, w_bits, bits_outlier, n_refresh, max_outliers).total();
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinear(const ouroOutlierLinearParams_t* p, cudaStream_t stream,
                                                   ouroGemmPath_t* path_out)
{
    return run_pipeline(p, OURO_PATH_NONE, OURO_EPILOGUE_AUTO, stream, path_out, nullptr, nullptr);
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinearWithPath(const ouroOutlierLinearParams_t* p,
                                                           ouroGemmPath_t requested, cudaStream_t stream,
                                                           ouroGemmPath_t* path_out)
{
    return run_pipeline(p, requested, OURO_EPILOGUE_AUTO, stream, path_out, nullptr, nullptr);
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinearProfiled(const ouroOutlierLinearParams_t* p, cudaStream_t stream,
                                                           ouroGemmPath_t* path_out, float step_ms[5])
{
    if (step_ms == nullptr)
        return OURO_ERR_INVALID_ARGUMENT;
    return run_pipeline(p, OURO_PATH_NONE, OURO_EPILOGUE_AUTO, stream, path_out, nullptr, step_ms);
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinearProfiledWithPath(const ouroOutlierLinearParams_t* p,
                                                                   ouroGemmPath_t requested, cudaStream_t stream,
                                                                   ouroGemmPath_t* path_out, float step_ms[5])
{
    if (step_ms == nullptr)
        return OURO_ERR_INVALID_ARGUMENT;
    return run_pipeline(p, requested, OURO_EPILOGUE_AUTO, stream, path_out, nullptr, step_ms);
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinearEx(const ouroOutlierLinearParams_t* p, ouroGemmPath_t requested_path,
                                                     ouroEpilogue_t requested_epilogue, cudaStream_t stream,
                                                     ouroGemmPath_t* path_out, ouroEpilogue_t* epilogue_out,
                                                     float* step_ms)
{
    return run_pipeline(p, requested_path, requested_epilogue, stream, path_out, epilogue_out, step_ms);
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinearCheck(const ouroOutlierLinearParams_t* p, cudaStream_t stream)
{
    const ouroStatus_t st = validate(p);
    if (st != OURO_OK)
        return st;
    const LinearDev d = make_dev(p, OURO_PATH_NONE);
    int32_t flag = 0;
    if (cudaStreamSynchronize(stream) != cudaSuccess
        || cudaMemcpy(&flag, d.flag, sizeof(flag), cudaMemcpyDeviceToHost) != cudaSuccess)
        return OURO_ERR_CUDA;
    return flag ? OURO_ERR_OUTLIER_CAPACITY : OURO_OK;
}
