// ouroSelectiveScan: validation, workspace (operand statistics), the statistics kernels of the quantized
// operands, the scan launch (selective_scan.cuh), and ouroSelectiveScanPlan.
#include "selective_scan.cuh"

#include <cstdio>

namespace ouro
{
namespace
{

struct Operand
{
    const ouroActQuant_t* q;
    const void* x;
    int C;
};

size_t num_windows(int B, int L, int n_refresh)
{
    return static_cast<size_t>(B) * static_cast<size_t>(ceil_div(L, n_refresh));
}

// Workspace of one quantized operand: first[BW, C] (uint16) and S_O[B * L] (fp32).
size_t operand_bytes(int B, int L, int C, int n_refresh)
{
    return align_up(num_windows(B, L, n_refresh) * C * sizeof(uint16_t)) + align_up(static_cast<size_t>(B) * L * sizeof(float));
}

// The workspace bound does not depend on n_refresh (n_refresh = 1 is the largest).
size_t workspace_bound(int B, int L, int D, int S)
{
    return operand_bytes(B, L, D, 1) + 2 * operand_bytes(B, L, S, 1);
}

ouroStatus_t validate(const ouroSelectiveScanParams_t* p)
{
    if (p == nullptr)
        return OURO_ERR_INVALID_ARGUMENT;
    if (p->B < 1 || p->L < 1 || p->D < 1 || p->S < 1 || (p->io_is_fp32 != 0 && p->io_is_fp32 != 1))
        return OURO_ERR_INVALID_ARGUMENT;
    if (p->u == nullptr || p->delta == nullptr || p->A == nullptr || p->Bm == nullptr || p->Cm == nullptr
        || p->out == nullptr)
        return OURO_ERR_INVALID_ARGUMENT;
    if (p->S > kMaxState || p->B > 65535)
        return OURO_ERR_UNSUPPORTED_SHAPE;
    const size_t el = p->io_is_fp32 ? 4 : 2;
    const void* io[] = {p->u, p->delta, p->Bm, p->Cm, p->z, p->out};
    for (const void* q : io)
        if (q && !is_aligned(q, el))
            return OURO_ERR_MISALIGNED;
    const void* f32[] = {p->A, p->Dskip, p->h_scale, p->h_zero};
    for (const void* q : f32)
        if (q && !is_aligned(q, 4))
            return OURO_ERR_MISALIGNED;
    const ouroActQuant_t* qs[] = {&p->delta_q, &p->b_q, &p->c_q};
    bool any_q = false;
    for (const ouroActQuant_t* q : qs)
    {
        const ouroStatus_t st = validate_act_quant(*q, false);
        if (st != OURO_OK)
            return st;
        any_q = any_q || q->bits != 0;
    }
    if (any_q && (p->L > kMaxTokens || p->D > kMaxK))
        return OURO_ERR_UNSUPPORTED_SHAPE;
    if (p->h_bits != 0)
    {
        if (!((p->h_bits >= 2 && p->h_bits <= 8) || p->h_bits == 16) || p->h_group < 1 || p->h_scale == nullptr
            || p->h_zero == nullptr)
            return OURO_ERR_INVALID_ARGUMENT;
    }
    if (any_q)
    {
        if (p->workspace == nullptr || p->workspace_size < workspace_bound(p->B, p->L, p->D, p->S))
            return OURO_ERR_WORKSPACE;
        if (!is_aligned(p->workspace, 16))
            return OURO_ERR_MISALIGNED;
    }
    return OURO_OK;
}

bool rows_vectorizable(const void* x, int C, int x_bytes)
{
    return C % 8 == 0 && is_aligned(x, 16) && (static_cast<size_t>(C) * x_bytes) % 16 == 0;
}

template <typename XT>
ouroStatus_t launch_stats(const scan::StatsArgs& a, int B, cudaStream_t stream)
{
    const bool vec = rows_vectorizable(a.x, a.C, sizeof(XT));
    const size_t smem = prep_smem_bytes(a.C, sizeof(XT), a.ring);
    const unsigned blocks = static_cast<unsigned>(num_windows(B, a.L, a.q.n_refresh));
    auto* kernel = vec ? scan::operand_stats_kernel<XT, true> : scan::operand_stats_kernel<XT, false>;
    if (!allow_dynamic_smem(kernel, smem))
        return OURO_ERR_UNSUPPORTED_SHAPE;
    launch_kernel(kernel, dim3(blocks), dim3(prep_threads(a.C)), smem, stream, a);
    return launch_status();
}

// States per lane: S <= 4 -> 1, <= 8 -> 2, <= 16 -> 4.
int states_per_lane(int S)
{
    return S <= 4 ? 1 : (S <= 8 ? 2 : 4);
}

template <typename XT, int kSPL>
ouroStatus_t launch_scan_spl(const scan::ScanArgs& a, bool tgq, cudaStream_t stream)
{
    const dim3 grid(static_cast<unsigned>(ceil_div(a.D, scan::kChannels)), static_cast<unsigned>(a.B));
    const dim3 block(scan::kThreads);
    if (tgq)
        launch_kernel(scan::selective_scan_kernel<XT, kSPL, true>, grid, block, 0, stream, a);
    else
        launch_kernel(scan::selective_scan_kernel<XT, kSPL, false>, grid, block, 0, stream, a);
    return launch_status();
}

template <typename XT>
ouroStatus_t launch_scan(const scan::ScanArgs& a, bool tgq, cudaStream_t stream)
{
    switch (states_per_lane(a.S))
    {
    case 1: return launch_scan_spl<XT, 1>(a, tgq, stream);
    case 2: return launch_scan_spl<XT, 2>(a, tgq, stream);
    default: return launch_scan_spl<XT, 4>(a, tgq, stream);
    }
}

// cp.async staging needs 16-byte aligned rows of u/delta/z/B/C.
bool scan_async_ok(const ouroSelectiveScanParams_t* p)
{
    const size_t el = p->io_is_fp32 ? 4 : 2;
    if ((static_cast<size_t>(p->D) * el) % 16 != 0 || (static_cast<size_t>(p->S) * el) % 16 != 0)
        return false;
    const void* io[] = {p->u, p->delta, p->Bm, p->Cm, p->z};
    for (const void* q : io)
        if (q && !is_aligned(q, 16))
            return false;
    return true;
}

} // namespace
} // namespace ouro

