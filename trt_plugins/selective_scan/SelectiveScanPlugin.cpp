#include "SelectiveScanPlugin.h"

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
using C = SelectiveScanConfig;
using S = FieldSpec<C>;
constexpr char const* kPlugin = SelectiveScanPlugin::kName;
constexpr float kMaxKSigma = 1.0e6F;
constexpr int32_t kFp16OutlierBits = 16;

IntRule bitsRule()
{
    return IntRule::oneOf({0, 2, 3, 4, 5, 6, 7, 8});
}
IntRule outlierBitsRule()
{
    return IntRule::oneOf({0, 2, 3, 4, 5, 6, 7, 8, 16});
}

bool has(std::vector<std::string> const& present, char const* name)
{
    return std::find(present.begin(), present.end(), name) != present.end();
}

void require(std::vector<std::string> const& present, char const* name, std::string const& because)
{
    if (!has(present, name))
    {
        throw PluginError(std::string(kPlugin) + ": missing field '" + name + "', required because " + because);
    }
}

char const* const kTableNames[] = {"delta_scale", "delta_theta", "b_scale", "b_theta", "c_scale", "c_theta"};

std::string tableName(int32_t i)
{
    return kTableNames[i - SelectiveScanPlugin::kDeltaScale];
}

std::string operandBitsName(int32_t i)
{
    return i <= SelectiveScanPlugin::kDeltaTheta ? "delta_bits" : (i <= SelectiveScanPlugin::kBTheta ? "b_bits" : "c_bits");
}

//! Both expressions constant and different -> error naming the two inputs.
void expectSame(IDimensionExpr const* a, IDimensionExpr const* b, int32_t ia, int32_t da, int32_t ib, int32_t db,
    char const* what)
{
    if (a && b && a->isConstant() && b->isConstant() && a->getConstantValue() != b->getConstantValue())
    {
        throw PluginError(std::string(kPlugin) + ": " + what + " mismatch: input " + std::to_string(ia) + " dim "
            + std::to_string(da) + " is " + std::to_string(a->getConstantValue()) + " but input " + std::to_string(ib)
            + " dim " + std::to_string(db) + " is " + std::to_string(b->getConstantValue()));
    }
}

ouroActQuant_t actQuant(int32_t bits, int32_t bitsOutlier, C const& c, float kSigma, void const* scale,
    void const* theta)
{
    ouroActQuant_t q{};
    if (bits <= 0)
    {
        return q; // bits = 0: operand not quantized
    }
    q.bits = bits;
    q.bits_outlier = bitsOutlier > 0 ? bitsOutlier : kFp16OutlierBits; // 0: outliers kept in fp16
    q.n_refresh = c.n_refresh;
    q.policy = c.threshold_policy;
    q.k_sigma = kSigma;
    q.std_correction = c.std_correction;
    q.scale = static_cast<float const*>(scale);
    q.theta = c.threshold_policy == OURO_POLICY_CALIBRATED ? static_cast<float const*>(theta) : nullptr;
    return q;
}
} // namespace

FieldTable<C> const& SelectiveScanPlugin::table()
{
    static FieldTable<C> const t(kPlugin,
        {
            S::intField("reverse", &C::reverse, IntRule::oneOf({0, 1})),
            S::intField("delta_softplus", &C::delta_softplus, IntRule::oneOf({0, 1})),
            S::intField("delta_bits", &C::delta_bits, bitsRule(), false),
            S::intField("delta_bits_outlier", &C::delta_bits_outlier, outlierBitsRule(), false),
            S::intField("b_bits", &C::b_bits, bitsRule(), false),
            S::intField("b_bits_outlier", &C::b_bits_outlier, outlierBitsRule(), false),
            S::intField("c_bits", &C::c_bits, bitsRule(), false),
            S::intField("c_bits_outlier", &C::c_bits_outlier, outlierBitsRule(), false),
            S::intField("n_refresh", &C::n_refresh, IntRule::range(1), false),
            S::intField("threshold_policy", &C::threshold_policy, IntRule::oneOf({0, 1}), false),
            S::floatField("delta_k_sigma", &C::delta_k_sigma, 0.F, kMaxKSigma, false),
            S::floatField("bc_k_sigma", &C::bc_k_sigma, 0.F, kMaxKSigma, false),
            S::intField("h_bits", &C::h_bits, bitsRule(), false),
            S::intField("h_group", &C::h_group, IntRule::range(1), false),
            S::intField("std_correction", &C::std_correction, IntRule::oneOf({0, 1}), false),
        });
    return t;
}

