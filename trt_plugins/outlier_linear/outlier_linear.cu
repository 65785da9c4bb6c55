// Outlier-split linear, host side: argument validation, the choice of path / epilogue / tile (one function,
// `resolve`, used by the launches and by the launch plans), workspace layouts, the two variants
//   FUSED     activation prep + one fused tensor-core GEMM (fused_gemm.cuh)
//   SEPARATE  the five-kernel exact pipeline (outlier_linear.cuh + the CUTLASS / SIMT GEMMs)
// and ouroOutlierLinearPlan, which lists the kernels a call launches with their traffic and MMA work.
#include "fused.h"
#include "gemm.cuh"
#include "outlier_linear.cuh"
#include "window_prep.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace ouro
{
namespace
{

struct Problem
{
    int M, L, K, N, w_bits, act_bits, bits_out, n_refresh, max_outliers, x_is_fp32;

    size_t windows() const { return static_cast<size_t>(M / L) * static_cast<size_t>(ceil_div(L, n_refresh)); }
    bool fp16_outliers() const { return bits_out >= 16; }
};

Problem problem_of(const ouroOutlierLinearParams_t* p)
{
    return Problem{p->M, p->L, p->K, p->N, p->w_bits, p->act.bits, p->act.bits_outlier, p->act.n_refresh,
                   p->max_outliers, p->x_is_fp32};
}

// Workspace layout. The capacity flag comes first in both layouts, so ouroOutlierLinearCheck finds it
// without knowing which epilogue ran.
struct LinearSizes
{
    size_t flag, a_in, w8, acc_in, acc_out, a_out, s_out, row_s, slot, count;

    size_t total() const
    {
        return align_up(flag) + align_up(a_in) + align_up(w8) + align_up(acc_in) + align_up(acc_out) + align_up(a_out)
            + align_up(s_out) + align_up(row_s) + 2 * align_up(slot) + align_up(count);
    }
};

LinearSizes sizes_of(const Problem& pr, ouroEpilogue_t epi)
{
    const bool sep = epi != OURO_EPILOGUE_FUSED;
    const size_t BW = pr.windows();
    const size_t MN = static_cast<size_t>(pr.M) * pr.N;
    LinearSizes s{};
    s.flag = sizeof(int32_t);
    s.a_in = static_cast<size_t>(pr.M) * pr.K; // int8 codes (packed int4 uses half)
    s.w8 = sep && pr.w_bits == 4 ? static_cast<size_t>(pr.N) * pr.K : 0;
    s.acc_in = sep ? MN * sizeof(int32_t) : 0;
    s.acc_out = sep ? MN * sizeof(int32_t) : 0; // int32 or fp32
    s.a_out = static_cast<size_t>(pr.M) * pr.max_outliers * (pr.fp16_outliers() ? 2 : 1);
    s.s_out = static_cast<size_t>(pr.M) * sizeof(float);
    s.row_s = sep ? static_cast<size_t>(pr.M) * sizeof(float) : 0;
    s.slot = BW * pr.max_outliers * sizeof(int32_t);
    s.count = BW * sizeof(int32_t);
    return s;
}

bool shape_ok(int M, int L, int K, int N, int n_refresh, int max_outliers)
{
    return M >= 1 && L >= 1 && K >= 1 && N >= 1 && n_refresh >= 1 && M % L == 0 && max_outliers >= 0
        && max_outliers <= K;
}

// Everything but the exact workspace size (which depends on the epilogue chosen).
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
    if (problem_of(p).windows() > 2147483647ull)
        return OURO_ERR_UNSUPPORTED_SHAPE;
    // Smaller than the smallest layout (the fused one): an error before the GPU is touched; the exact size of the
    // epilogue chosen is checked once it is known.
    if (p->workspace == nullptr || p->workspace_size < sizes_of(problem_of(p), OURO_EPILOGUE_FUSED).total())
        return OURO_ERR_WORKSPACE;
    return OURO_OK;
}

struct Device
{
    int cc, num_sms;
};

ouroStatus_t query_device(Device* dev)
{
    ouroStatus_t st = device_cc(&dev->cc);
    if (st != OURO_OK)
        return st;
    int d = 0;
    if (cudaGetDevice(&d) != cudaSuccess || cudaDeviceGetAttribute(&dev->num_sms, cudaDevAttrMultiProcessorCount, d) != cudaSuccess)
        return OURO_ERR_CUDA;
    return OURO_OK;
}

struct Choice
{
    ouroGemmPath_t path;
    ouroEpilogue_t epi;
    int tile; // index into fused::kTiles (FUSED), -1 (SEPARATE)
    int op;   // fused::Op (FUSED)
};

bool fused_shape_ok(const Problem& pr)
{
    return pr.K <= fused::kMaxKFused && (pr.w_bits == 8 ? pr.K % 16 == 0 : pr.K % 32 == 0);
}

bool s4_arch(int cc)
{
    return cc == 80 || cc == 86 || cc == 87 || cc == 89; // int4 MMA at twice the int8 rate (not on sm_90)
}

// Registers per thread of the fused GEMM, as reported by ptxas for these tiles (an input of the tile heuristic).
int gemm_regs(const fused::TileShape& t)
{
    const int mi_ni = (t.bm / t.warps_m / 16) * (t.bn / t.warps_n / 8);
    return 96 + 6 * mi_ni;
}

// Automatic tile: the least modelled time on num_sms SMs. Per SM: ceil(CTAs / SMs) tiles of bm x bn, each
// costing bm * bn * (1 + 32/bm + 32/bn) (operand loads per MAC), divided by the fraction of the SM the
// resident warps can keep busy (one CTA of 2 warps does not fill an SM; 8 warps do).
int auto_tile(const Problem& pr, int op, const Device& dev)
{
    int best = 0;
    double best_cost = 1e300;
    for (int i = 0; i < fused::kNumTiles; ++i)
    {
        const fused::TileShape& t = fused::kTiles[i];
        const double ctas = static_cast<double>(ceil_div(pr.M, t.bm)) * ceil_div(pr.N, t.bn);
        const int threads = fused::gemm_threads(t);
        const size_t smem = fused::gemm_smem_bytes(op, pr.fp16_outliers(), t, pr.K);
        const int occ = std::max(1, std::min({static_cast<int>(99 * 1024 / smem), 2048 / threads,
                                              65536 / (threads * gemm_regs(t))}));
        const double per_sm = std::ceil(ctas / std::max(dev.num_sms, 1));
        const double warps = std::min<double>(occ, per_sm) * threads / 32.0;
        const double busy = std::min(1.0, warps / 8.0);
        const double cost = per_sm * t.bm * t.bn * (1.0 + 32.0 / t.bm + 32.0 / t.bn) / busy;
        if (cost < best_cost * (1 - 1e-9))
        {
            best = i;
            best_cost = cost;
        }
    }
    return best;
}

// The one decision procedure: path, epilogue and tile from the request, the shape and the device.
ouroStatus_t resolve(const Problem& pr, const ouroOutlierLinearConfig_t& cfg, const Device& dev, Choice* out)
{
    if (dev.cc < 80)
        return OURO_ERR_UNSUPPORTED_ARCH;
    const ouroGemmPath_t P = cfg.path;
    const ouroEpilogue_t E = cfg.epilogue;
    if (P == OURO_PATH_SM90_WGMMA)
        return OURO_ERR_NOT_IMPLEMENTED;
    if (P != OURO_PATH_NONE && P != OURO_PATH_SM80_S4_TENSORCORE && P != OURO_PATH_S8_TENSORCORE
        && P != OURO_PATH_SIMT_FALLBACK)
        return OURO_ERR_INVALID_ARGUMENT;
    if (E != OURO_EPILOGUE_AUTO && E != OURO_EPILOGUE_FUSED && E != OURO_EPILOGUE_SEPARATE)
        return OURO_ERR_INVALID_ARGUMENT;
    const bool s4_ops = pr.w_bits == 4 && pr.act_bits <= 4;
    Choice c{OURO_PATH_NONE, OURO_EPILOGUE_SEPARATE, -1, 0};
    // epilogue
    if (E == OURO_EPILOGUE_FUSED)
    {
        if (P == OURO_PATH_SIMT_FALLBACK || !fused_shape_ok(pr))
            return OURO_ERR_UNSUPPORTED_SHAPE;
        c.epi = OURO_EPILOGUE_FUSED;
    }
    else if (E == OURO_EPILOGUE_AUTO)
        c.epi = P != OURO_PATH_SIMT_FALLBACK && fused_shape_ok(pr) ? OURO_EPILOGUE_FUSED : OURO_EPILOGUE_SEPARATE;
    // path
    if (c.epi == OURO_EPILOGUE_FUSED)
    {
        const bool s4_ok = s4_arch(dev.cc) && fused::gemm_s4_compiled() && s4_ops && !pr.fp16_outliers();
        if (P == OURO_PATH_SM80_S4_TENSORCORE)
        {
            if (!(s4_arch(dev.cc) && fused::gemm_s4_compiled()))
                return OURO_ERR_UNSUPPORTED_ARCH;
            if (!s4_ops)
                return OURO_ERR_INVALID_ARGUMENT;
            if (pr.fp16_outliers())
                return OURO_ERR_UNSUPPORTED_SHAPE;
        }
        c.path = P == OURO_PATH_NONE ? (s4_ok ? OURO_PATH_SM80_S4_TENSORCORE : OURO_PATH_S8_TENSORCORE) : P;
        c.op = c.path == OURO_PATH_SM80_S4_TENSORCORE ? fused::kOpS4
            : pr.w_bits == 4                          ? fused::kOpS8W4
                                                      : fused::kOpS8W8;
        if (cfg.tactic < 0 || cfg.tactic > fused::kNumTiles)
            return OURO_ERR_INVALID_ARGUMENT;
        c.tile = cfg.tactic == 0 ? auto_tile(pr, c.op, dev) : cfg.tactic - 1;
    }
    else
    {
        if (cfg.tactic != 0)
            return OURO_ERR_INVALID_ARGUMENT; // tactics are tiles of the fused kernel
        const bool s4_ok = s4_arch(dev.cc) && gemm_s4_compiled();
        const bool s4_shape = pr.K % 32 == 0 && pr.N % 4 == 0;
        const bool s8_shape = pr.K % 16 == 0 && pr.N % 4 == 0;
        switch (P)
        {
        case OURO_PATH_NONE:
            c.path = (s4_ok && s4_ops && s4_shape) ? OURO_PATH_SM80_S4_TENSORCORE
                : s8_shape                         ? OURO_PATH_S8_TENSORCORE
                                                   : OURO_PATH_SIMT_FALLBACK;
            break;
        case OURO_PATH_SM80_S4_TENSORCORE:
            if (!s4_ok)
                return OURO_ERR_UNSUPPORTED_ARCH;
            if (!s4_ops)
                return OURO_ERR_INVALID_ARGUMENT;
            if (!s4_shape)
                return OURO_ERR_UNSUPPORTED_SHAPE;
            c.path = P;
            break;
        case OURO_PATH_S8_TENSORCORE:
            if (!s8_shape)
                return OURO_ERR_UNSUPPORTED_SHAPE;
            c.path = P;
            break;
        default: c.path = P; break;
        }
    }
    *out = c;
    return OURO_OK;
}

// ------------------------------------------------------------------ SEPARATE: the five-kernel pipeline
LinearDev make_dev(const ouroOutlierLinearParams_t* p, ouroGemmPath_t path, int32_t* report)
{
    const Problem pr = problem_of(p);
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
    d.std_correction = p->act.std_correction;
    d.x = p->x;
    d.w = p->w;
    d.w_scale = p->w_scale;
    d.bias = p->bias;
    d.s_in = p->act.scale;
    d.theta = p->act.theta;
    d.y = p->y;
    const LinearSizes s = sizes_of(pr, OURO_EPILOGUE_SEPARATE);
    WsCarver ws(p->workspace);
    d.flag = static_cast<int32_t*>(ws.take(s.flag));
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
    d.report = report;
    d.packed_s4 = path == OURO_PATH_SM80_S4_TENSORCORE;
    d.dbg_acc_in = p->acc_inlier;
    d.dbg_acc_out = p->acc_outlier;
    d.dbg_codes = p->inlier_codes;
    d.dbg_mask = p->outlier_mask;
    return d;
}

// One step (0..4, numbering of ouroOutlierLinearProfiled) of the separate pipeline.
ouroStatus_t run_separate_step(int step, const LinearDev& d, ouroGemmPath_t path, cudaStream_t stream)
{
    const unsigned BW = static_cast<unsigned>(static_cast<size_t>(d.M / d.L) * d.W);
    switch (step)
    {
    case 0:
        launch_kernel(outlier_extract_kernel, dim3(BW), dim3(kExtractThreads), d.K * sizeof(uint16_t), stream, d);
        return launch_status();
    case 1:
        launch_kernel(inlier_quant_kernel, dim3(static_cast<unsigned>(d.M)), dim3(kQuantThreads), 2 * d.K, stream, d);
        if (launch_status() != OURO_OK)
            return OURO_ERR_CUDA;
        if (d.w_bits == 4 && path == OURO_PATH_S8_TENSORCORE)
        {
            // The exact variant unpacks 4-bit weights per call; the fused path never does (it unpacks in registers).
            const size_t n = static_cast<size_t>(d.N) * d.K;
            const unsigned blocks = static_cast<unsigned>(std::min<size_t>((n + 255) / 256, 65535));
            launch_kernel(unpack_w4_kernel, dim3(blocks), dim3(256), 0, stream, d.w, d.w8, d.N, d.K);
        }
        return launch_status();
    case 2:
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
        auto* kernel = d.bits_out >= 16 ? outlier_gemm_kernel<true> : outlier_gemm_kernel<false>;
        launch_kernel(kernel, grid, dim3(kOutGemmThreads), 0, stream, d);
        return launch_status();
    }
    case 4:
    {
        const dim3 grid(static_cast<unsigned>(ceil_div(d.N, kCombineThreads)),
                        static_cast<unsigned>(std::min(d.M, 65535)));
        launch_kernel(combine_kernel, grid, dim3(kCombineThreads), 0, stream, d);
        return launch_status();
    }
    }
    return OURO_ERR_INVALID_ARGUMENT;
}

