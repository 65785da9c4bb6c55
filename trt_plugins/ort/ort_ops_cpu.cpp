// CPU execution-provider kernels of ouro::OutlierLinear and ouro::SelectiveScan: onnxruntime glue around
// cpu_kernels.h. Work is spread over onnxruntime's intra-op thread pool (KernelContext_ParallelFor); the
// inlier GEMM of OutlierLinear runs as onnxruntime's own MatMulInteger (MLAS, uint8 x int8, where that is exact:
// kExactU8S8) or MatMul (MLAS fp32, kExactF32) through InvokeOp, on the same pool; where InvokeOp is
// unavailable, or with the session config entry "ouro.cpu_gemm" = "builtin", the library's own fp32 GEMM.
#include "cpu_kernels.h"
#include "ort_common.h"

#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>

namespace ouro::ort
{
namespace
{

constexpr const char* kGemmConfigKey = "ouro.cpu_gemm";

cpu::ParallelFor thread_pool(OrtKernelContext* ctx)
{
    return [ctx](size_t n, const std::function<void(size_t)>& fn) {
        if (n == 0)
            return;
        if (n == 1)
        {
            fn(0);
            return;
        }
        struct Job
        {
            const std::function<void(size_t)>* fn;
            std::atomic<bool> failed{false};
            std::mutex mu;
            std::exception_ptr err;
        } job;
        job.fn = &fn;
        auto run = [](void* p, size_t i) {
            auto* j = static_cast<Job*>(p);
            if (j->failed.load(std::memory_order_relaxed))
                return;
            try
            {
                (*j->fn)(i);
            }
            catch (...) // never let an exception cross onnxruntime's thread pool
            {
                std::lock_guard<std::mutex> lock(j->mu);
                if (!j->err)
                    j->err = std::current_exception();
                j->failed = true;
            }
        };
        check(g_api->KernelContext_ParallelFor(ctx, run, n, 0, &job), "KernelContext_ParallelFor");
        if (job.err)
            std::rethrow_exception(job.err);
    };
}

cpu::ActQuant act_quant(int bits, int bits_outlier, int n_refresh, int policy, float k_sigma, int std_correction,
    const Tensor& scale, const Tensor& theta)
{
    cpu::ActQuant q;
    q.bits = bits;
    q.bits_outlier = bits_outlier;
    q.n_refresh = n_refresh;
    q.policy = policy;
    q.k_sigma = k_sigma;
    q.std_correction = std_correction;
    q.scale = scale.as<float>();
    q.theta = policy == 1 ? theta.as<float>() : nullptr;
    return q;
}

// onnxruntime's MatMul (float, opset 13) invoked on our buffers.
class OrtMatMul
{
public:
    bool init(const OrtKernelInfo* info)
    {
        const char* names[] = {"T"};
        const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
        if (OrtStatus* st = g_api->CreateOp(info, "MatMul", "", 13, names, types, 1, nullptr, 0, 2, 1, &op_))
        {
            g_api->ReleaseStatus(st);
            op_ = nullptr;
            return false;
        }
        check(g_api->CreateCpuMemoryInfo(OrtDeviceAllocator, OrtMemTypeDefault, &mem_), "CreateCpuMemoryInfo");
        return true;
    }

    ~OrtMatMul()
    {
        if (op_)
            g_api->ReleaseOp(op_);
        if (mem_)
            g_api->ReleaseMemoryInfo(mem_);
    }

    bool ready() const { return op_ != nullptr; }

    void run(OrtKernelContext* ctx, const float* A, const float* Bm, float* C, int M, int K, int N) const
    {
        const int64_t da[2] = {M, K}, db[2] = {K, N}, dc[2] = {M, N};
        OrtValue* v[3] = {nullptr, nullptr, nullptr};
        OrtStatus* st = wrap(const_cast<float*>(A), da, &v[0]);
        if (!st)
            st = wrap(const_cast<float*>(Bm), db, &v[1]);
        if (!st)
            st = wrap(C, dc, &v[2]);
        if (!st)
        {
            const OrtValue* ins[2] = {v[0], v[1]};
            OrtValue* outs[1] = {v[2]};
            st = g_api->InvokeOp(ctx, op_, ins, 2, outs, 1);
        }
        for (OrtValue* x : v)
            if (x)
                g_api->ReleaseValue(x);
        check(st, "MatMul (InvokeOp)");
    }

private:
    OrtStatus* wrap(float* p, const int64_t (&dims)[2], OrtValue** out) const
    {
        return g_api->CreateTensorWithDataAsOrtValue(mem_, p, sizeof(float) * static_cast<size_t>(dims[0] * dims[1]),
            dims, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, out);
    }

