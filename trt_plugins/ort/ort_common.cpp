#include "ort_common.h"

#include <climits>
#include <cmath>
#include <cstring>
#include <sstream>

namespace ouro::ort
{

const OrtApi* g_api = nullptr;
uint32_t g_api_version = 0;

void check(OrtStatus* st, const char* what)
{
    if (!st)
        return;
    std::string msg = std::string(what) + ": " + g_api->GetErrorMessage(st);
    g_api->ReleaseStatus(st);
    throw Error(msg, ORT_FAIL);
}

Tensor view(const OrtValue* v)
{
    Tensor t;
    if (!v)
        return t;
    t.value = v;
    OrtTensorTypeAndShapeInfo* info = nullptr;
    check(g_api->GetTensorTypeAndShape(v, &info), "GetTensorTypeAndShape");
    size_t rank = 0;
    OrtStatus* st = g_api->GetTensorElementType(info, &t.type);
    if (!st)
        st = g_api->GetDimensionsCount(info, &rank);
    if (!st)
    {
        t.shape.resize(rank);
        st = g_api->GetDimensions(info, t.shape.data(), rank);
    }
    if (!st)
        st = g_api->GetTensorShapeElementCount(info, &t.numel);
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    check(st, "tensor shape");
    void* data = nullptr;
    check(g_api->GetTensorMutableData(const_cast<OrtValue*>(v), &data), "GetTensorMutableData");
    t.data = data;
    return t;
}

Tensor input(OrtKernelContext* ctx, size_t i)
{
    size_t n = 0;
    check(g_api->KernelContext_GetInputCount(ctx, &n), "KernelContext_GetInputCount");
    if (i >= n)
        return Tensor{};
    const OrtValue* v = nullptr;
    check(g_api->KernelContext_GetInput(ctx, i, &v), "KernelContext_GetInput");
    return view(v);
}

void* output(OrtKernelContext* ctx, size_t i, const std::vector<int64_t>& shape)
{
    OrtValue* v = nullptr;
    check(g_api->KernelContext_GetOutput(ctx, i, shape.data(), shape.size(), &v), "KernelContext_GetOutput");
    void* data = nullptr;
    check(g_api->GetTensorMutableData(v, &data), "GetTensorMutableData");
    return data;
}

std::string shape_str(const std::vector<int64_t>& shape)
{
    std::ostringstream s;
    s << "(";
    for (size_t i = 0; i < shape.size(); ++i)
        s << (i ? ", " : "") << shape[i];
    s << (shape.size() == 1 ? ",)" : ")");
    return s.str();
}

const char* type_name(ONNXTensorElementDataType t)
{
    switch (t)
    {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "FLOAT";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "FLOAT16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "INT8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "UINT8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "INT32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "INT64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "DOUBLE";
    default: return "another type";
    }
}

// ------------------------------------------------------------------------------------------ attributes
namespace
{

class Attrs
{
public:
    Attrs(const OrtKernelInfo* info, const char* op) : info_(info)
    {
        size_t size = 0;
        std::string name;
        if (!g_api->KernelInfo_GetNodeName(info, nullptr, &size) && size > 1)
        {
            name.resize(size);
            if (g_api->KernelInfo_GetNodeName(info, name.data(), &size))
                name.clear();
            else
                name.resize(std::strlen(name.c_str()));
        }
        label = std::string(op) + (name.empty() ? "" : " '" + name + "'");
    }

    // Integer attribute, `dflt` when absent; a float given for it is an error.
    int64_t i(const char* name, int64_t dflt)
    {
        int64_t v = 0;
        if (OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info_, name, &v))
        {
            g_api->ReleaseStatus(st);
            float f = 0;
            if (OrtStatus* st2 = g_api->KernelInfoGetAttribute_float(info_, name, &f))
            {
                g_api->ReleaseStatus(st2);
                return dflt;
            }
            std::ostringstream m;
            m << label << ": attribute '" << name << "' must be an integer, got the float " << f;
            throw Error(m.str());
        }
        return v;
    }