// ------------------------------------------------------------------ FUSED: prep + fused GEMM
struct FusedLaunch
{
    fused::PrepArgs prep;
    fused::GemmArgs gemm;
};

FusedLaunch make_fused(const ouroOutlierLinearParams_t* p, const Choice& c, int32_t* report)
{
    const Problem pr = problem_of(p);
    const LinearSizes s = sizes_of(pr, OURO_EPILOGUE_FUSED);
    WsCarver ws(p->workspace);
    int32_t* flag = static_cast<int32_t*>(ws.take(s.flag));
    int8_t* a_in = static_cast<int8_t*>(ws.take(s.a_in));
    void* a_out = ws.take(s.a_out);
    float* s_out = static_cast<float*>(ws.take(s.s_out));
    int32_t* slot_chan = static_cast<int32_t*>(ws.take(s.slot));
    int32_t* slot_first = static_cast<int32_t*>(ws.take(s.slot));
    int32_t* count = static_cast<int32_t*>(ws.take(s.count));
    FusedLaunch f{};
    fused::PrepArgs& a = f.prep;
    a.M = p->M;
    a.L = p->L;
    a.K = p->K;
    a.n_refresh = p->act.n_refresh;
    a.max_outliers = p->max_outliers;
    a.ring = prep_ring(p->K, p->x_is_fp32 ? 4 : 2, p->act.n_refresh);
    a.q = p->act;
    a.x = p->x;
    a.a_in = a_in;
    a.a_out = a_out;
    a.s_out = s_out;
    a.slot_chan = slot_chan;
    a.slot_first = slot_first;
    a.count = count;
    a.flag = flag;
    a.report = report;
    a.dbg_codes = p->inlier_codes;
    a.dbg_mask = p->outlier_mask;
    fused::GemmArgs& g = f.gemm;
    g.M = p->M;
    g.L = p->L;
    g.K = p->K;
    g.N = p->N;
    g.W = ceil_div(p->L, p->act.n_refresh);
    g.n_refresh = p->act.n_refresh;
    g.max_outliers = p->max_outliers;
    g.w_bits = p->w_bits;
    g.y_is_fp32 = p->x_is_fp32;
    g.a = a_in;
    g.w = p->w;
    g.w_scale = p->w_scale;
    g.bias = p->bias;
    g.s_in = p->act.scale;
    g.s_out = s_out;
    g.a_out = a_out;
    g.slot_chan = slot_chan;
    g.slot_first = slot_first;
    g.count = count;
    g.y = p->y;
    g.dbg_acc_in = p->acc_inlier;
    g.dbg_acc_out = pr.fp16_outliers() ? nullptr : p->acc_outlier;
    (void) c;
    return f;
}