SelectiveScanConfig SelectiveScanPlugin::parseConfig(PluginFieldCollection const* fc)
{
    C cfg;
    std::vector<std::string> present;
    table().parse(fc, cfg, &present);

    struct Operand
    {
        char const* bitsName;
        int32_t bits;
        char const* kSigmaName;
    };
    Operand const operands[] = {
        {"delta_bits", cfg.delta_bits, "delta_k_sigma"},
        {"b_bits", cfg.b_bits, "bc_k_sigma"},
        {"c_bits", cfg.c_bits, "bc_k_sigma"},
    };
    for (Operand const& op : operands)
    {
        if (op.bits == 0)
        {
            continue;
        }
        std::string const because = std::string(op.bitsName) + " = " + std::to_string(op.bits);
        require(present, "n_refresh", because);
        require(present, "threshold_policy", because);
        if (cfg.threshold_policy == OURO_POLICY_DYNAMIC)
        {
            require(present, op.kSigmaName, because + " with threshold_policy 0 (dynamic)");
        }
    }
    if (cfg.h_bits > 0)
    {
        require(present, "h_group", "h_bits = " + std::to_string(cfg.h_bits));
    }
    return cfg;
}

void SelectiveScanPlugin::checkCounts(int32_t nbInputs, int32_t nbOutputs) const
{
    if ((nbInputs != kNbInputsFloat && nbInputs != kNbInputsQuant) || nbOutputs != 1)
    {
        throw PluginError(std::string(kPlugin) + ": expected 7 inputs (u, delta, A, B, C, D, z) or 15 (plus "
            "delta/b/c scale+theta, h_scale, h_zero) and 1 output, got " + std::to_string(nbInputs) + " inputs and "
            + std::to_string(nbOutputs) + " outputs");
    }
    if (mCfg.quantized() && nbInputs != kNbInputsQuant)
    {
        throw PluginError(std::string(kPlugin) + ": quantization attributes are set (delta_bits="
            + std::to_string(mCfg.delta_bits) + ", b_bits=" + std::to_string(mCfg.b_bits) + ", c_bits="
            + std::to_string(mCfg.c_bits) + ", h_bits=" + std::to_string(mCfg.h_bits) + ") but the node has "
            + std::to_string(nbInputs) + " inputs; quantized nodes need 15");
    }
}

void SelectiveScanPlugin::inferShapes(
    DimsExprs const* in, int32_t nbInputs, DimsExprs& out, IExprBuilder& /*exprBuilder*/) const
{
    checkCounts(nbInputs, 1);
    expectRank(in[kU], 3, kPlugin, kU, "u (B, L, D)");
    expectRank(in[kDelta], 3, kPlugin, kDelta, "delta (B, L, D)");
    expectRank(in[kA], 2, kPlugin, kA, "A (D, S)");
    expectRank(in[kB], 3, kPlugin, kB, "B (B, L, S)");
    expectRank(in[kC], 3, kPlugin, kC, "C (B, L, S)");
    expectRank(in[kDskip], 1, kPlugin, kDskip, "D (D)");
    expectRank(in[kZ], 3, kPlugin, kZ, "z (B, L, D)");
    for (int32_t i : {kDelta, kZ})
    {
        for (int32_t d = 0; d < 3; ++d)
        {
            expectSame(in[kU].d[d], in[i].d[d], kU, d, i, d, "(B, L, D)");
        }
    }
    for (int32_t i : {kB, kC})
    {
        expectSame(in[kU].d[0], in[i].d[0], kU, 0, i, 0, "batch");
        expectSame(in[kU].d[1], in[i].d[1], kU, 1, i, 1, "sequence length");
        expectSame(in[kA].d[1], in[i].d[2], kA, 1, i, 2, "d_state");
    }
    expectSame(in[kU].d[2], in[kA].d[0], kU, 2, kA, 0, "d_inner");
    expectSame(in[kU].d[2], in[kDskip].d[0], kU, 2, kDskip, 0, "d_inner");
    if (nbInputs == kNbInputsQuant)
    {
        for (int32_t i = kDeltaScale; i <= kCTheta; ++i)
        {
            expectRank(in[i], 1, kPlugin, i, "per-token table [L]");
            // An empty table means "this operand is not quantized" (the exporter writes [0] tables for them):
            // allowed exactly when the operand's bits are 0; a quantized operand needs [L] tables.
            IDimensionExpr const* len = in[i].d[0];
            bool const empty = len && len->isConstant() && len->getConstantValue() == 0;
            if (empty && mCfg.bitsOfTable(i) > 0)
            {
                throw PluginError(std::string(kPlugin) + ": input " + std::to_string(i) + " (" + tableName(i)
                    + ") is empty but " + operandBitsName(i) + " = " + std::to_string(mCfg.bitsOfTable(i))
                    + ": a quantized operand needs a table of L entries (an empty table means 'not quantized')");
            }
            if (!empty)
            {
                expectSame(in[kU].d[1], len, kU, 1, i, 0, "sequence length");
            }
        }
        expectRank(in[kHScale], 1, kPlugin, kHScale, "h_scale [G]");
        expectRank(in[kHZero], 1, kPlugin, kHZero, "h_zero [G]");
        IDimensionExpr const* L = in[kU].d[1];
        if (mCfg.h_bits > 0 && L->isConstant())
        {
            int64_t const groups = (L->getConstantValue() + mCfg.h_group - 1) / mCfg.h_group;
            expectDimIfConstant(in[kHScale].d[0], groups, kPlugin, kHScale, "h_scale", 0, "ceil(L / h_group)");
        }
        expectSame(in[kHScale].d[0], in[kHZero].d[0], kHScale, 0, kHZero, 0, "TGQ group count");
    }
    out = in[kU];
}

