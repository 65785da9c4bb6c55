#include "OutlierLinearPlugin.h"

#include "ouro_kernels.h"

#include <algorithm>
#include <limits>

using namespace nvinfer1;

namespace ouro
{
namespace plugin
{

namespace
{
using C = OutlierLinearConfig;
using S = FieldSpec<C>;
constexpr char const* kPlugin = OutlierLinearPlugin::kName;
constexpr float kMaxKSigma = 1.0e6F;
} // namespace

FieldTable<C> const& OutlierLinearPlugin::table()
{
    static FieldTable<C> const t(kPlugin,
        {
            S::intField("in_features", &C::in_features, IntRule::range(1)),
            S::intField("out_features", &C::out_features, IntRule::range(1)),
            S::intField("seq_len", &C::seq_len, IntRule::range(1)),
            S::intField("w_bits", &C::w_bits, IntRule::oneOf({4, 8})),
            S::intField("a_bits", &C::a_bits, IntRule::oneOf({4, 8})),
            S::intField("o_bits", &C::o_bits, IntRule::oneOf({4, 8, 16})),
            S::intField("n_refresh", &C::n_refresh, IntRule::range(1)),
            S::intField("threshold_policy", &C::threshold_policy, IntRule::oneOf({0, 1})),
            S::floatField("k_sigma", &C::k_sigma, 0.F, kMaxKSigma),
            S::intField("max_outliers", &C::max_outliers, IntRule::range(0)),
            S::intField("std_correction", &C::std_correction, IntRule::oneOf({0, 1}), false),
        });
    return t;
}

OutlierLinearConfig OutlierLinearPlugin::parseConfig(PluginFieldCollection const* fc)
{
    C cfg;
    table().parse(fc, cfg);
    if (cfg.max_outliers > cfg.in_features)
    {
        throw PluginError(std::string(kPlugin) + ": field 'max_outliers' = " + std::to_string(cfg.max_outliers)
            + " exceeds in_features = " + std::to_string(cfg.in_features)
            + " (expected 1..in_features, or 0 for no limit)");
    }
    if (cfg.w_bits == 4 && cfg.in_features % 2 != 0)
    {
        throw PluginError(std::string(kPlugin) + ": field 'in_features' = " + std::to_string(cfg.in_features)
            + " is odd, but w_bits = 4 packs two weights per byte (in_features must be even)");
    }
    return cfg;
}

void OutlierLinearPlugin::checkCounts(int32_t nbInputs, int32_t nbOutputs) const
{
    if (nbInputs != kNbInputs || nbOutputs != 1)
    {
        throw PluginError(std::string(kPlugin) + ": expected " + std::to_string(kNbInputs)
            + " inputs (x, weight, w_scale, inlier_scale, theta, bias) and 1 output, got " + std::to_string(nbInputs)
            + " inputs and " + std::to_string(nbOutputs) + " outputs");
    }
}

void OutlierLinearPlugin::inferShapes(
    DimsExprs const* in, int32_t nbInputs, DimsExprs& out, IExprBuilder& exprBuilder) const
{
    checkCounts(nbInputs, 1);
    C const& c = mCfg;
    int64_t const K = c.in_features;
    int64_t const N = c.out_features;
    int64_t const L = c.seq_len;
    int64_t const Kw = c.w_bits == 8 ? K : K / 2;

    expectRank(in[kX], 3, kPlugin, kX, "x (B, L, K)");
    expectDimIfConstant(in[kX].d[1], L, kPlugin, kX, "x", 1, "attribute seq_len");
    expectDimIfConstant(in[kX].d[2], K, kPlugin, kX, "x", 2, "attribute in_features");
    expectRank(in[kWeight], 2, kPlugin, kWeight, "weight");
    expectDimIfConstant(in[kWeight].d[0], N, kPlugin, kWeight, "weight", 0, "attribute out_features");
    expectDimIfConstant(in[kWeight].d[1], Kw, kPlugin, kWeight, "weight", 1,
        c.w_bits == 8 ? "in_features for w_bits 8" : "in_features / 2 for packed w_bits 4");
    expectRank(in[kWScale], 1, kPlugin, kWScale, "w_scale [N]");
    expectDimIfConstant(in[kWScale].d[0], N, kPlugin, kWScale, "w_scale", 0, "attribute out_features");
    expectRank(in[kInlierScale], 1, kPlugin, kInlierScale, "inlier_scale [L]");
    expectDimIfConstant(in[kInlierScale].d[0], L, kPlugin, kInlierScale, "inlier_scale", 0, "attribute seq_len");
    expectRank(in[kTheta], 1, kPlugin, kTheta, "theta [L]");
    expectDimIfConstant(in[kTheta].d[0], L, kPlugin, kTheta, "theta", 0, "attribute seq_len");
    expectRank(in[kBias], 1, kPlugin, kBias, "bias [N]");
    expectDimIfConstant(in[kBias].d[0], N, kPlugin, kBias, "bias", 0, "attribute out_features");

    out.nbDims = 3;
    out.d[0] = in[kX].d[0];
    out.d[1] = in[kX].d[1];
    out.d[2] = exprBuilder.constant(N);
}

bool OutlierLinearPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || nbInputs != kNbInputs || nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kX: return d.type == DataType::kFLOAT || d.type == DataType::kHALF;
    case kWeight:
        // Packed int4 bytes may arrive as INT8 or UINT8 (same bit pattern, low nibble = even k).
        return d.type == DataType::kINT8 || (mCfg.w_bits == 4 && d.type == DataType::kUINT8);
    case kWScale:
    case kInlierScale:
    case kTheta:
    case kBias: return d.type == DataType::kFLOAT;
    default: return d.type == inOut[kX].desc.type; // output y: same dtype as x
    }
}

