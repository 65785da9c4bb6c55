// Shared onnxruntime glue of libouro_ort_ops.so: the C API pointer, errors as OrtStatus, tensor views,
// the ops' attributes (parsed and validated once per node) and the shape checks shared by the CPU and the
// CUDA execution-provider kernels. Only the public onnxruntime C API (onnxruntime_c_api.h) is used.
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace ouro::ort
{

// Set once by RegisterCustomOps: the newest API both this library and the loaded onnxruntime know.
extern const OrtApi* g_api;
extern uint32_t g_api_version;
constexpr uint32_t kMinApiVersion = 17; // KernelContext_ParallelFor (onnxruntime 1.17)

// An error that becomes the OrtStatus returned to onnxruntime (and so the message a user sees).
class Error : public std::runtime_error
{
public:
    explicit Error(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT)
        : std::runtime_error(msg), code(code)
    {
    }
    OrtErrorCode code;
};

// Throws Error with onnxruntime's message if `st` is an error (and releases it).
void check(OrtStatus* st, const char* what);
// Runs `body`, turning exceptions into an OrtStatus (nullptr on success).
template <typename F>
OrtStatus* guarded(F&& body) noexcept
{
    try
    {
        body();
        return nullptr;
    }
    catch (const Error& e)
    {
        return g_api->CreateStatus(e.code, e.what());
    }
    catch (const std::exception& e)
    {
        return g_api->CreateStatus(ORT_FAIL, e.what());
    }
    catch (...)
    {
        return g_api->CreateStatus(ORT_FAIL, "ouro custom op: unknown exception");
    }
}

// A read-only view of one tensor (value == nullptr: an omitted optional input).
struct Tensor
{
    const OrtValue* value = nullptr;
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    std::vector<int64_t> shape;
    size_t numel = 0;
    const void* data = nullptr;

    bool present() const { return value != nullptr; }
    int rank() const { return static_cast<int>(shape.size()); }
    template <typename T>
    const T* as() const
    {
        return static_cast<const T*>(data);
    }
};

Tensor view(const OrtValue* v);
Tensor input(OrtKernelContext* ctx, size_t i);
void* output(OrtKernelContext* ctx, size_t i, const std::vector<int64_t>& shape);
std::string shape_str(const std::vector<int64_t>& shape);
const char* type_name(ONNXTensorElementDataType t);

// ------------------------------------------------------------------------------------------ attributes
// Attribute names, meanings and defaults are those of the TensorRT plugins and of the onnxruntime reference
// ops (trt_plugins/*/README.md; ouro.exporter.ort_ops.OPS); absent attributes take the defaults.
struct LinearAttrs
{
    std::string label; // "OutlierLinear 'node name'", the prefix of every error message
    int64_t in_features = 0, out_features = 0, seq_len = 0; // 0: taken from the input shapes
    int w_bits = 8, a_bits = 8, o_bits = 16, n_refresh = 1, threshold_policy = 0;
    float k_sigma = 3.0f;
    int64_t max_outliers = 0; // 0: K
    int std_correction = 0;
};

struct ScanAttrs
{
    std::string label;
    int reverse = 0, delta_softplus = 1;
    int delta_bits = 0, delta_bits_outlier = 0, b_bits = 0, b_bits_outlier = 0, c_bits = 0, c_bits_outlier = 0;
    int n_refresh = 1, threshold_policy = 0;
    float delta_k_sigma = 4.0f, bc_k_sigma = 3.0f;
    int h_bits = 0, h_group = 1;
    int std_correction = 0;

    bool quantized() const { return delta_bits > 0 || b_bits > 0 || c_bits > 0 || h_bits > 0; }
};

LinearAttrs parse_linear(const OrtKernelInfo* info);
ScanAttrs parse_scan(const OrtKernelInfo* info);

// Input positions.
enum LinearInput { kX = 0, kWeight, kWScale, kInlierScale, kTheta, kBias, kLinearInputs };
enum ScanInput
{
    kU = 0, kDelta, kA, kBm, kCm, kDskip, kZ, kDeltaScale, kDeltaTheta, kBScale, kBTheta, kCScale, kCTheta, kHScale,
    kHZero, kScanInputs
};
constexpr int kScanFpInputs = 7;

struct LinearShape
{
    int B, L, K, N;
};
// Checks the inputs of one call against each other and the attributes; errors name input and dimension.
LinearShape check_linear(const LinearAttrs& a, const Tensor (&in)[kLinearInputs]);

struct ScanShape
{
    int B, L, D, S;
};
ScanShape check_scan(const ScanAttrs& a, const Tensor (&in)[kScanInputs]);

// Checks a constant weight tensor (dtype, shape against w_bits); returns (N, K).
void weight_dims(const LinearAttrs& a, const Tensor& w, int* N, int* K);

// ------------------------------------------------------------------------------------------ op definition
// One OrtCustomOp: fixed name, execution provider, typed inputs (optional ones at the end), one output.
// UNDEFINED input type: any type (checked by the kernel).
struct OpDef
{
    const char* name;
    const char* provider; // nullptr: CPU
    std::vector<ONNXTensorElementDataType> inputs;
    size_t n_required;
    ONNXTensorElementDataType output;
    OrtStatus*(ORT_API_CALL* create)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**);
    OrtStatus*(ORT_API_CALL* compute)(void*, OrtKernelContext*);
    void(ORT_API_CALL* destroy)(void*);
    OrtStatus*(ORT_API_CALL* infer_shape)(const OrtCustomOp*, OrtShapeInferContext*);
};

struct CustomOp : OrtCustomOp
{
    OpDef def;
};

// Fills every callback of the OrtCustomOp for `version` (a NULL callback would be called anyway).
void init_custom_op(CustomOp& op, const OpDef& def, uint32_t version);

// Shape inference shared by the CPU and CUDA variants.
OrtStatus* ORT_API_CALL infer_linear_shape(const OrtCustomOp*, OrtShapeInferContext* ctx);
OrtStatus* ORT_API_CALL infer_scan_shape(const OrtCustomOp*, OrtShapeInferContext* ctx);

// The op lists of each execution provider, for the two activation dtypes.
void append_cpu_ops(std::vector<CustomOp*>& ops);
void append_cuda_ops(std::vector<CustomOp*>& ops); // empty when built without CUDA

} // namespace ouro::ort