using namespace ouro;

extern "C" OURO_API size_t ouroSelectiveScanWorkspaceSize(int B, int L, int D, int S, int io_is_fp32)
{
    (void) io_is_fp32;
    if (B < 1 || L < 1 || D < 1 || S < 1)
        return 0;
    return workspace_bound(B, L, D, S);
}

extern "C" OURO_API ouroStatus_t ouroSelectiveScan(const ouroSelectiveScanParams_t* p, cudaStream_t stream)
{
    ouroStatus_t st = validate(p);
    if (st != OURO_OK)
        return st;
    const bool f32 = p->io_is_fp32 != 0;
    scan::ScanArgs a{};
    a.B = p->B;
    a.L = p->L;
    a.D = p->D;
    a.S = p->S;
    a.reverse = p->reverse != 0;
    a.softplus = p->delta_softplus != 0;
    a.u = p->u;
    a.delta = p->delta;
    a.A = p->A;
    a.Bm = p->Bm;
    a.Cm = p->Cm;
    a.Dskip = p->Dskip;
    a.z = p->z;
    a.out = p->out;
    a.h_bits = p->h_bits;
    a.h_group = p->h_group;
    a.h_scale = p->h_scale;
    a.h_zero = p->h_zero;

    // Kernel 0 for each quantized operand: join positions and S_O (windows by original token position).
    WsCarver ws(p->workspace);
    struct Slot
    {
        const ouroActQuant_t& q;
        const void* x;
        int C;
        scan::OperandQuant& out;
    };
    const Slot slots[] = {{p->delta_q, p->delta, p->D, a.dq}, {p->b_q, p->Bm, p->S, a.bq}, {p->c_q, p->Cm, p->S, a.cq}};
    for (const Slot& s : slots)
    {
        s.out = scan::OperandQuant{s.q, nullptr, nullptr, 1};
        if (!s.q.bits)
            continue;
        s.out.W = ceil_div(p->L, s.q.n_refresh);
        scan::StatsArgs sa{};
        sa.L = p->L;
        sa.C = s.C;
        sa.q = s.q;
        sa.x = s.x;
        sa.first = static_cast<uint16_t*>(ws.take(num_windows(p->B, p->L, s.q.n_refresh) * s.C * sizeof(uint16_t)));
        sa.s_out = static_cast<float*>(ws.take(static_cast<size_t>(p->B) * p->L * sizeof(float)));
        sa.ring = prep_ring(s.C, f32 ? 4 : 2, s.q.n_refresh);
        st = f32 ? launch_stats<float>(sa, p->B, stream) : launch_stats<__half>(sa, p->B, stream);
        if (st != OURO_OK)
            return st;
        s.out.first = sa.first;
        s.out.s_out = sa.s_out;
    }
    const bool tgq = p->h_bits != 0;
    a.async_rows = scan_async_ok(p) ? 1 : 0;
    return f32 ? launch_scan<float>(a, tgq, stream) : launch_scan<__half>(a, tgq, stream);
}