    // Float attribute (an integer is accepted), `dflt` when absent.
    float f(const char* name, float dflt)
    {
        float v = 0;
        if (OrtStatus* st = g_api->KernelInfoGetAttribute_float(info_, name, &v))
        {
            g_api->ReleaseStatus(st);
            int64_t iv = 0;
            if (OrtStatus* st2 = g_api->KernelInfoGetAttribute_int64(info_, name, &iv))
            {
                g_api->ReleaseStatus(st2);
                return dflt;
            }
            return static_cast<float>(iv);
        }
        return v;
    }

    [[noreturn]] void bad(const char* name, double value, const char* expected) const
    {
        std::ostringstream m;
        m << label << ": attribute '" << name << "' = " << value << ", expected " << expected;
        throw Error(m.str());
    }

    int one_of(const char* name, int64_t value, std::initializer_list<int> allowed, const char* expected) const
    {
        for (int a : allowed)
            if (value == a)
                return a;
        bad(name, static_cast<double>(value), expected);
    }

    int range(const char* name, int64_t value, int64_t lo, int64_t hi, const char* expected) const
    {
        if (value < lo || value > hi)
            bad(name, static_cast<double>(value), expected);
        return static_cast<int>(value);
    }

    float finite(const char* name, float value) const
    {
        if (!std::isfinite(value) || value < 0.0f)
            bad(name, value, "a finite number >= 0");
        return value;
    }

    std::string label;

private:
    const OrtKernelInfo* info_;
};

int act_bits(Attrs& at, const char* name)
{
    const int64_t v = at.i(name, 0);
    return v == 0 ? 0 : at.range(name, v, 2, 8, "0 (not quantized) or 2 ... 8");
}

int outlier_bits(Attrs& at, const char* name)
{
    const int64_t v = at.i(name, 0);
    if (v == 0 || v == 16)
        return 16; // 0: outliers kept in fp16
    return at.range(name, v, 2, 8, "0 or 16 (fp16 outliers) or 2 ... 8");
}

} // namespace

LinearAttrs parse_linear(const OrtKernelInfo* info)
{
    Attrs at(info, "OutlierLinear");
    LinearAttrs a;
    a.label = at.label;
    a.in_features = at.range("in_features", at.i("in_features", 0), 0, INT_MAX, ">= 1 (or absent)");
    a.out_features = at.range("out_features", at.i("out_features", 0), 0, INT_MAX, ">= 1 (or absent)");
    a.seq_len = at.range("seq_len", at.i("seq_len", 0), 0, INT_MAX, ">= 1 (or absent)");
    a.w_bits = at.one_of("w_bits", at.i("w_bits", 8), {4, 8}, "one of {4, 8}");
    a.a_bits = at.range("a_bits", at.i("a_bits", 8), 2, 8, "2 ... 8");
    const int64_t ob = at.i("o_bits", 16);
    a.o_bits = ob == 16 ? 16 : at.range("o_bits", ob, 2, 8, "2 ... 8, or 16 (fp16 outliers)");
    a.n_refresh = at.range("n_refresh", at.i("n_refresh", 1), 1, INT_MAX, ">= 1");
    a.threshold_policy = at.one_of("threshold_policy", at.i("threshold_policy", 0), {0, 1}, "0 (dynamic) or 1 (calibrated)");
    a.k_sigma = at.finite("k_sigma", at.f("k_sigma", 3.0f));
    a.max_outliers = at.range("max_outliers", at.i("max_outliers", 0), 0, INT_MAX, ">= 0 (0 = in_features)");
    a.std_correction = at.one_of("std_correction", at.i("std_correction", 0), {0, 1}, "0 or 1");
    return a;
}