int32_t OutlierLinearPlugin::capacity() const noexcept
{
    return mCfg.max_outliers > 0 ? mCfg.max_outliers : mCfg.in_features;
}

size_t OutlierLinearPlugin::workspaceFor(int64_t batch) const
{
    C const& c = mCfg;
    int64_t const M = std::max<int64_t>(batch, 1) * c.seq_len;
    if (M > std::numeric_limits<int32_t>::max())
    {
        throw PluginError(std::string(kPlugin) + ": B*L = " + std::to_string(M) + " rows exceeds the int32 limit");
    }
    return ouroOutlierLinearWorkspaceSizeFor(static_cast<int>(M), c.seq_len, c.in_features, c.out_features, c.w_bits,
        c.a_bits, c.o_bits, c.n_refresh, capacity(), OURO_EPILOGUE_AUTO);
}

bool OutlierLinearPlugin::runsFused() const
{
    C const& c = mCfg;
    // A launch plan is pure host code: any compute capability with tensor cores answers the shape question.
    ouroOutlierLinearChoice_t choice{};
    int const n = ouroOutlierLinearPlan(c.seq_len, c.seq_len, c.in_features, c.out_features, c.w_bits, c.a_bits,
        c.o_bits, c.n_refresh, capacity(), 0, 80, 1, nullptr, nullptr, &choice, nullptr, 0);
    return n >= 0 && choice.epilogue == OURO_EPILOGUE_FUSED;
}

OutlierLinearPlugin::~OutlierLinearPlugin()
{
    reportOverflow();
    ouroHostFlagFree(mOverflow);
}

OutlierLinearPlugin* OutlierLinearPlugin::makeClone() const
{
    auto* p = new OutlierLinearPlugin(mCfg);
    p->mTactic = mTactic;
    return p;
}

int32_t OutlierLinearPlugin::getNbTactics() noexcept
{
    try
    {
        return runsFused() ? ouroOutlierLinearNumTactics() : 0;
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return 0;
}

int32_t OutlierLinearPlugin::getValidTactics(int32_t* tactics, int32_t nbTactics) noexcept
{
    if (tactics == nullptr || nbTactics != getNbTactics())
    {
        logError(std::string(kPlugin) + ": getValidTactics called for " + std::to_string(nbTactics) + " tactics, "
            + "getNbTactics() = " + std::to_string(getNbTactics()));
        return -1;
    }
    for (int32_t i = 0; i < nbTactics; ++i)
    {
        tactics[i] = i + 1; // tile ids 1..n; 0 stays TensorRT's default = automatic
    }
    return 0;
}

int32_t OutlierLinearPlugin::setTactic(int32_t tactic) noexcept
{
    if (tactic < 0 || tactic > ouroOutlierLinearNumTactics())
    {
        logError(std::string(kPlugin) + ": tactic " + std::to_string(tactic) + " is not a tile id (0.."
            + std::to_string(ouroOutlierLinearNumTactics()) + ")");
        return -1;
    }
    mTactic = tactic;
    return 0;
}

int32_t OutlierLinearPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (mOverflow == nullptr && !mOverflowUnavailable && ouroHostFlagAlloc(&mOverflow) != OURO_OK)
    {
        mOverflowUnavailable = true; // e.g. no GPU (CPU unit tests); enqueue says so if it ever runs
    }
    return PluginBase::onShapeChange(in, nbInputs, out, nbOutputs);
}