extern "C" OURO_API int ouroSelectiveScanPlan(int B, int L, int D, int S, int io_is_fp32, int delta_bits, int b_bits,
                                              int c_bits, int h_bits, int has_z, int cc, int num_sms,
                                              ouroKernelCost_t* out, int max_out)
{
    (void) cc;
    (void) num_sms;
    if (B < 1 || L < 1 || D < 1 || S < 1 || S > kMaxState || max_out < 0 || (max_out > 0 && out == nullptr))
        return -OURO_ERR_INVALID_ARGUMENT;
    const double xb = io_is_fp32 ? 4 : 2;
    const double rows = static_cast<double>(B) * L;
    const int quant_bits[3] = {delta_bits, b_bits, c_bits};
    const int chans[3] = {D, S, S};
    const char* names[3] = {"operand_stats_delta", "operand_stats_B", "operand_stats_C"};
    ouroKernelCost_t ks[4] = {};
    int n = 0;
    for (int i = 0; i < 3; ++i)
    {
        if (!quant_bits[i])
            continue;
        ouroKernelCost_t& k = ks[n++];
        std::snprintf(k.name, sizeof(k.name), "%s", names[i]);
        const int ring = prep_ring(chans[i], static_cast<int>(xb), 1);
        k.grid[0] = static_cast<unsigned>(B * L); // upper bound (n_refresh = 1)
        k.grid[1] = k.grid[2] = 1;
        k.block[0] = static_cast<unsigned>(prep_threads(chans[i]));
        k.block[1] = k.block[2] = 1;
        k.smem_bytes = static_cast<unsigned>(prep_smem_bytes(chans[i], static_cast<int>(xb), ring));
        k.dram_read_bytes = rows * chans[i] * xb;
        k.l2_read_bytes = k.dram_read_bytes;
        k.dram_write_bytes = rows * (chans[i] * 2.0 + 4.0);
        k.simt_ops = rows * chans[i] * 10;
    }
    ouroKernelCost_t& k = ks[n++];
    std::snprintf(k.name, sizeof(k.name), "selective_scan_spl%d%s", states_per_lane(S), h_bits ? "_tgq" : "");
    k.grid[0] = static_cast<unsigned>(ceil_div(D, scan::kChannels));
    k.grid[1] = static_cast<unsigned>(B);
    k.grid[2] = 1;
    k.block[0] = scan::kThreads;
    k.block[1] = k.block[2] = 1;
    k.smem_bytes = static_cast<unsigned>(io_is_fp32 ? sizeof(scan::ChunkSmem<float>) : sizeof(scan::ChunkSmem<__half>));
    const double tables = (delta_bits ? rows * D * 2 : 0) + (b_bits ? rows * S * 2 : 0) + (c_bits ? rows * S * 2 : 0);
    k.dram_read_bytes = rows * D * xb * (has_z ? 3 : 2) + rows * S * xb * 2 + D * S * 4.0 + tables;
    k.l2_read_bytes = k.dram_read_bytes + rows * S * xb * 2 * (k.grid[0] - 1);
    k.dram_write_bytes = rows * D * xb;
    k.simt_ops = rows * D * S * 8.0;
    for (int i = 0; i < n && i < max_out; ++i)
        out[i] = ks[i];
    return n;
}
