// OutlierLinear TensorRT plugin (IPluginV3): the OuroMamba outlier-split linear layer
//   y[B, L, N] = dequant( Q_in(x) W^T + Q_out(x) W^T ) (+ bias)
// running the `ouroOutlierLinear` kernel. Inputs, attributes and limits: README.md beside this file.
#pragma once

#include "plugin_base.h"

namespace ouro
{
namespace plugin
{

struct OutlierLinearConfig
{
    int32_t in_features{0};    // K
    int32_t out_features{0};   // N
    int32_t seq_len{0};        // L
    int32_t w_bits{0};         // 4 | 8
    int32_t a_bits{0};         // inlier bits 4 | 8
    int32_t o_bits{0};         // outlier bits 4 | 8 | 16 (fp16 outliers)
    int32_t n_refresh{0};      // outlier-list refresh window (tokens), >= 1
    int32_t threshold_policy{0}; // 0 dynamic, 1 calibrated (ouroThresholdPolicy_t)
    float k_sigma{0.F};        // dynamic policy: threshold = mean + k_sigma * std
    int32_t max_outliers{0};   // outlier channel capacity per (image, window), 1..K; 0 = K (no limit)
    int32_t std_correction{0}; // dynamic threshold std divides by max(K - std_correction, 1): 0 or 1
};

class OutlierLinearPlugin : public PluginBase<OutlierLinearPlugin, OutlierLinearConfig>
{
public:
    static constexpr char const* kName = "OutlierLinear";
    static constexpr int32_t kNbInputs = 6;
    enum Input : int32_t
    {
        kX = 0,
        kWeight = 1,
        kWScale = 2,
        kInlierScale = 3,
        kTheta = 4,
        kBias = 5
    };

    explicit OutlierLinearPlugin(OutlierLinearConfig const& cfg)
        : PluginBase(cfg)
    {
    }
    ~OutlierLinearPlugin() override;
    OutlierLinearPlugin(OutlierLinearPlugin const&) = delete;
    OutlierLinearPlugin& operator=(OutlierLinearPlugin const&) = delete;

    static FieldTable<OutlierLinearConfig> const& table();
    //! Parses and validates the attributes; throws PluginError naming the field.
    static OutlierLinearConfig parseConfig(nvinfer1::PluginFieldCollection const* fc);

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

    //! Tactics = tile shapes of the kernels' fused GEMM (ouroOutlierLinearNumTactics); none when the shape runs
    //! the separate (SIMT) epilogue. 0 (TensorRT's default) = the kernels' automatic choice.
    int32_t getNbTactics() noexcept override;
    int32_t getValidTactics(int32_t* tactics, int32_t nbTactics) noexcept override;
    int32_t setTactic(int32_t tactic) noexcept override;
    int32_t tactic() const noexcept
    {
        return mTactic;
    }
    //! Clones keep the tactic (not the overflow flag: each instance owns its own).
    OutlierLinearPlugin* makeClone() const;
    //! Allocates the overflow flag (runtime, before the first enqueue: outside any CUDA graph capture).
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;

    //! The kernel's max_outliers: the attribute, or K when it is 0.
    int32_t capacity() const noexcept;
    //! Workspace for M = B*L rows: ouroOutlierLinearWorkspaceSizeFor(..., AUTO), the epilogue the kernels run.
    size_t workspaceFor(int64_t batch) const;
    //! True when this shape runs the fused epilogue (the kernels' own decision, asked through a launch plan).
    bool runsFused() const;

private:
    //! Reports (logs, returns non-zero) an outlier-capacity overflow of an earlier enqueue: the kernels set the
    //! mapped host flag asynchronously, so an overflow is seen by the next enqueue (or the destructor).
    bool reportOverflow() noexcept;

    int32_t mTactic{0};
    int32_t* mOverflow{nullptr}; // ouroHostFlagAlloc: written by the kernels, read and cleared here
    bool mOverflowUnavailable{false};
};

using OutlierLinearPluginCreator = PluginCreator<OutlierLinearPlugin>;

} // namespace plugin
} // namespace ouro