    OrtOp* op_ = nullptr;
    OrtMemoryInfo* mem_ = nullptr;
};

// onnxruntime's MatMulInteger (uint8 A, int8 B, int32 out, opset 10) with a_zero_point 128, on our buffers.
class OrtMatMulInteger
{
public:
    bool init(const OrtKernelInfo* info)
    {
        const char* names[] = {"T1", "T2", "T3"};
        const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
            ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32};
        if (OrtStatus* st = g_api->CreateOp(info, "MatMulInteger", "", 10, names, types, 3, nullptr, 0, 3, 1, &op_))
        {
            g_api->ReleaseStatus(st);
            op_ = nullptr;
            return false;
        }
        check(g_api->CreateCpuMemoryInfo(OrtDeviceAllocator, OrtMemTypeDefault, &mem_), "CreateCpuMemoryInfo");
        check(g_api->CreateTensorWithDataAsOrtValue(mem_, &zero_point_, 1, nullptr, 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
                  &zp_), "CreateTensorWithDataAsOrtValue");
        return true;
    }

    ~OrtMatMulInteger()
    {
        if (zp_)
            g_api->ReleaseValue(zp_);
        if (op_)
            g_api->ReleaseOp(op_);
        if (mem_)
            g_api->ReleaseMemoryInfo(mem_);
    }

    bool ready() const { return op_ != nullptr; }

