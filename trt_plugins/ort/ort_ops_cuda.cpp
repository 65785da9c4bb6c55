// CUDA execution-provider kernels of ouro::OutlierLinear and ouro::SelectiveScan: the project's CUDA kernels
// (trt_plugins/common/ouro_kernels.h, the same entry points the TensorRT plugins call) launched on the EP's
// compute stream, with their workspace taken from the EP's allocator. Inputs and the output live in device
// memory (OrtMemTypeDefault of the CUDA EP); nothing is synchronised here.
#include "ort_common.h"
#include "ouro_kernels.h"

#include <memory>
#include <string>

namespace ouro::ort
{
namespace
{

constexpr const char* kCudaEp = "CUDAExecutionProvider";

// std_correction reaches the kernels when ouroActQuant_t has that field (an additive ABI change); with an
// older ouro_kernels.h only the default 0 can run, and 1 is refused rather than computed with 0.
template <typename Q>
auto set_std_correction(Q& q, int c, int) -> decltype(q.std_correction = c, bool())
{
    q.std_correction = c;
    return true;
}
template <typename Q>
bool set_std_correction(Q&, int c, long)
{
    return c == 0;
}

void need_std_correction(ouroActQuant_t& q, int c, const std::string& label)
{
    if (!set_std_correction(q, c, 0))
        throw Error(label + ": attribute 'std_correction' = " + std::to_string(c) + " is not supported by the CUDA "
            "kernels this library was built with (ouroActQuant_t has no std_correction field); run on the CPU "
            "execution provider or rebuild against kernels that take it");
}

// Device workspace from the EP's allocator, stream-ordered (released after the launch: later users of the
// memory run on the same stream).
class Workspace
{
public:
    Workspace(OrtKernelContext* ctx, const OrtValue* like, size_t bytes) : bytes_(bytes)
    {
        if (bytes == 0)
            return;
        const OrtMemoryInfo* mem = nullptr;
        check(g_api->GetTensorMemoryInfo(like, &mem), "GetTensorMemoryInfo");
        check(g_api->KernelContext_GetAllocator(ctx, mem, &alloc_), "KernelContext_GetAllocator");
#if ORT_API_VERSION >= 18
        if (g_api_version >= 18) // stream-aware allocation
            check(g_api->KernelContext_GetScratchBuffer(ctx, mem, bytes, &ptr_), "KernelContext_GetScratchBuffer");
        else
#endif
            check(g_api->AllocatorAlloc(alloc_, bytes, &ptr_), "AllocatorAlloc");
        if (!ptr_)
            throw Error("out of device memory for a " + std::to_string(bytes) + "-byte workspace", ORT_FAIL);
    }
    ~Workspace()
    {
        if (ptr_)
            alloc_->Free(alloc_, ptr_);
        if (alloc_)
            g_api->ReleaseAllocator(alloc_);
    }
    void* get() const { return ptr_; }
    size_t size() const { return bytes_; }

private:
    OrtAllocator* alloc_ = nullptr;
    void* ptr_ = nullptr;
    size_t bytes_;
};

cudaStream_t stream_of(OrtKernelContext* ctx)
{
    void* s = nullptr;
    check(g_api->KernelContext_GetGPUComputeStream(ctx, &s), "KernelContext_GetGPUComputeStream");
    return static_cast<cudaStream_t>(s);
}

void check_kernel(ouroStatus_t st, const std::string& label, const char* fn, const std::string& sizes)
{
    if (st != OURO_OK)
        throw Error(label + ": " + fn + " failed (" + ouroStatusString(st) + ") for " + sizes, ORT_FAIL);
}

// ------------------------------------------------------------------------------------------ OutlierLinear
struct LinearKernel
{
    LinearAttrs attrs;
};

OrtStatus* ORT_API_CALL create_linear(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out)
{
    return guarded([&] {
        auto k = std::make_unique<LinearKernel>();
        k->attrs = parse_linear(info);
        *out = k.release();
    });
}

OrtStatus* ORT_API_CALL compute_linear(void* kp, OrtKernelContext* ctx)
{
    return guarded([&] {
        const LinearAttrs& at = static_cast<const LinearKernel*>(kp)->attrs;
        Tensor in[kLinearInputs];
        for (int i = 0; i < kLinearInputs; ++i)
            in[i] = input(ctx, i);
        const LinearShape s = check_linear(at, in);
        void* y = output(ctx, 0, {s.B, s.L, s.N});
        if (s.B == 0 || s.L == 0)
            return;
        ouroOutlierLinearParams_t p{};
        p.M = s.B * s.L;
        p.L = s.L;
        p.K = s.K;
        p.N = s.N;
        p.x = in[kX].data;
        p.x_is_fp32 = in[kX].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 1 : 0;
        p.w = in[kWeight].as<int8_t>();
        p.w_bits = at.w_bits;
        p.w_scale = in[kWScale].as<float>();
        p.bias = in[kBias].as<float>();
        p.act.bits = at.a_bits;
        p.act.bits_outlier = at.o_bits;
        p.act.n_refresh = at.n_refresh;
        p.act.policy = at.threshold_policy;
        p.act.k_sigma = at.k_sigma;
        p.act.scale = in[kInlierScale].as<float>();
        p.act.theta = at.threshold_policy == OURO_POLICY_CALIBRATED ? in[kTheta].as<float>() : nullptr;
        need_std_correction(p.act, at.std_correction, at.label);
        p.max_outliers = at.max_outliers > 0 ? static_cast<int>(at.max_outliers) : s.K;
        p.y = y;
        const std::string sizes = "M=" + std::to_string(p.M) + " K=" + std::to_string(p.K) + " N=" + std::to_string(p.N);
        const size_t bytes = ouroOutlierLinearWorkspaceSize(p.M, p.L, p.K, p.N, p.w_bits, p.act.bits, p.act.bits_outlier,
            p.act.n_refresh, p.max_outliers);
        Workspace ws(ctx, in[kX].value, bytes);
        p.workspace = ws.get();
        p.workspace_size = ws.size();
        check_kernel(ouroOutlierLinear(&p, stream_of(ctx), nullptr), at.label, "ouroOutlierLinear", sizes);
    });
}

void ORT_API_CALL destroy_linear(void* k)
{
    delete static_cast<LinearKernel*>(k);
}

// ------------------------------------------------------------------------------------------ SelectiveScan
struct ScanKernel
{
    ScanAttrs attrs;
};

OrtStatus* ORT_API_CALL create_scan(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out)
{
    return guarded([&] {
        auto k = std::make_unique<ScanKernel>();
        k->attrs = parse_scan(info);
        *out = k.release();
    });
}

ouroActQuant_t act_quant(int bits, int bits_outlier, const ScanAttrs& at, float k_sigma, const Tensor& scale,
    const Tensor& theta)
{
    ouroActQuant_t q{};
    if (bits <= 0)
        return q; // operand not quantized
    q.bits = bits;
    q.bits_outlier = bits_outlier;
    q.n_refresh = at.n_refresh;
    q.policy = at.threshold_policy;
    q.k_sigma = k_sigma;
    q.scale = scale.as<float>();
    q.theta = at.threshold_policy == OURO_POLICY_CALIBRATED ? theta.as<float>() : nullptr;
    need_std_correction(q, at.std_correction, at.label);
    return q;
}

OrtStatus* ORT_API_CALL compute_scan(void* kp, OrtKernelContext* ctx)
{
    return guarded([&] {
        const ScanAttrs& at = static_cast<const ScanKernel*>(kp)->attrs;
        Tensor in[kScanInputs];
        for (int i = 0; i < kScanInputs; ++i)
            in[i] = input(ctx, i);
        const ScanShape s = check_scan(at, in);
        void* out = output(ctx, 0, in[kU].shape);
        if (s.B == 0 || s.L == 0 || s.D == 0)
            return;
        ouroSelectiveScanParams_t p{};
        p.B = s.B;
        p.L = s.L;
        p.D = s.D;
        p.S = s.S;
        p.io_is_fp32 = in[kU].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 1 : 0;
        p.reverse = at.reverse;
        p.delta_softplus = at.delta_softplus;
        p.u = in[kU].data;
        p.delta = in[kDelta].data;
        p.A = in[kA].as<float>();
        p.Bm = in[kBm].data;
        p.Cm = in[kCm].data;
        p.Dskip = in[kDskip].as<float>();
        p.z = in[kZ].data;
        p.out = out;
        if (at.quantized())
        {
            p.delta_q = act_quant(at.delta_bits, at.delta_bits_outlier, at, at.delta_k_sigma, in[kDeltaScale], in[kDeltaTheta]);
            p.b_q = act_quant(at.b_bits, at.b_bits_outlier, at, at.bc_k_sigma, in[kBScale], in[kBTheta]);
            p.c_q = act_quant(at.c_bits, at.c_bits_outlier, at, at.bc_k_sigma, in[kCScale], in[kCTheta]);
            if (at.h_bits > 0)
            {
                p.h_bits = at.h_bits;
                p.h_group = at.h_group;
                p.h_scale = in[kHScale].as<float>();
                p.h_zero = in[kHZero].as<float>();
            }
        }
        const std::string sizes = "B=" + std::to_string(p.B) + " L=" + std::to_string(p.L) + " D=" + std::to_string(p.D)
            + " S=" + std::to_string(p.S);
        Workspace ws(ctx, in[kU].value, ouroSelectiveScanWorkspaceSize(p.B, p.L, p.D, p.S, p.io_is_fp32));
        p.workspace = ws.get();
        p.workspace_size = ws.size();
        check_kernel(ouroSelectiveScan(&p, stream_of(ctx)), at.label, "ouroSelectiveScan", sizes);
    });
}

void ORT_API_CALL destroy_scan(void* k)
{
    delete static_cast<ScanKernel*>(k);
}

} // namespace

void append_cuda_ops(std::vector<CustomOp*>& ops)
{
    static CustomOp storage[4];
    const auto F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    int i = 0;
    for (auto act : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16})
    {
        init_custom_op(storage[i], OpDef{"OutlierLinear", kCudaEp, {act, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, F, F, F, F},
            kLinearInputs, act, create_linear, compute_linear, destroy_linear, infer_linear_shape}, g_api_version);
        ops.push_back(&storage[i++]);
        std::vector<ONNXTensorElementDataType> scan = {act, act, F, act, act, F, act};
        scan.resize(kScanInputs, F);
        init_custom_op(storage[i], OpDef{"SelectiveScan", kCudaEp, scan, 5, act, create_scan, compute_scan, destroy_scan,
            infer_scan_shape}, g_api_version);
        ops.push_back(&storage[i++]);
    }
}

} // namespace ouro::ort
