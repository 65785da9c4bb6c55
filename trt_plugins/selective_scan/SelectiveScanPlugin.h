// SelectiveScan TensorRT plugin (IPluginV3): Mamba-1 selective scan in token-major (B, L, D) layout,
// optional reverse direction, optional OuroMamba fake quantization of Delta/B/C and TGQ hidden-state
// quantization, running the `ouroSelectiveScan` kernel. Inputs, attributes and limits: README.md.
#pragma once

#include "plugin_base.h"

namespace ouro
{
namespace plugin
{

struct SelectiveScanConfig
{
    int32_t reverse{0};
    int32_t delta_softplus{1};
    int32_t delta_bits{0};         // 0 = Delta not quantized
    int32_t delta_bits_outlier{0}; // 2..8, or 16 / 0: outliers kept in fp16
    int32_t b_bits{0};             // 0 = B not quantized
    int32_t b_bits_outlier{0};
    int32_t c_bits{0};             // 0 = C not quantized
    int32_t c_bits_outlier{0};
    int32_t n_refresh{1};
    int32_t threshold_policy{0};   // 0 dynamic, 1 calibrated
    float delta_k_sigma{0.F};
    float bc_k_sigma{0.F};
    int32_t h_bits{0};             // 0 = hidden state not quantized
    int32_t h_group{1};
    int32_t std_correction{0};     // dynamic threshold std divides by max(C - std_correction, 1): 0 or 1

    bool operandsQuantized() const noexcept
    {
        return delta_bits > 0 || b_bits > 0 || c_bits > 0;
    }
    bool quantized() const noexcept
    {
        return operandsQuantized() || h_bits > 0;
    }
    //! Bits of the operand whose scale table is input i (kDeltaScale .. kCTheta).
    int32_t bitsOfTable(int32_t i) const noexcept
    {
        return i <= 8 ? delta_bits : (i <= 10 ? b_bits : c_bits);
    }
};

class SelectiveScanPlugin : public PluginBase<SelectiveScanPlugin, SelectiveScanConfig>
{
public:
    static constexpr char const* kName = "SelectiveScan";
    static constexpr int32_t kNbInputsFloat = 7;
    static constexpr int32_t kNbInputsQuant = 15;
    enum Input : int32_t
    {
        kU = 0,
        kDelta = 1,
        kA = 2,
        kB = 3,
        kC = 4,
        kDskip = 5,
        kZ = 6,
        kDeltaScale = 7,
        kDeltaTheta = 8,
        kBScale = 9,
        kBTheta = 10,
        kCScale = 11,
        kCTheta = 12,
        kHScale = 13,
        kHZero = 14
    };

    explicit SelectiveScanPlugin(SelectiveScanConfig const& cfg)
        : PluginBase(cfg)
    {
    }

    static FieldTable<SelectiveScanConfig> const& table();
    //! Parses and validates the attributes; throws PluginError naming the field.
    static SelectiveScanConfig parseConfig(nvinfer1::PluginFieldCollection const* fc);

    // Used by PluginBase.
    void checkCounts(int32_t nbInputs, int32_t nbOutputs) const;
    void inferShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs& out,
        nvinfer1::IExprBuilder& exprBuilder) const;

    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
};

using SelectiveScanPluginCreator = PluginCreator<SelectiveScanPlugin>;

} // namespace plugin
} // namespace ouro