ouroStatus_t run_fused_step(int step, const FusedLaunch& f, const Choice& c, cudaStream_t stream)
{
    switch (step)
    {
    case 0: return fused::launch_prep(f.prep, f.gemm.y_is_fp32 != 0, c.op == fused::kOpS4, stream);
    case 2:
        switch (c.op)
        {
        case fused::kOpS4: return fused::launch_gemm_s4(f.gemm, c.tile, stream);
        case fused::kOpS8W4: return fused::launch_gemm_s8w4(f.gemm, f.prep.q.bits_outlier >= 16, c.tile, stream);
        default: return fused::launch_gemm_s8w8(f.gemm, f.prep.q.bits_outlier >= 16, c.tile, stream);
        }
    default: return OURO_OK; // steps 1, 3, 4 are part of the two kernels above
    }
}

ouroOutlierLinearConfig_t auto_config()
{
    ouroOutlierLinearConfig_t c{};
    c.path = OURO_PATH_NONE;
    c.epilogue = OURO_EPILOGUE_AUTO;
    return c;
}

ouroStatus_t run(const ouroOutlierLinearParams_t* p, const ouroOutlierLinearConfig_t* cfg_in, cudaStream_t stream,
                 ouroOutlierLinearChoice_t* ran, float* step_ms)
{
    if (ran)
        *ran = ouroOutlierLinearChoice_t{OURO_PATH_NONE, OURO_EPILOGUE_AUTO, 0};
    ouroStatus_t st = validate(p);
    if (st != OURO_OK)
        return st;
    const ouroOutlierLinearConfig_t cfg = cfg_in ? *cfg_in : auto_config();
    Device dev{};
    st = query_device(&dev);
    if (st != OURO_OK)
        return st;
    Choice c{};
    st = resolve(problem_of(p), cfg, dev, &c);
    if (st != OURO_OK)
        return st;
    if (p->workspace == nullptr || p->workspace_size < sizes_of(problem_of(p), c.epi).total())
        return OURO_ERR_WORKSPACE;
    const bool fused_epi = c.epi == OURO_EPILOGUE_FUSED;
    const LinearDev sep = fused_epi ? LinearDev{} : make_dev(p, c.path, cfg.overflow_report);
    const FusedLaunch fl = fused_epi ? make_fused(p, c, cfg.overflow_report) : FusedLaunch{};
    int32_t* flag = static_cast<int32_t*>(p->workspace); // first in both layouts
    if (cudaMemsetAsync(flag, 0, sizeof(int32_t), stream) != cudaSuccess)
        return OURO_ERR_CUDA;
    cudaEvent_t ev[6] = {};
    if (step_ms)
        for (auto& e : ev)
            if (cudaEventCreate(&e) != cudaSuccess)
                return OURO_ERR_CUDA;
    for (int s = 0; s < 5 && st == OURO_OK; ++s)
    {
        if (step_ms)
            cudaEventRecord(ev[s], stream);
        st = fused_epi ? run_fused_step(s, fl, c, stream) : run_separate_step(s, sep, c.path, stream);
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
            int32_t h = 0;
            if (cudaMemcpy(&h, flag, sizeof(h), cudaMemcpyDeviceToHost) != cudaSuccess)
                return OURO_ERR_CUDA;
            if (h)
                st = OURO_ERR_OUTLIER_CAPACITY;
        }
    }
    if (ran && st != OURO_ERR_CUDA)
        *ran = ouroOutlierLinearChoice_t{c.path, c.epi, fused_epi ? c.tile + 1 : 0};
    return st;
}