bool SelectiveScanPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || (nbInputs != kNbInputsFloat && nbInputs != kNbInputsQuant) || nbOutputs != 1 || pos < 0
        || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == kU)
    {
        return d.type == DataType::kFLOAT || d.type == DataType::kHALF;
    }
    bool const activation = pos == kDelta || pos == kB || pos == kC || pos == kZ || pos == nbInputs;
    if (activation)
    {
        return d.type == inOut[kU].desc.type; // u, delta, B, C, z and y share one dtype
    }
    return d.type == DataType::kFLOAT; // A, D and the quantization tables
}

size_t SelectiveScanPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    try
    {
        checkCounts(nbInputs, 1);
        Dims const& u = inputs[kU].max;
        Dims const& a = inputs[kA].max;
        int const io32 = inputs[kU].desc.type == DataType::kFLOAT ? 1 : 0;
        return ouroSelectiveScanWorkspaceSize(static_cast<int>(u.d[0]), static_cast<int>(u.d[1]),
            static_cast<int>(u.d[2]), static_cast<int>(a.d[1]), io32);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return 0;
}

int32_t SelectiveScanPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        C const& c = mCfg;
        Dims const& u = inputDesc[kU].dims;
        Dims const& a = inputDesc[kA].dims;
        if (u.nbDims != 3 || a.nbDims != 2)
        {
            throw PluginError(std::string(kPlugin) + ": enqueue with u of rank " + std::to_string(u.nbDims)
                + " and A of rank " + std::to_string(a.nbDims) + ", expected 3 and 2");
        }
        ouroSelectiveScanParams_t p{};
        p.B = static_cast<int>(u.d[0]);
        p.L = static_cast<int>(u.d[1]);
        p.D = static_cast<int>(u.d[2]);
        p.S = static_cast<int>(a.d[1]);
        p.io_is_fp32 = inputDesc[kU].type == DataType::kFLOAT ? 1 : 0;
        p.reverse = c.reverse;
        p.delta_softplus = c.delta_softplus;
        p.u = inputs[kU];
        p.delta = inputs[kDelta];
        p.A = static_cast<float const*>(inputs[kA]);
        p.Bm = inputs[kB];
        p.Cm = inputs[kC];
        p.Dskip = static_cast<float const*>(inputs[kDskip]);
        p.z = inputs[kZ];
        p.out = outputs[0];
        if (c.quantized()) // checkCounts guarantees 15 inputs for quantized nodes
        {
            for (int32_t i = kDeltaScale; i <= kCTheta; ++i)
            {
                Dims const& t = inputDesc[i].dims;
                bool const needed = c.bitsOfTable(i) > 0
                    && (i % 2 == 1 || c.threshold_policy == OURO_POLICY_CALIBRATED); // scales; thetas if calibrated
                if (needed && (t.nbDims != 1 || t.d[0] != p.L))
                {
                    throw PluginError(std::string(kPlugin) + ": enqueue with input " + std::to_string(i) + " ("
                        + tableName(i) + ") of " + std::to_string(t.nbDims == 1 ? t.d[0] : -1)
                        + " entries, expected L = " + std::to_string(p.L) + " because " + operandBitsName(i)
                        + " = " + std::to_string(c.bitsOfTable(i)));
                }
            }
            p.delta_q = actQuant(c.delta_bits, c.delta_bits_outlier, c, c.delta_k_sigma, inputs[kDeltaScale],
                inputs[kDeltaTheta]);
            p.b_q = actQuant(c.b_bits, c.b_bits_outlier, c, c.bc_k_sigma, inputs[kBScale], inputs[kBTheta]);
            p.c_q = actQuant(c.c_bits, c.c_bits_outlier, c, c.bc_k_sigma, inputs[kCScale], inputs[kCTheta]);
            if (c.h_bits > 0)
            {
                p.h_bits = c.h_bits;
                p.h_group = c.h_group;
                p.h_scale = static_cast<float const*>(inputs[kHScale]);
                p.h_zero = static_cast<float const*>(inputs[kHZero]);
            }
        }
        p.workspace = workspace;
        p.workspace_size = ouroSelectiveScanWorkspaceSize(p.B, p.L, p.D, p.S, p.io_is_fp32);
        ouroStatus_t const st = ouroSelectiveScan(&p, stream);
        if (st != OURO_OK)
        {
            throw PluginError(std::string(kPlugin) + ": ouroSelectiveScan failed (" + ouroStatusString(st) + ") for B="
                + std::to_string(p.B) + " L=" + std::to_string(p.L) + " D=" + std::to_string(p.D) + " S="
                + std::to_string(p.S));
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
