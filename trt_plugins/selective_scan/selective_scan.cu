// ouroSelectiveScan: validation, optional pre-scan fake quantization of Delta/B/C, the scan launch.
#include "selective_scan.cuh"

namespace ouro
{
namespace
{

struct ScanSizes
{
    size_t delta, bc;
    size_t total() const { return align_up(delta) + 2 * align_up(bc); }
};

ScanSizes scan_sizes(int B, int L, int D, int S)
{
    const size_t BL = static_cast<size_t>(B) * L;
    return ScanSizes{BL * D * sizeof(float), BL * S * sizeof(float)};
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
        const size_t need = scan_sizes(p->B, p->L, p->D, p->S).total();
        if (p->workspace == nullptr || p->workspace_size < need)
            return OURO_ERR_WORKSPACE;
        if (!is_aligned(p->workspace, 16))
            return OURO_ERR_MISALIGNED;
    }
    return OURO_OK;
}

} // namespace
} // namespace ouro

using namespace ouro;

extern "C" OURO_API size_t ouroSelectiveScanWorkspaceSize(int B, int L, int D, int S, int io_is_fp32)
{
    (void) io_is_fp32;
    if (B < 1 || L < 1 || D < 1 || S < 1)
        return 0;
    return scan_sizes(B, L, D, S).total();
}

extern "C" OURO_API ouroStatus_t ouroSelectiveScan(const ouroSelectiveScanParams_t* p, cudaStream_t stream)
{
    ouroStatus_t st = validate(p);
    if (st != OURO_OK)
        return st;
    const int io32 = p->io_is_fp32;
    ScanDev d{};
    d.B = p->B;
    d.L = p->L;
    d.D = p->D;
    d.S = p->S;
    d.reverse = p->reverse != 0;
    d.softplus = p->delta_softplus != 0;
    d.u = p->u;
    d.u_fp32 = io32;
    d.delta = p->delta;
    d.delta_fp32 = io32;
    d.A = p->A;
    d.Bm = p->Bm;
    d.b_fp32 = io32;
    d.Cm = p->Cm;
    d.c_fp32 = io32;
    d.Dskip = p->Dskip;
    d.z = p->z;
    d.z_fp32 = io32;
    d.out = p->out;
    d.out_fp32 = io32;
    d.h_bits = p->h_bits;
    d.h_group = p->h_group;
    d.h_scale = p->h_scale;
    d.h_zero = p->h_zero;

    // Pre-scan fake quantization (fp32 results in the workspace; windows by original token position).
    const ScanSizes sz = scan_sizes(p->B, p->L, p->D, p->S);
    WsCarver ws(p->workspace);
    float* dq = static_cast<float*>(ws.take(sz.delta));
    float* bq = static_cast<float*>(ws.take(sz.bc));
    float* cq = static_cast<float*>(ws.take(sz.bc));
    // Each quantized operand is replaced by its fp32 fake-quantized copy.
    struct Operand
    {
        const ouroActQuant_t& q;
        int C;
        float* copy;
        const void*& ptr;
        int& is_fp32;
    };
    const Operand operands[] = {{p->delta_q, p->D, dq, d.delta, d.delta_fp32}, {p->b_q, p->S, bq, d.Bm, d.b_fp32},
                                {p->c_q, p->S, cq, d.Cm, d.c_fp32}};
    for (const Operand& o : operands)
    {
        if (!o.q.bits)
            continue;
        st = launch_outlier_fake_quant(o.ptr, io32, o.copy, 1, p->B, p->L, o.C, o.q, stream);
        if (st != OURO_OK)
            return st;
        o.ptr = o.copy;
        o.is_fp32 = 1;
    }
    const dim3 grid(static_cast<unsigned>(ceil_div(p->D, kScanThreads)), static_cast<unsigned>(p->B));
    launch_kernel(selective_scan_kernel, grid, dim3(kScanThreads), 0, stream, d);
    return cudaGetLastError() == cudaSuccess ? OURO_OK : OURO_ERR_CUDA;
}