ouroStatus_t run_legacy(const ouroOutlierLinearParams_t* p, ouroGemmPath_t path, ouroEpilogue_t epi,
                        cudaStream_t stream, ouroGemmPath_t* path_out, ouroEpilogue_t* epi_out, float* step_ms)
{
    ouroOutlierLinearConfig_t cfg = auto_config();
    cfg.path = path;
    cfg.epilogue = epi;
    ouroOutlierLinearChoice_t ran{};
    const ouroStatus_t st = run(p, &cfg, stream, &ran, step_ms);
    if (path_out)
        *path_out = ran.path;
    if (epi_out)
        *epi_out = ran.epilogue;
    return st;
}

// ------------------------------------------------------------------ launch plans (traffic model)
double union_channels(double windows, const ouroOutlierStats_t& st, int K)
{
    const double c = std::max(0.0, st.window_channels);
    if (c <= 0)
        return 0.0;
    const double P = st.hot_channels > 0 ? std::max(st.hot_channels, c) : static_cast<double>(K);
    return P * (1.0 - std::pow(1.0 - c / P, windows));
}

void set_name(ouroKernelCost_t& k, const char* name)
{
    std::snprintf(k.name, sizeof(k.name), "%s", name);
}

int plan_kernels(const Problem& pr, const Choice& c, const ouroOutlierStats_t& st, ouroKernelCost_t* out, int max_out)
{
    ouroKernelCost_t ks[5] = {};
    int n = 0;
    const double M = pr.M, K = pr.K, N = pr.N, L = pr.L;
    const double BW = static_cast<double>(pr.windows());
    const double xb = pr.x_is_fp32 ? 4 : 2, yb = xb;
    const double ob = pr.fp16_outliers() ? 2 : 1;
    const double cw = std::min(std::max(0.0, st.window_channels), K); // channels per window list
    const double wbytes = N * K * (pr.w_bits == 4 ? 0.5 : 1.0);
    const double tables = N * 4 * 2 + L * 4 * 2; // w_scale, bias, S_I, theta
    const double lists = BW * (cw * 8 + 4);      // slot_chan, slot_first, count
    if (c.epi == OURO_EPILOGUE_FUSED)
    {
        const bool s4 = c.op == fused::kOpS4;
        const double code_bytes = M * K * (s4 ? 0.5 : 1.0);
        // kernel 1: activation prep
        ouroKernelCost_t& p = ks[n++];
        set_name(p, "act_prep");
        const int ring = prep_ring(pr.K, static_cast<int>(xb), pr.n_refresh);
        p.grid[0] = static_cast<unsigned>(BW);
        p.grid[1] = p.grid[2] = 1;
        p.block[0] = static_cast<unsigned>(prep_threads(pr.K));
        p.block[1] = p.block[2] = 1;
        p.smem_bytes = static_cast<unsigned>(prep_smem_bytes(pr.K, static_cast<int>(xb), ring));
        p.dram_read_bytes = M * K * xb + L * 8;
        p.dram_write_bytes = code_bytes + M * cw * ob + M * 4 + lists;
        p.l2_read_bytes = p.dram_read_bytes;
        p.simt_ops = M * K * 12;
        // kernel 2: fused GEMM
        const fused::TileShape& t = fused::kTiles[c.tile];
        ouroKernelCost_t& g = ks[n++];
        char name[48];
        std::snprintf(name, sizeof(name), "fused_gemm_%s_%s%s", c.op == fused::kOpS4 ? "s4" : c.op == fused::kOpS8W4 ? "s8w4" : "s8w8",
                      t.name, pr.fp16_outliers() ? "_f16out" : "");
        set_name(g, name);
        const double gm = ceil_div(pr.M, t.bm), gn = ceil_div(pr.N, t.bn);
        g.grid[0] = static_cast<unsigned>(gn);
        g.grid[1] = static_cast<unsigned>(gm);
        g.grid[2] = 1;
        g.block[0] = static_cast<unsigned>(fused::gemm_threads(t));
        g.block[1] = g.block[2] = 1;
        g.smem_bytes = static_cast<unsigned>(fused::gemm_smem_bytes(c.op, pr.fp16_outliers(), t, pr.K));
        g.mma_kind = s4 ? OURO_MMA_S4 : OURO_MMA_S8;
        g.mma_kind_outlier = pr.fp16_outliers() ? OURO_MMA_F16 : OURO_MMA_S8;
        const double kps = fused::k_per_stage(c.op);
        g.mma_ops = 2.0 * gm * t.bm * gn * t.bn * std::ceil(K / kps) * kps;
        const double win_per_tile = std::min(BW, t.bm / static_cast<double>(pr.n_refresh) + 1.0);
        const double U = std::min(union_channels(win_per_tile, st, pr.K), K);
        const double kstep = pr.fp16_outliers() ? 16 : 32;
        const double full = std::floor(U / fused::kUnionChunk);
        const double rest = U - full * fused::kUnionChunk;
        const double u_pad = full * fused::kUnionChunk + std::ceil(rest / kstep) * kstep;
        g.mma_ops_outlier = 2.0 * gm * t.bm * gn * t.bn * u_pad;
        const double row_out = M * cw * (ob + 8); // each row's codes + its window's slot entries
        g.dram_read_bytes = code_bytes + wbytes + tables + M * 4 + lists + M * cw * ob;
        g.dram_write_bytes = M * N * yb;
        const double gather = std::max(0.0, U - fused::kUnionChunk) * t.bn * 32.0; // strided W sectors, chunks >= 1
        g.l2_read_bytes = gn * (code_bytes + row_out + M * 4) + gm * wbytes + gm * gn * gather + tables;
        g.simt_ops = M * N * 8;
    }
    else
    {
        const bool s4 = c.path == OURO_PATH_SM80_S4_TENSORCORE;
        const double code_bytes = M * K * (s4 ? 0.5 : 1.0);
        const double rows_with_outliers = cw > 0 ? 1.0 : 0.0;
        ouroKernelCost_t& e = ks[n++];
        set_name(e, "outlier_extract");
        e.grid[0] = static_cast<unsigned>(BW);
        e.grid[1] = e.grid[2] = 1;
        e.block[0] = kExtractThreads;
        e.block[1] = e.block[2] = 1;
        e.smem_bytes = static_cast<unsigned>(pr.K * 2);
        e.dram_read_bytes = M * K * xb + L * 8;
        e.l2_read_bytes = 4 * M * K * xb; // detection passes + extraction passes over each window
        e.dram_write_bytes = M * cw * ob + M * 4 + lists;
        e.simt_ops = M * K * 20;
        ouroKernelCost_t& q = ks[n++];
        set_name(q, "inlier_quant");
        q.grid[0] = static_cast<unsigned>(pr.M);
        q.grid[1] = q.grid[2] = 1;
        q.block[0] = kQuantThreads;
        q.block[1] = q.block[2] = 1;
        q.smem_bytes = static_cast<unsigned>(2 * pr.K);
        const bool unpack = pr.w_bits == 4 && c.path == OURO_PATH_S8_TENSORCORE;
        q.dram_read_bytes = M * K * xb + (unpack ? wbytes : 0) + lists;
        q.dram_write_bytes = code_bytes + M * 4 + (unpack ? N * K : 0);
        q.l2_read_bytes = q.dram_read_bytes;
        q.simt_ops = M * K * 6;
        ouroKernelCost_t& g = ks[n++];
        set_name(g, c.path == OURO_PATH_SIMT_FALLBACK ? "gemm_simt" : s4 ? "cutlass_gemm_s4_128x128" : "cutlass_gemm_s8_128x128");
        const double tile = c.path == OURO_PATH_SIMT_FALLBACK ? 16 : 128;
        const double gm = std::ceil(M / tile), gn = std::ceil(N / tile);
        g.grid[0] = static_cast<unsigned>(gn);
        g.grid[1] = static_cast<unsigned>(gm);
        g.grid[2] = 1;
        g.block[0] = c.path == OURO_PATH_SIMT_FALLBACK ? 256 : 128;
        g.block[1] = g.block[2] = 1;
        const double b_bytes = unpack ? N * K : wbytes;
        g.dram_read_bytes = code_bytes + b_bytes;
        g.dram_write_bytes = M * N * 4;
        g.l2_read_bytes = gn * code_bytes + gm * b_bytes;
        if (c.path == OURO_PATH_SIMT_FALLBACK)
            g.simt_ops = 2 * M * N * K;
        else
        {
            g.mma_kind = s4 ? OURO_MMA_S4 : OURO_MMA_S8;
            const double kt = s4 ? 128 : 64;
            g.mma_ops = 2.0 * gm * tile * gn * tile * std::ceil(K / kt) * kt;
        }
        ouroKernelCost_t& o = ks[n++];
        set_name(o, "outlier_gemm");
        o.grid[0] = static_cast<unsigned>(BW);
        o.grid[1] = static_cast<unsigned>(ceil_div(pr.N, kOutGemmThreads));
        o.grid[2] = 1;
        o.block[0] = kOutGemmThreads;
        o.block[1] = o.block[2] = 1;
        o.dram_read_bytes = M * cw * ob + lists + wbytes;
        o.dram_write_bytes = rows_with_outliers * M * N * 4;
        o.l2_read_bytes = o.grid[1] * (M * cw * ob + lists) + M * cw * N * 32.0; // one strided W sector per MAC
        o.simt_ops = 2 * M * N * cw;
        ouroKernelCost_t& b = ks[n++];
        set_name(b, "combine");
        b.grid[0] = static_cast<unsigned>(ceil_div(pr.N, kCombineThreads));
        b.grid[1] = static_cast<unsigned>(std::min(pr.M, 65535));
        b.grid[2] = 1;
        b.block[0] = kCombineThreads;
        b.block[1] = b.block[2] = 1;
        b.dram_read_bytes = M * N * 4 * (1 + rows_with_outliers) + tables + M * 4 + BW * 4;
        b.dram_write_bytes = M * N * yb;
        b.l2_read_bytes = b.dram_read_bytes;
        b.simt_ops = M * N * 6;
    }
    for (int i = 0; i < n && i < max_out; ++i)
        out[i] = ks[i];
    return n;
}

} // namespace
} // namespace ouro