bool OutlierLinearPlugin::reportOverflow() noexcept
{
    if (mOverflow == nullptr || *reinterpret_cast<int32_t volatile*>(mOverflow) == 0)
    {
        return false;
    }
    *reinterpret_cast<int32_t volatile*>(mOverflow) = 0;
    logError(std::string(kPlugin) + ": an earlier enqueue had a window with more than max_outliers = "
        + std::to_string(capacity()) + " outlier channels (in_features " + std::to_string(mCfg.in_features)
        + "); the rows of that window were written as NaN. Raise the attribute max_outliers (0 = no limit).");
    return true;
}

size_t OutlierLinearPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    try
    {
        checkCounts(nbInputs, 1);
        return workspaceFor(inputs[kX].max.d[0]); // the profile's largest batch
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return 0;
}

int32_t OutlierLinearPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        C const& c = mCfg;
        Dims const& xd = inputDesc[kX].dims;
        if (xd.nbDims != 3 || xd.d[1] != c.seq_len || xd.d[2] != c.in_features)
        {
            throw PluginError(std::string(kPlugin) + ": enqueue with x of rank " + std::to_string(xd.nbDims)
                + ", expected (B, " + std::to_string(c.seq_len) + ", " + std::to_string(c.in_features) + ")");
        }
        if (reportOverflow())
        {
            return -1;
        }
        if (mOverflow == nullptr && !mOverflowUnavailable && ouroHostFlagAlloc(&mOverflow) != OURO_OK)
        {
            mOverflowUnavailable = true;
            logMessage(ILogger::Severity::kWARNING,
                std::string(kPlugin) + ": could not allocate the overflow flag; an overflow of max_outliers = "
                    + std::to_string(capacity()) + " will give NaN rows without an error status");
        }
        int64_t const batch = xd.d[0];
        ouroOutlierLinearParams_t p{};
        p.M = static_cast<int>(batch * c.seq_len);
        p.L = c.seq_len;
        p.K = c.in_features;
        p.N = c.out_features;
        p.x = inputs[kX];
        p.x_is_fp32 = inputDesc[kX].type == DataType::kFLOAT ? 1 : 0;
        p.w = static_cast<int8_t const*>(inputs[kWeight]);
        p.w_bits = c.w_bits;
        p.w_scale = static_cast<float const*>(inputs[kWScale]);
        p.bias = static_cast<float const*>(inputs[kBias]);
        p.act.bits = c.a_bits;
        p.act.bits_outlier = c.o_bits;
        p.act.n_refresh = c.n_refresh;
        p.act.policy = c.threshold_policy;
        p.act.k_sigma = c.k_sigma;
        p.act.std_correction = c.std_correction;
        p.act.scale = static_cast<float const*>(inputs[kInlierScale]);
        p.act.theta = c.threshold_policy == OURO_POLICY_CALIBRATED ? static_cast<float const*>(inputs[kTheta]) : nullptr;
        p.max_outliers = capacity();
        p.y = outputs[0];
        p.workspace = workspace;
        p.workspace_size = workspaceFor(batch);
        ouroOutlierLinearConfig_t cfg{};
        cfg.path = OURO_PATH_NONE;
        cfg.epilogue = OURO_EPILOGUE_AUTO;
        cfg.tactic = mTactic;
        cfg.overflow_report = mOverflow;
        ouroStatus_t const st = ouroOutlierLinearRun(&p, &cfg, stream, nullptr, nullptr);
        if (st != OURO_OK)
        {
            throw PluginError(std::string(kPlugin) + ": ouroOutlierLinearRun failed (" + ouroStatusString(st)
                + ") for M=" + std::to_string(p.M) + " K=" + std::to_string(p.K) + " N=" + std::to_string(p.N)
                + " tactic=" + std::to_string(mTactic));
        }
        return 0;
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return -1;
}

} // namespace plugin
} // namespace ouro