ScanAttrs parse_scan(const OrtKernelInfo* info)
{
    Attrs at(info, "SelectiveScan");
    ScanAttrs a;
    a.label = at.label;
    a.reverse = at.one_of("reverse", at.i("reverse", 0), {0, 1}, "0 or 1");
    a.delta_softplus = at.one_of("delta_softplus", at.i("delta_softplus", 1), {0, 1}, "0 or 1");
    a.delta_bits = act_bits(at, "delta_bits");
    a.b_bits = act_bits(at, "b_bits");
    a.c_bits = act_bits(at, "c_bits");
    a.delta_bits_outlier = outlier_bits(at, "delta_bits_outlier");
    a.b_bits_outlier = outlier_bits(at, "b_bits_outlier");
    a.c_bits_outlier = outlier_bits(at, "c_bits_outlier");
    a.n_refresh = at.range("n_refresh", at.i("n_refresh", 1), 1, INT_MAX, ">= 1");
    a.threshold_policy = at.one_of("threshold_policy", at.i("threshold_policy", 0), {0, 1}, "0 (dynamic) or 1 (calibrated)");
    a.delta_k_sigma = at.finite("delta_k_sigma", at.f("delta_k_sigma", 4.0f));
    a.bc_k_sigma = at.finite("bc_k_sigma", at.f("bc_k_sigma", 3.0f));
    a.h_bits = act_bits(at, "h_bits");
    a.h_group = at.range("h_group", at.i("h_group", 1), 1, INT_MAX, ">= 1");
    a.std_correction = at.one_of("std_correction", at.i("std_correction", 0), {0, 1}, "0 or 1");
    return a;
}

// ------------------------------------------------------------------------------------------ shape checks
namespace
{

const char* const kLinearNames[kLinearInputs] = {"x", "weight", "w_scale", "inlier_scale", "theta", "bias"};
const char* const kScanNames[kScanInputs] = {"u", "delta", "A", "Bm", "Cm", "Dskip", "z", "delta_scale", "delta_theta",
    "b_scale", "b_theta", "c_scale", "c_theta", "h_scale", "h_zero"};

[[noreturn]] void shape_error(const std::string& label, int idx, const char* name, const std::string& what)
{
    throw Error(label + ": input " + std::to_string(idx) + " (" + name + ") " + what);
}

void want_numel(const std::string& label, int idx, const char* name, const Tensor& t, int64_t n, const char* meaning)
{
    if (static_cast<int64_t>(t.numel) != n)
        shape_error(label, idx, name,
            "has shape " + shape_str(t.shape) + ", expected " + std::to_string(n) + " values (" + meaning + ")");
}

void want_dim(const std::string& label, int idx, const char* name, const Tensor& t, int d, int64_t n, const char* meaning)
{
    if (t.shape[d] != n)
        shape_error(label, idx, name,
            "dim " + std::to_string(d) + " is " + std::to_string(t.shape[d]) + ", expected " + std::to_string(n) + " ("
                + meaning + ")");
}

int to_int(const std::string& label, int64_t v, const char* what)
{
    if (v < 0 || v > INT_MAX)
        throw Error(label + ": " + what + " = " + std::to_string(v) + " does not fit the kernels' int32 sizes");
    return static_cast<int>(v);
}

} // namespace