    void run(OrtKernelContext* ctx, const uint8_t* A, const int8_t* Bm, int32_t* C, int M, int K, int N) const
    {
        const int64_t da[2] = {M, K}, db[2] = {K, N}, dc[2] = {M, N};
        OrtValue* v[3] = {nullptr, nullptr, nullptr};
        OrtStatus* st = g_api->CreateTensorWithDataAsOrtValue(mem_, const_cast<uint8_t*>(A), static_cast<size_t>(M) * K, da,
            2, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, &v[0]);
        if (!st)
            st = g_api->CreateTensorWithDataAsOrtValue(mem_, const_cast<int8_t*>(Bm), static_cast<size_t>(K) * N, db, 2,
                ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, &v[1]);
        if (!st)
            st = g_api->CreateTensorWithDataAsOrtValue(mem_, C, sizeof(int32_t) * static_cast<size_t>(M) * N, dc, 2,
                ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, &v[2]);
        if (!st)
        {
            const OrtValue* ins[3] = {v[0], v[1], zp_};
            OrtValue* outs[1] = {v[2]};
            st = g_api->InvokeOp(ctx, op_, ins, 3, outs, 1);
        }
        for (OrtValue* x : v)
            if (x)
                g_api->ReleaseValue(x);
        check(st, "MatMulInteger (InvokeOp)");
    }

private:
    OrtOp* op_ = nullptr;
    OrtMemoryInfo* mem_ = nullptr;
    OrtValue* zp_ = nullptr;
    uint8_t zero_point_ = 128;
};

// Session config entry `key`, "" when absent (or when onnxruntime is older than 1.24).
std::string config_entry(const OrtKernelInfo* info, const char* key)
{
#if ORT_API_VERSION < 24
    (void)info;
    (void)key;
    return "";
#else
    if (g_api_version < 24)
        return "";
    OrtKeyValuePairs* kv = nullptr;
    if (OrtStatus* st = g_api->KernelInfo_GetConfigEntries(info, &kv))
    {
        g_api->ReleaseStatus(st);
        return "";
    }
    const char* v = g_api->GetKeyValue(kv, key);
    std::string out = v ? v : "";
    g_api->ReleaseKeyValuePairs(kv);
    return out;
#endif
}

// ------------------------------------------------------------------------------------------ OutlierLinear
struct LinearKernel
{
    LinearAttrs attrs;
    bool have_weights = false; // constant weight prepared at session creation
    cpu::LinearWeights weights;
    OrtMatMul matmul;
    OrtMatMulInteger matmul_u8;
};

OrtStatus* ORT_API_CALL create_linear(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out)
{
    return guarded([&] {
        auto k = std::make_unique<LinearKernel>();
        k->attrs = parse_linear(info);
        int is_const = 0;
        const OrtValue* wv = nullptr;
        if (OrtStatus* st = g_api->KernelInfoGetConstantInput_tensor(info, kWeight, &is_const, &wv))
            g_api->ReleaseStatus(st);
        else if (is_const && wv)
        {
            const Tensor w = view(wv);
            int N = 0, K = 0;
            weight_dims(k->attrs, w, &N, &K);
            cpu::prepare_weights(w.as<int8_t>(), k->attrs.w_bits, N, K, k->weights);
            k->have_weights = true;
        }
        const std::string gemm = config_entry(info, kGemmConfigKey);
        if (!gemm.empty() && gemm != "builtin" && gemm != "onnxruntime")
            throw Error(k->attrs.label + ": session config '" + kGemmConfigKey + "' = '" + gemm
                + "', expected 'onnxruntime' (MatMul, default) or 'builtin'");
        if (gemm != "builtin") // else, or where InvokeOp is unavailable: the builtin fp32 GEMM
        {
            k->matmul.init(info);
            k->matmul_u8.init(info);
        }
        *out = k.release();
    });
}

OrtStatus* ORT_API_CALL compute_linear(void* kp, OrtKernelContext* ctx)
{
    return guarded([&] {
        const LinearKernel& k = *static_cast<const LinearKernel*>(kp);
        Tensor in[kLinearInputs];
        for (int i = 0; i < kLinearInputs; ++i)
            in[i] = input(ctx, i);
        const LinearShape s = check_linear(k.attrs, in);
        void* y = output(ctx, 0, {s.B, s.L, s.N});
        if (s.B == 0 || s.L == 0)
            return;
        cpu::LinearWeights local;
        const cpu::LinearWeights* w = &k.weights;
        if (!k.have_weights)
        {
            cpu::prepare_weights(in[kWeight].as<int8_t>(), k.attrs.w_bits, s.N, s.K, local);
            w = &local;
        }
        const LinearAttrs& at = k.attrs;
        cpu::LinearArgs a;
        a.x = in[kX].data;
        a.fp16 = in[kX].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
        a.B = s.B;
        a.L = s.L;
        a.w = w;
        a.w_scale = in[kWScale].as<float>();
        a.bias = in[kBias].as<float>();
        a.act = act_quant(at.a_bits, at.o_bits, at.n_refresh, at.threshold_policy, at.k_sigma, at.std_correction,
            in[kInlierScale], in[kTheta]);
        a.max_outliers = static_cast<int>(at.max_outliers);
        a.y = y;
        const cpu::ParallelFor par = thread_pool(ctx);
        cpu::Gemm gemm;
        if (k.matmul.ready())
            gemm = [&](const float* A, const float* Bm, float* C, int M, int K, int N) { k.matmul.run(ctx, A, Bm, C, M, K, N); };
        else
            gemm = [&](const float* A, const float* Bm, float* C, int M, int K, int N) { cpu::gemm_f32(A, Bm, C, M, K, N, par); };
        cpu::GemmU8 gemm_u8;
        if (k.matmul_u8.ready())
            gemm_u8 = [&](const uint8_t* A, const int8_t* Bm, int32_t* C, int M, int K, int N) {
                k.matmul_u8.run(ctx, A, Bm, C, M, K, N);
            };
        cpu::outlier_linear(a, gemm, gemm_u8, par);
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
        cpu::ScanArgs a;
        a.B = s.B;
        a.L = s.L;
        a.D = s.D;
        a.S = s.S;
        a.fp16 = in[kU].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
        a.u = in[kU].data;
        a.delta = in[kDelta].data;
        a.A = in[kA].as<float>();
        a.Bm = in[kBm].data;
        a.Cm = in[kCm].data;
        a.Dskip = in[kDskip].as<float>();
        a.z = in[kZ].data;
        a.out = out;
        a.reverse = at.reverse;
        a.delta_softplus = at.delta_softplus;
        if (at.quantized())
        {
            a.delta_q = act_quant(at.delta_bits, at.delta_bits_outlier, at.n_refresh, at.threshold_policy, at.delta_k_sigma,
                at.std_correction, in[kDeltaScale], in[kDeltaTheta]);
            a.b_q = act_quant(at.b_bits, at.b_bits_outlier, at.n_refresh, at.threshold_policy, at.bc_k_sigma,
                at.std_correction, in[kBScale], in[kBTheta]);
            a.c_q = act_quant(at.c_bits, at.c_bits_outlier, at.n_refresh, at.threshold_policy, at.bc_k_sigma,
                at.std_correction, in[kCScale], in[kCTheta]);
            a.h_bits = at.h_bits;
            a.h_group = at.h_group;
            a.h_scale = in[kHScale].as<float>();
            a.h_zero = in[kHZero].as<float>();
        }
        cpu::selective_scan(a, thread_pool(ctx));
    });
}

void ORT_API_CALL destroy_scan(void* k)
{
    delete static_cast<ScanKernel*>(k);
}

std::vector<ONNXTensorElementDataType> linear_inputs(ONNXTensorElementDataType act)
{
    const auto F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    return {act, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED /* INT8 or UINT8 */, F, F, F, F};
}

std::vector<ONNXTensorElementDataType> scan_inputs(ONNXTensorElementDataType act)
{
    const auto F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    std::vector<ONNXTensorElementDataType> t = {act, act, F, act, act, F, act};
    t.resize(kScanInputs, F);
    return t;
}

} // namespace

void append_cpu_ops(std::vector<CustomOp*>& ops)
{
    static CustomOp storage[4];
    int i = 0;
    for (auto act : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16})
    {
        init_custom_op(storage[i], OpDef{"OutlierLinear", nullptr, linear_inputs(act), kLinearInputs, act, create_linear,
            compute_linear, destroy_linear, infer_linear_shape}, g_api_version);
        ops.push_back(&storage[i++]);
        init_custom_op(storage[i], OpDef{"SelectiveScan", nullptr, scan_inputs(act), 5, act, create_scan, compute_scan,
            destroy_scan, infer_scan_shape}, g_api_version);
        ops.push_back(&storage[i++]);
    }
}

} // namespace ouro::ort