using namespace ouro;

extern "C" OURO_API size_t ouroOutlierLinearWorkspaceSize(int M, int L, int K, int N, int w_bits, int act_bits,
                                                          int bits_outlier, int n_refresh, int max_outliers)
{
    if (!shape_ok(M, L, K, N, n_refresh, max_outliers))
        return 0;
    return sizes_of(Problem{M, L, K, N, w_bits, act_bits, bits_outlier, n_refresh, max_outliers, 0},
                    OURO_EPILOGUE_SEPARATE)
        .total();
}

extern "C" OURO_API size_t ouroOutlierLinearWorkspaceSizeFor(int M, int L, int K, int N, int w_bits, int act_bits,
                                                             int bits_outlier, int n_refresh, int max_outliers,
                                                             ouroEpilogue_t epilogue)
{
    if (!shape_ok(M, L, K, N, n_refresh, max_outliers))
        return 0;
    const Problem pr{M, L, K, N, w_bits, act_bits, bits_outlier, n_refresh, max_outliers, 0};
    if (epilogue == OURO_EPILOGUE_AUTO)
        epilogue = fused_shape_ok(pr) ? OURO_EPILOGUE_FUSED : OURO_EPILOGUE_SEPARATE;
    else if (epilogue != OURO_EPILOGUE_FUSED && epilogue != OURO_EPILOGUE_SEPARATE)
        return 0;
    return sizes_of(pr, epilogue).total();
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinear(const ouroOutlierLinearParams_t* p, cudaStream_t stream,
                                                   ouroGemmPath_t* path_out)
{
    return run_legacy(p, OURO_PATH_NONE, OURO_EPILOGUE_AUTO, stream, path_out, nullptr, nullptr);
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinearWithPath(const ouroOutlierLinearParams_t* p,
                                                           ouroGemmPath_t requested, cudaStream_t stream,
                                                           ouroGemmPath_t* path_out)
{
    return run_legacy(p, requested, OURO_EPILOGUE_AUTO, stream, path_out, nullptr, nullptr);
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinearProfiled(const ouroOutlierLinearParams_t* p, cudaStream_t stream,
                                                           ouroGemmPath_t* path_out, float step_ms[5])
{
    if (step_ms == nullptr)
        return OURO_ERR_INVALID_ARGUMENT;
    return run_legacy(p, OURO_PATH_NONE, OURO_EPILOGUE_AUTO, stream, path_out, nullptr, step_ms);
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinearProfiledWithPath(const ouroOutlierLinearParams_t* p,
                                                                   ouroGemmPath_t requested, cudaStream_t stream,
                                                                   ouroGemmPath_t* path_out, float step_ms[5])
{
    if (step_ms == nullptr)
        return OURO_ERR_INVALID_ARGUMENT;
    return run_legacy(p, requested, OURO_EPILOGUE_AUTO, stream, path_out, nullptr, step_ms);
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinearEx(const ouroOutlierLinearParams_t* p, ouroGemmPath_t requested_path,
                                                     ouroEpilogue_t requested_epilogue, cudaStream_t stream,
                                                     ouroGemmPath_t* path_out, ouroEpilogue_t* epilogue_out,
                                                     float* step_ms)
{
    return run_legacy(p, requested_path, requested_epilogue, stream, path_out, epilogue_out, step_ms);
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinearRun(const ouroOutlierLinearParams_t* p,
                                                      const ouroOutlierLinearConfig_t* cfg, cudaStream_t stream,
                                                      ouroOutlierLinearChoice_t* ran, float* step_ms)
{
    return run(p, cfg, stream, ran, step_ms);
}

extern "C" OURO_API ouroStatus_t ouroOutlierLinearCheck(const ouroOutlierLinearParams_t* p, cudaStream_t stream)
{
    const ouroStatus_t st = validate(p);
    if (st != OURO_OK)
        return st;
    if (p->workspace == nullptr)
        return OURO_ERR_WORKSPACE;
    int32_t flag = 0;
    if (cudaStreamSynchronize(stream) != cudaSuccess
        || cudaMemcpy(&flag, p->workspace, sizeof(flag), cudaMemcpyDeviceToHost) != cudaSuccess)
        return OURO_ERR_CUDA;
    return flag ? OURO_ERR_OUTLIER_CAPACITY : OURO_OK;
}

extern "C" OURO_API int ouroOutlierLinearNumTactics(void)
{
    return fused::kNumTiles;
}

extern "C" OURO_API const char* ouroOutlierLinearTacticName(int tactic)
{
    return tactic >= 1 && tactic <= fused::kNumTiles ? fused::kTiles[tactic - 1].name : nullptr;
}

extern "C" OURO_API int ouroOutlierLinearPlan(int M, int L, int K, int N, int w_bits, int act_bits, int bits_outlier,
                                              int n_refresh, int max_outliers, int x_is_fp32, int cc, int num_sms,
                                              const ouroOutlierLinearConfig_t* cfg, const ouroOutlierStats_t* stats,
                                              ouroOutlierLinearChoice_t* choice, ouroKernelCost_t* out, int max_out)
{
    if (!shape_ok(M, L, K, N, n_refresh, max_outliers) || (w_bits != 4 && w_bits != 8) || act_bits < 2
        || act_bits > 8 || (x_is_fp32 != 0 && x_is_fp32 != 1) || num_sms < 1 || max_out < 0
        || (max_out > 0 && out == nullptr))
        return -OURO_ERR_INVALID_ARGUMENT;
    if (!((bits_outlier >= 2 && bits_outlier <= 8) || bits_outlier == 16))
        return -OURO_ERR_INVALID_ARGUMENT;
    const Problem pr{M, L, K, N, w_bits, act_bits, bits_outlier, n_refresh, max_outliers, x_is_fp32};
    const ouroOutlierLinearConfig_t c_in = cfg ? *cfg : auto_config();
    Choice c{};
    const ouroStatus_t st = resolve(pr, c_in, Device{cc, num_sms}, &c);
    if (st != OURO_OK)
        return -st;
    if (choice)
        *choice = ouroOutlierLinearChoice_t{c.path, c.epi, c.epi == OURO_EPILOGUE_FUSED ? c.tile + 1 : 0};
    const ouroOutlierStats_t s = stats ? *stats : ouroOutlierStats_t{0.0, 0.0};
    return plan_kernels(pr, c, s, out, max_out);
}

extern "C" OURO_API ouroStatus_t ouroHostFlagAlloc(int32_t** flag)
{
    if (flag == nullptr)
        return OURO_ERR_INVALID_ARGUMENT;
    *flag = nullptr;
    void* p = nullptr;
    if (cudaHostAlloc(&p, sizeof(int32_t), cudaHostAllocMapped) != cudaSuccess)
        return OURO_ERR_CUDA;
    *static_cast<volatile int32_t*>(p) = 0;
    *flag = static_cast<int32_t*>(p);
    return OURO_OK;
}

extern "C" OURO_API void ouroHostFlagFree(int32_t* flag)
{
    if (flag)
        cudaFreeHost(flag);
}