void weight_dims(const LinearAttrs& a, const Tensor& w, int* N, int* K)
{
    if (w.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 && w.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
        shape_error(a.label, kWeight, "weight", std::string("has type ") + type_name(w.type) + ", expected INT8 (or UINT8)");
    if (w.rank() != 2)
        shape_error(a.label, kWeight, "weight", "has shape " + shape_str(w.shape) + ", expected rank 2 [N, K] (w_bits 8) or [N, K/2] (w_bits 4)");
    *N = to_int(a.label, w.shape[0], "N");
    *K = to_int(a.label, a.w_bits == 4 ? 2 * w.shape[1] : w.shape[1], "K");
}

LinearShape check_linear(const LinearAttrs& a, const Tensor (&in)[kLinearInputs])
{
    const std::string& lb = a.label;
    for (int i = 0; i < kLinearInputs; ++i)
        if (!in[i].present())
            shape_error(lb, i, kLinearNames[i], "is missing (OutlierLinear takes 6 inputs)");
    const Tensor& x = in[kX];
    if (x.rank() != 3)
        shape_error(lb, kX, "x", "has shape " + shape_str(x.shape) + ", expected rank 3 (B, L, K)");
    LinearShape s{};
    s.B = to_int(lb, x.shape[0], "B");
    s.L = to_int(lb, x.shape[1], "L");
    s.K = to_int(lb, x.shape[2], "K");
    int wn = 0, wk = 0;
    weight_dims(a, in[kWeight], &wn, &wk);
    s.N = wn;
    if (a.in_features > 0)
        want_dim(lb, kX, "x", x, 2, a.in_features, "attribute in_features");
    if (a.seq_len > 0)
        want_dim(lb, kX, "x", x, 1, a.seq_len, "attribute seq_len");
    if (a.w_bits == 4 && s.K % 2)
        shape_error(lb, kX, "x", "dim 2 is " + std::to_string(s.K) + ": w_bits 4 packs two codes per byte, K must be even");
    if (wk != s.K)
        shape_error(lb, kWeight, "weight", "has shape " + shape_str(in[kWeight].shape) + ", which does not match K = "
            + std::to_string(s.K) + " at w_bits " + std::to_string(a.w_bits));
    if (a.out_features > 0 && a.out_features != s.N)
        shape_error(lb, kWeight, "weight", "dim 0 is " + std::to_string(s.N) + ", expected "
            + std::to_string(a.out_features) + " (attribute out_features)");
    want_numel(lb, kWScale, "w_scale", in[kWScale], s.N, "one per output channel");
    want_numel(lb, kInlierScale, "inlier_scale", in[kInlierScale], s.L, "one per token");
    if (a.threshold_policy == 1)
        want_numel(lb, kTheta, "theta", in[kTheta], s.L, "one per token, threshold_policy 1");
    want_numel(lb, kBias, "bias", in[kBias], s.N, "one per output channel");
    if (a.max_outliers > s.K)
        throw Error(lb + ": attribute 'max_outliers' = " + std::to_string(a.max_outliers) + ", expected 0 ... K = " + std::to_string(s.K));
    for (int i : {kWScale, kInlierScale, kTheta, kBias})
        if (in[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
            shape_error(lb, i, kLinearNames[i], std::string("has type ") + type_name(in[i].type) + ", expected FLOAT");
    return s;
}

ScanShape check_scan(const ScanAttrs& a, const Tensor (&in)[kScanInputs])
{
    const std::string& lb = a.label;
    for (int i = 0; i < kScanFpInputs; ++i)
        if (!in[i].present() && i != kDskip && i != kZ)
            shape_error(lb, i, kScanNames[i], "is missing");
    const Tensor& u = in[kU];
    const Tensor& A = in[kA];
    if (u.rank() != 3)
        shape_error(lb, kU, "u", "has shape " + shape_str(u.shape) + ", expected rank 3 (B, L, D)");
    if (A.rank() != 2)
        shape_error(lb, kA, "A", "has shape " + shape_str(A.shape) + ", expected rank 2 (D, S)");
    ScanShape s{};
    s.B = to_int(lb, u.shape[0], "B");
    s.L = to_int(lb, u.shape[1], "L");
    s.D = to_int(lb, u.shape[2], "D");
    s.S = to_int(lb, A.shape[1], "S");
    want_dim(lb, kA, "A", A, 0, s.D, "d_inner, dim 2 of u");
    for (int i : {kDelta, kZ})
    {
        if (!in[i].present())
            continue;
        if (in[i].shape != u.shape)
            shape_error(lb, i, kScanNames[i], "has shape " + shape_str(in[i].shape) + ", expected the shape of u " + shape_str(u.shape));
    }
    for (int i : {kBm, kCm})
    {
        const Tensor& t = in[i];
        if (t.rank() != 3 || t.shape[0] != s.B || t.shape[1] != s.L)
            shape_error(lb, i, kScanNames[i], "has shape " + shape_str(t.shape) + ", expected (B, L, S) = (" + std::to_string(s.B)
                + ", " + std::to_string(s.L) + ", " + std::to_string(s.S) + ")");
        if (t.shape[2] != s.S)
            throw Error(lb + ": d_state mismatch: input 2 dim 1 is " + std::to_string(s.S) + " but input " + std::to_string(i)
                + " dim 2 is " + std::to_string(t.shape[2]));
    }
    if (in[kDskip].present())
        want_numel(lb, kDskip, "Dskip", in[kDskip], s.D, "one per channel d");
    for (int i : {kA, kDskip})
        if (in[i].present() && in[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
            shape_error(lb, i, kScanNames[i], std::string("has type ") + type_name(in[i].type) + ", expected FLOAT");
    if (!a.quantized())
        return s;
    for (int i = kScanFpInputs; i < kScanInputs; ++i)
        if (!in[i].present())
            throw Error(lb + ": quantization attributes are set, so the node needs all 15 inputs; input " + std::to_string(i)
                + " (" + kScanNames[i] + ") is missing");
    const struct
    {
        int bits, scale, theta;
    } ops[3] = {{a.delta_bits, kDeltaScale, kDeltaTheta}, {a.b_bits, kBScale, kBTheta}, {a.c_bits, kCScale, kCTheta}};
    for (const auto& o : ops)
    {
        if (o.bits == 0)
            continue;
        want_numel(lb, o.scale, kScanNames[o.scale], in[o.scale], s.L, "one per token");
        if (a.threshold_policy == 1)
            want_numel(lb, o.theta, kScanNames[o.theta], in[o.theta], s.L, "one per token, threshold_policy 1");
    }
    if (a.h_bits > 0)
    {
        const int64_t G = (s.L + a.h_group - 1) / a.h_group;
        want_numel(lb, kHScale, "h_scale", in[kHScale], G, "one per group of h_group scan steps");
        want_numel(lb, kHZero, "h_zero", in[kHZero], G, "one per group of h_group scan steps");
    }
    for (int i = kScanFpInputs; i < kScanInputs; ++i)
        if (in[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
            shape_error(lb, i, kScanNames[i], std::string("has type ") + type_name(in[i].type) + ", expected FLOAT");
    return s;
}

// ------------------------------------------------------------------------------------------ OrtCustomOp
namespace
{

const CustomOp& def_of(const OrtCustomOp* op)
{
    return *static_cast<const CustomOp*>(op);
}

const char* ORT_API_CALL get_name(const OrtCustomOp* op)
{
    return def_of(op).def.name;
}
const char* ORT_API_CALL get_provider(const OrtCustomOp* op)
{
    return def_of(op).def.provider;
}
ONNXTensorElementDataType ORT_API_CALL get_input_type(const OrtCustomOp* op, size_t i)
{
    return def_of(op).def.inputs.at(i);
}
size_t ORT_API_CALL get_input_count(const OrtCustomOp* op)
{
    return def_of(op).def.inputs.size();
}
ONNXTensorElementDataType ORT_API_CALL get_output_type(const OrtCustomOp* op, size_t)
{
    return def_of(op).def.output;
}
size_t ORT_API_CALL get_output_count(const OrtCustomOp*)
{
    return 1;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL get_input_char(const OrtCustomOp* op, size_t i)
{
    return i < def_of(op).def.n_required ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL get_output_char(const OrtCustomOp*, size_t)
{
    return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL get_input_mem(const OrtCustomOp*, size_t)
{
    return OrtMemTypeDefault;
}
int ORT_API_CALL variadic_arity(const OrtCustomOp*)
{
    return 1;
}
int ORT_API_CALL variadic_homogeneity(const OrtCustomOp*)
{
    return 0;
}
int ORT_API_CALL start_version(const OrtCustomOp*)
{
    return 1;
}
int ORT_API_CALL end_version(const OrtCustomOp*)
{
    return INT_MAX;
}
size_t ORT_API_CALL no_index_map(int** input_index, int** output_index)
{
    *input_index = nullptr;
    *output_index = nullptr;
    return 0;
}
void ORT_API_CALL release_index_map(int*, int*) {}

// The pre-V2 callbacks (onnxruntime calls the V2 ones for op.version >= 16; these are never reached).
void* ORT_API_CALL legacy_create(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info)
{
    void* kernel = nullptr;
    if (OrtStatus* st = def_of(op).def.create(op, api, info, &kernel))
    {
        api->ReleaseStatus(st);
        return nullptr;
    }
    return kernel;
}
void ORT_API_CALL legacy_compute(void*, OrtKernelContext*) {}

} // namespace

void init_custom_op(CustomOp& op, const OpDef& def, uint32_t version)
{
    OrtCustomOp& c = op;
    std::memset(&c, 0, sizeof c);
    op.def = def;
    c.version = version;
    c.CreateKernel = legacy_create;
    c.GetName = get_name;
    c.GetExecutionProviderType = get_provider;
    c.GetInputType = get_input_type;
    c.GetInputTypeCount = get_input_count;
    c.GetOutputType = get_output_type;
    c.GetOutputTypeCount = get_output_count;
    c.KernelCompute = legacy_compute;
    c.KernelDestroy = def.destroy;
    c.GetInputCharacteristic = get_input_char;
    c.GetOutputCharacteristic = get_output_char;
    c.GetInputMemoryType = get_input_mem;
    c.GetVariadicInputMinArity = variadic_arity;
    c.GetVariadicInputHomogeneity = variadic_homogeneity;
    c.GetVariadicOutputMinArity = variadic_arity;
    c.GetVariadicOutputHomogeneity = variadic_homogeneity;
    c.CreateKernelV2 = def.create;
    c.KernelComputeV2 = def.compute;
    c.InferOutputShapeFn = def.infer_shape;
    c.GetStartVersion = start_version;
    c.GetEndVersion = end_version;
    c.GetMayInplace = no_index_map;
    c.ReleaseMayInplace = release_index_map;
    c.GetAliasMap = no_index_map;
    c.ReleaseAliasMap = release_index_map;
}

// ------------------------------------------------------------------------------------------ shape inference
namespace
{

// Output = input 0's element type and shape (symbolic dims kept), with the last dim replaced when last >= 0.
// The input infos handed out by ShapeInferContext_GetInputTypeShape belong to the context (never released here).
OrtStatus* infer_like_input0(OrtShapeInferContext* ctx, int64_t last)
{
    return guarded([&] {
        OrtTensorTypeAndShapeInfo* in = nullptr;
        check(g_api->ShapeInferContext_GetInputTypeShape(ctx, 0, &in), "shape inference");
        ONNXTensorElementDataType type{};
        size_t rank = 0;
        OrtStatus* st = g_api->GetTensorElementType(in, &type);
        if (!st)
            st = g_api->GetDimensionsCount(in, &rank);
        std::vector<int64_t> dims(rank);
        std::vector<const char*> sym(rank, nullptr);
        if (!st)
            st = g_api->GetDimensions(in, dims.data(), rank);
        if (!st)
            st = g_api->GetSymbolicDimensions(in, sym.data(), rank);
        std::vector<std::string> names(rank);
        for (size_t i = 0; i < rank; ++i)
            names[i] = sym[i] ? sym[i] : "";
        check(st, "shape inference"); // `in` belongs to the context
        if (rank != 3)
            return; // input 0 of unknown shape (an empty shape reads as rank 0): only the type is inferred
        for (size_t i = 0; i < rank; ++i)
            if (dims[i] < 0 && names[i].empty() && !(last >= 0 && i == rank - 1))
                return; // an unknown dim without a name would be written back as the value -1: leave the shape open
        if (last >= 0 && rank > 0)
        {
            dims[rank - 1] = last;
            names[rank - 1].clear();
        }
        std::vector<const char*> sym_out(rank);
        for (size_t i = 0; i < rank; ++i)
            sym_out[i] = names[i].c_str();
        OrtTensorTypeAndShapeInfo* out = nullptr;
        check(g_api->CreateTensorTypeAndShapeInfo(&out), "shape inference");
        st = g_api->SetTensorElementType(out, type);
        if (!st)
            st = g_api->SetDimensions(out, dims.data(), rank);
        if (!st)
            st = g_api->SetSymbolicDimensions(out, sym_out.data(), rank);
        if (!st)
            st = g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, out);
        g_api->ReleaseTensorTypeAndShapeInfo(out);
        check(st, "shape inference");
    });
}

} // namespace

OrtStatus* ORT_API_CALL infer_linear_shape(const OrtCustomOp*, OrtShapeInferContext* ctx)
{
    int64_t n = -1; // weight dim 0 = N when its shape is known
    OrtTensorTypeAndShapeInfo* w = nullptr;
    if (OrtStatus* st = g_api->ShapeInferContext_GetInputTypeShape(ctx, kWeight, &w))
        g_api->ReleaseStatus(st);
    else if (w)
    {
        size_t rank = 0;
        if (!g_api->GetDimensionsCount(w, &rank) && rank == 2)
        {
            int64_t d[2] = {-1, -1};
            if (!g_api->GetDimensions(w, d, 2))
                n = d[0];
        }
    }
    return infer_like_input0(ctx, n);
}

OrtStatus* ORT_API_CALL infer_scan_shape(const OrtCustomOp*, OrtShapeInferContext* ctx)
{
    return infer_like_input0(ctx, -1);
}

} // namespace ouro::ort
