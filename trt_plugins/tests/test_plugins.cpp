// CPU unit tests of the ouro TensorRT plugins, without TensorRT's runtime (headers only).
//
// Each plugin is created through its creator (obtained from getCreators(), as trtexec does) from a
// PluginFieldCollection, then checked for: attribute parsing and the rejection of bad attributes
// (the error names the field), symbolic shape inference through a small IExprBuilder implementation,
// supportsFormatCombination, the serialise -> bytes -> deserialise round trip, clone and
// attachToContext, and the workspace size handed to TensorRT.
//
//   ouro_plugin_tests            run every test
//   ouro_plugin_tests PREFIX     run the tests whose name starts with PREFIX
//   ouro_plugin_tests --list     list the test names
//   ouro_plugin_tests --print-fields   list every plugin field and its type (contract cross-check)
#include "OutlierLinearPlugin.h"
#include "SelectiveScanPlugin.h"
#include "check.h"
#include "ouro_kernels.h"
#include "plugin_utils.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;
using namespace ouro::plugin;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" void setLoggerFinder(ILoggerFinder* finder);

// ============================================================================================
// Minimal test harness
// ============================================================================================
namespace
{
struct TestCase
{
    std::string name;
    std::function<void()> fn;
};
std::vector<TestCase>& registry()
{
    static std::vector<TestCase> r;
    return r;
}
struct Register
{
    Register(char const* name, std::function<void()> fn)
    {
        registry().push_back({name, std::move(fn)});
    }
};
using ouro_test::gChecks;
using ouro_test::gFailures;

#define TEST(name)                                                                                                     \
    void test_##name();                                                                                                \
    Register reg_##name(#name, test_##name);                                                                           \
    void test_##name()

bool contains(std::string const& s, std::string const& sub)
{
    return s.find(sub) != std::string::npos;
}

// ============================================================================================
// Logger capture (through the library's exported setLoggerFinder, as TensorRT would do)
// ============================================================================================
class CaptureLogger : public ILogger
{
public:
    void log(Severity /*severity*/, char const* msg) noexcept override
    {
        messages.emplace_back(msg);
    }
    std::vector<std::string> messages;
};

class CaptureFinder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &logger;
    }
    CaptureLogger logger;
};

CaptureFinder& finder()
{
    static CaptureFinder f;
    return f;
}

std::string lastLog()
{
    auto const& m = finder().logger.messages;
    return m.empty() ? std::string() : m.back();
}

// ============================================================================================
// A small IExprBuilder: constants fold, symbols stay symbolic ("B", "(B*2)").
// ============================================================================================
class ExprImpl : public apiv::VDimensionExpr
{
public:
    ExprImpl(bool isConst, int64_t v, std::string text)
        : mConst(isConst)
        , mValue(v)
        , mText(std::move(text))
    {
    }
    bool isConstant() const override
    {
        return mConst;
    }
    int64_t getConstantValue() const override
    {
        return mConst ? mValue : std::numeric_limits<int64_t>::min();
    }
    bool isSizeTensor() const override
    {
        return false;
    }
    std::string const& text() const
    {
        return mText;
    }

private:
    bool mConst;
    int64_t mValue;
    std::string mText;
};

class Expr : public IDimensionExpr
{
public:
    explicit Expr(std::unique_ptr<ExprImpl> impl)
        : mOwned(std::move(impl))
    {
        mImpl = mOwned.get();
    }
    std::string const& text() const
    {
        return mOwned->text();
    }

private:
    std::unique_ptr<ExprImpl> mOwned;
};

std::string exprText(IDimensionExpr const* e)
{
    auto const* x = dynamic_cast<Expr const*>(e);
    return x ? x->text() : std::string("<foreign>");
}

class BuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override
    {
        return make(true, value, std::to_string(value));
    }
    IDimensionExpr const* symbol(std::string const& name)
    {
        return make(false, 0, name);
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override
    {
        static std::map<DimensionOperation, std::pair<char const*, std::function<int64_t(int64_t, int64_t)>>> const ops
            = {
                {DimensionOperation::kSUM, {"+", [](int64_t x, int64_t y) { return x + y; }}},
                {DimensionOperation::kPROD, {"*", [](int64_t x, int64_t y) { return x * y; }}},
                {DimensionOperation::kMAX, {"max", [](int64_t x, int64_t y) { return std::max(x, y); }}},
                {DimensionOperation::kMIN, {"min", [](int64_t x, int64_t y) { return std::min(x, y); }}},
                {DimensionOperation::kSUB, {"-", [](int64_t x, int64_t y) { return x - y; }}},
                {DimensionOperation::kFLOOR_DIV, {"/", [](int64_t x, int64_t y) { return x / y; }}},
                {DimensionOperation::kCEIL_DIV, {"/^", [](int64_t x, int64_t y) { return (x + y - 1) / y; }}},
            };
        auto it = ops.find(op);
        if (it == ops.end())
        {
            return nullptr;
        }
        if (a.isConstant() && b.isConstant())
        {
            return constant(it->second.second(a.getConstantValue(), b.getConstantValue()));
        }
        return make(false, 0, "(" + exprText(&a) + it->second.first + exprText(&b) + ")");
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr; // our plugins have no size-tensor outputs
    }

private:
    IDimensionExpr const* make(bool isConst, int64_t v, std::string text)
    {
        mExprs.push_back(std::make_unique<Expr>(std::make_unique<ExprImpl>(isConst, v, std::move(text))));
        return mExprs.back().get();
    }
    std::vector<std::unique_ptr<Expr>> mExprs;
};

class TestExprBuilder : public IExprBuilder
{
public:
    TestExprBuilder()
    {
        mImpl = &mBuilder;
    }
    IDimensionExpr const* sym(std::string const& name)
    {
        return mBuilder.symbol(name);
    }
    IDimensionExpr const* c(int64_t v)
    {
        return mBuilder.constant(v);
    }
    //! Dims from a list of "symbol" or "123" strings.
    DimsExprs dims(std::vector<std::string> const& d)
    {
        DimsExprs out{};
        out.nbDims = static_cast<int32_t>(d.size());
        for (size_t i = 0; i < d.size(); ++i)
        {
            bool const numeric = !d[i].empty() && std::isdigit(static_cast<unsigned char>(d[i][0]));
            out.d[i] = numeric ? c(std::stoll(d[i])) : sym(d[i]);
        }
        return out;
    }

private:
    BuilderImpl mBuilder;
};

// ============================================================================================
// Field collections and creators
// ============================================================================================
class Fields
{
public:
    Fields& i(std::string const& name, int32_t v)
    {
        return raw(name, PluginFieldType::kINT32, &v, sizeof(v), 1);
    }
    Fields& f(std::string const& name, float v)
    {
        return raw(name, PluginFieldType::kFLOAT32, &v, sizeof(v), 1);
    }
    Fields& raw(std::string const& name, PluginFieldType type, void const* data, size_t bytes, int32_t length)
    {
        mNames.push_back(name);
        auto const* p = static_cast<uint8_t const*>(data);
        mData.emplace_back(p, p + bytes);
        mTypes.push_back(type);
        mLengths.push_back(length);
        return *this;
    }
    Fields& drop(std::string const& name)
    {
        for (size_t k = 0; k < mNames.size(); ++k)
        {
            if (mNames[k] == name)
            {
                mNames.erase(mNames.begin() + k);
                mData.erase(mData.begin() + k);
                mTypes.erase(mTypes.begin() + k);
                mLengths.erase(mLengths.begin() + k);
                return *this;
            }
        }
        return *this;
    }
    Fields& set(std::string const& name, int32_t v)
    {
        return drop(name).i(name, v);
    }
    Fields& setf(std::string const& name, float v)
    {
        return drop(name).f(name, v);
    }
    PluginFieldCollection const* fc()
    {
        mFields.clear();
        for (size_t k = 0; k < mNames.size(); ++k)
        {
            mFields.emplace_back(mNames[k].c_str(), mData[k].data(), mTypes[k], mLengths[k]);
        }
        mFc.nbFields = static_cast<int32_t>(mFields.size());
        mFc.fields = mFields.data();
        return &mFc;
    }

private:
    std::vector<std::string> mNames;
    std::vector<std::vector<uint8_t>> mData;
    std::vector<PluginFieldType> mTypes;
    std::vector<int32_t> mLengths;
    std::vector<PluginField> mFields;
    PluginFieldCollection mFc{};
};

IPluginCreatorV3One* creator(char const* name)
{
    int32_t n = 0;
    IPluginCreatorInterface* const* list = getCreators(n);
    for (int32_t k = 0; k < n; ++k)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(list[k]);
        if (std::strcmp(c->getPluginName(), name) == 0)
        {
            return c;
        }
    }
    return nullptr;
}

template <class P>
std::unique_ptr<P> create(Fields& f, TensorRTPhase phase = TensorRTPhase::kBUILD)
{
    IPluginV3* p = creator(P::kName)->createPlugin("test_layer", f.fc(), phase);
    return std::unique_ptr<P>(dynamic_cast<P*>(p));
}

//! The creator rejects `f`: returns nullptr, and the logged error (and the PluginError of
//! parseConfig) names `field`.
template <class P>
void expectRejected(Fields& f, std::string const& field)
{
    finder().logger.messages.clear();
    IPluginV3* p = creator(P::kName)->createPlugin("bad", f.fc(), TensorRTPhase::kBUILD);
    CHECK(p == nullptr);
    delete p;
    std::string const logged = lastLog();
    if (!contains(logged, "'" + field + "'"))
    {
        ++gFailures;
        std::fprintf(stderr, "  FAILED: error for field '%s' does not name it: \"%s\"\n", field.c_str(), logged.c_str());
    }
    CHECK(contains(logged, P::kName));
    bool threw = false;
    try
    {
        P::parseConfig(f.fc());
    }
    catch (PluginError const& e)
    {
        threw = contains(e.what(), field);
    }
    CHECK(threw);
}

DynamicPluginTensorDesc desc(DataType t, std::vector<int64_t> dims = {}, TensorFormat fmt = TensorFormat::kLINEAR)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = t;
    d.desc.format = fmt;
    d.desc.scale = -1.F;
    d.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t k = 0; k < dims.size(); ++k)
    {
        d.desc.dims.d[k] = dims[k];
    }
    d.min = d.opt = d.max = d.desc.dims;
    return d;
}

//! Serialise through the bytes TensorRT would store, then re-create in the runtime phase.
template <class P>
std::unique_ptr<P> roundTrip(P& plugin, std::vector<uint8_t>* bytesOut = nullptr)
{
    PluginFieldCollection const* fc = plugin.getFieldsToSerialize();
    CHECK(fc != nullptr);
    std::vector<uint8_t> bytes = serializeFields(*fc);
    if (bytesOut)
    {
        *bytesOut = bytes;
    }
    OwnedFields owned = deserializeFields(bytes.data(), bytes.size());
    IPluginV3* p = creator(P::kName)->createPlugin("restored", owned.collection(), TensorRTPhase::kRUNTIME);
    return std::unique_ptr<P>(dynamic_cast<P*>(p));
}

template <class P>
bool sameFields(P& a, P& b)
{
    return serializeFields(*a.getFieldsToSerialize()) == serializeFields(*b.getFieldsToSerialize());
}

// ============================================================================================
// OutlierLinear
// ============================================================================================
constexpr int32_t kK = 384;  // Vim-S d_model
constexpr int32_t kN = 1536; // Vim-S in_proj (2 * d_inner)
constexpr int32_t kL = 197;  // 196 patches + CLS

Fields outlierLinearFields(int32_t wBits = 4)
{
    Fields f;
    f.i("in_features", kK)
        .i("out_features", kN)
        .i("seq_len", kL)
        .i("w_bits", wBits)
        .i("a_bits", 4)
        .i("o_bits", 8)
        .i("n_refresh", 10)
        .i("threshold_policy", 0)
        .f("k_sigma", 3.0F)
        .i("max_outliers", 64);
    return f;
}

TEST(registry_exports_both_creators)
{
    int32_t n = -1;
    IPluginCreatorInterface* const* list = getCreators(n);
    CHECK_EQ(n, 2);
    std::vector<std::string> names;
    for (int32_t k = 0; k < n; ++k)
    {
        CHECK_EQ(std::string(list[k]->getInterfaceInfo().kind), std::string("PLUGIN CREATOR_V3ONE"));
        auto* c = static_cast<IPluginCreatorV3One*>(list[k]);
        names.emplace_back(c->getPluginName());
        CHECK_EQ(std::string(c->getPluginVersion()), std::string("1"));
        CHECK_EQ(std::string(c->getPluginNamespace()), std::string("ouro"));
    }
    CHECK(names == (std::vector<std::string>{"OutlierLinear", "SelectiveScan"}));
}

TEST(outlier_linear_field_names)
{
    PluginFieldCollection const* fc = creator("OutlierLinear")->getFieldNames();
    std::vector<std::string> const expected = {"in_features", "out_features", "seq_len", "w_bits", "a_bits", "o_bits",
        "n_refresh", "threshold_policy", "k_sigma", "max_outliers", "std_correction"};
    CHECK_EQ(fc->nbFields, static_cast<int32_t>(expected.size()));
    for (int32_t k = 0; k < fc->nbFields && k < static_cast<int32_t>(expected.size()); ++k)
    {
        CHECK_EQ(std::string(fc->fields[k].name), expected[k]);
        PluginFieldType const want = expected[k] == "k_sigma" ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32;
        CHECK(fc->fields[k].type == want);
    }
}

TEST(outlier_linear_parses_attributes)
{
    Fields f = outlierLinearFields();
    auto p = create<OutlierLinearPlugin>(f);
    CHECK(p != nullptr);
    if (!p)
    {
        return;
    }
    OutlierLinearConfig const& c = p->config();
    CHECK_EQ(c.in_features, kK);
    CHECK_EQ(c.out_features, kN);
    CHECK_EQ(c.seq_len, kL);
    CHECK_EQ(c.w_bits, 4);
    CHECK_EQ(c.a_bits, 4);
    CHECK_EQ(c.o_bits, 8);
    CHECK_EQ(c.n_refresh, 10);
    CHECK_EQ(c.threshold_policy, 0);
    CHECK_EQ(c.k_sigma, 3.0F);
    CHECK_EQ(c.max_outliers, 64);
    CHECK_EQ(c.std_correction, 0); // absent: 0, the behaviour of graphs written before the attribute existed
    CHECK_EQ(std::string(p->getPluginName()), std::string("OutlierLinear"));
    CHECK_EQ(std::string(p->getPluginVersion()), std::string("1"));
    CHECK_EQ(std::string(p->getPluginNamespace()), std::string("ouro"));
    CHECK_EQ(p->getNbOutputs(), 1);
    // IPluginV3 capability wiring, as TensorRT queries it.
    IPluginV3* base = p.get();
    CHECK_EQ(std::string(base->getInterfaceInfo().kind), std::string("PLUGIN"));
    CHECK_EQ(std::string(base->getCapabilityInterface(PluginCapabilityType::kCORE)->getInterfaceInfo().kind),
        std::string("PLUGIN_V3ONE_CORE"));
    CHECK_EQ(std::string(base->getCapabilityInterface(PluginCapabilityType::kBUILD)->getInterfaceInfo().kind),
        std::string("PLUGIN_V3ONE_BUILD"));
    CHECK_EQ(std::string(base->getCapabilityInterface(PluginCapabilityType::kRUNTIME)->getInterfaceInfo().kind),
        std::string("PLUGIN_V3ONE_RUNTIME"));
    // Integer-valued attributes also arrive as INT64 / float ones as FLOAT64 from some producers.
    int64_t const n64 = 10;
    double const k64 = 2.5;
    Fields g = outlierLinearFields();
    g.drop("n_refresh").raw("n_refresh", PluginFieldType::kINT64, &n64, sizeof(n64), 1);
    g.drop("k_sigma").raw("k_sigma", PluginFieldType::kFLOAT64, &k64, sizeof(k64), 1);
    auto q = create<OutlierLinearPlugin>(g);
    CHECK(q != nullptr);
    if (q)
    {
        CHECK_EQ(q->config().n_refresh, 10);
        CHECK_EQ(q->config().k_sigma, 2.5F);
    }
    // max_outliers 0 = no limit (the capacity handed to the kernel is K), as in the onnxruntime reference.
    Fields unlimited = outlierLinearFields();
    unlimited.set("max_outliers", 0);
    auto u = create<OutlierLinearPlugin>(unlimited);
    CHECK(u != nullptr);
    if (u)
    {
        CHECK_EQ(u->config().max_outliers, 0);
        CHECK_EQ(u->capacity(), kK);
    }
    Fields bessel = outlierLinearFields();
    bessel.i("std_correction", 1);
    auto sb = create<OutlierLinearPlugin>(bessel);
    CHECK(sb && sb->config().std_correction == 1);
    // plugin_version / plugin_namespace (ONNX node bookkeeping) are tolerated.
    Fields h = outlierLinearFields();
    char const ver[] = "1";
    h.raw("plugin_version", PluginFieldType::kCHAR, ver, sizeof(ver), sizeof(ver));
    CHECK(create<OutlierLinearPlugin>(h) != nullptr);
}

TEST(outlier_linear_rejects_bad_attributes)
{
    struct Case
    {
        char const* field;
        int32_t value;
    };
    Case const bad[] = {{"w_bits", 3}, {"w_bits", 16}, {"a_bits", 2}, {"a_bits", 16}, {"o_bits", 12}, {"o_bits", 0},
        {"n_refresh", 0}, {"threshold_policy", 2}, {"threshold_policy", -1}, {"in_features", 0},
        {"out_features", -5}, {"seq_len", 0}, {"max_outliers", -1}, {"max_outliers", kK + 1}};
    for (Case const& c : bad)
    {
        Fields f = outlierLinearFields();
        f.set(c.field, c.value);
        expectRejected<OutlierLinearPlugin>(f, c.field);
    }
    Fields corr = outlierLinearFields();
    corr.i("std_correction", 2);
    expectRejected<OutlierLinearPlugin>(corr, "std_correction");
    {
        Fields f = outlierLinearFields();
        f.setf("k_sigma", std::nanf(""));
        expectRejected<OutlierLinearPlugin>(f, "k_sigma");
        f.setf("k_sigma", -1.0F);
        expectRejected<OutlierLinearPlugin>(f, "k_sigma");
    }
    {
        Fields f = outlierLinearFields(4);
        f.set("in_features", 383).set("max_outliers", 8); // packed int4 needs an even K
        expectRejected<OutlierLinearPlugin>(f, "in_features");
    }
    {
        Fields f = outlierLinearFields();
        f.drop("seq_len");
        expectRejected<OutlierLinearPlugin>(f, "seq_len");
        CHECK(contains(lastLog(), "missing"));
    }
    {
        Fields f = outlierLinearFields();
        f.i("w_bit", 4); // typo
        expectRejected<OutlierLinearPlugin>(f, "w_bit");
        CHECK(contains(lastLog(), "unknown field"));
    }
    {
        Fields f = outlierLinearFields();
        f.i("a_bits", 8); // given twice
        expectRejected<OutlierLinearPlugin>(f, "a_bits");
    }
    {
        Fields f = outlierLinearFields();
        char const text[] = "4";
        f.drop("w_bits").raw("w_bits", PluginFieldType::kCHAR, text, sizeof(text), sizeof(text));
        expectRejected<OutlierLinearPlugin>(f, "w_bits");
    }
    {
        Fields f = outlierLinearFields();
        int32_t const two[2] = {4, 4};
        f.drop("w_bits").raw("w_bits", PluginFieldType::kINT32, two, sizeof(two), 2);
        expectRejected<OutlierLinearPlugin>(f, "w_bits");
        CHECK(contains(lastLog(), "length 2"));
    }
    {
        Fields f = outlierLinearFields();
        f.drop("k_sigma").raw("k_sigma", PluginFieldType::kFLOAT32, nullptr, 0, 1);
        expectRejected<OutlierLinearPlugin>(f, "k_sigma");
    }
}

TEST(outlier_linear_shape_inference)
{
    for (int32_t wBits : {4, 8})
    {
        Fields f = outlierLinearFields(wBits);
        auto p = create<OutlierLinearPlugin>(f);
        CHECK(p != nullptr);
        if (!p)
        {
            return;
        }
        std::string const kw = std::to_string(wBits == 8 ? kK : kK / 2);
        TestExprBuilder eb;
        std::vector<DimsExprs> in = {eb.dims({"B", std::to_string(kL), std::to_string(kK)}),
            eb.dims({std::to_string(kN), kw}), eb.dims({std::to_string(kN)}), eb.dims({std::to_string(kL)}),
            eb.dims({std::to_string(kL)}), eb.dims({std::to_string(kN)})};
        DimsExprs out{};
        CHECK_EQ(p->getOutputShapes(in.data(), 6, nullptr, 0, &out, 1, eb), 0);
        CHECK_EQ(out.nbDims, 3);
        CHECK(out.d[0] == in[0].d[0]); // the symbolic batch passes through
        CHECK_EQ(exprText(out.d[0]), std::string("B"));
        CHECK(out.d[1]->isConstant() && out.d[1]->getConstantValue() == kL);
        CHECK(out.d[2]->isConstant() && out.d[2]->getConstantValue() == kN);

        // A fully symbolic (B, L, K) x still works: L passes through, N is a constant.
        std::vector<DimsExprs> symIn = in;
        symIn[0] = eb.dims({"B", "L", std::to_string(kK)});
        CHECK_EQ(p->getOutputShapes(symIn.data(), 6, nullptr, 0, &out, 1, eb), 0);
        CHECK_EQ(exprText(out.d[1]), std::string("L"));

        struct Bad
        {
            size_t input;
            std::vector<std::string> dims;
            char const* mentions;
        };
        std::vector<Bad> const bad = {
            {0, {"B", std::to_string(kL), "383"}, "in_features"},
            {0, {"B", "196", std::to_string(kK)}, "seq_len"},
            {0, {"B", std::to_string(kK)}, "rank"},
            {1, {std::to_string(kN), wBits == 8 ? std::to_string(kK / 2) : std::to_string(kK)}, "weight"},
            {1, {"1535", kw}, "out_features"},
            {2, {"1535"}, "w_scale"},
            {3, {"196"}, "inlier_scale"},
            {4, {"198"}, "theta"},
            {5, {"7"}, "bias"},
        };
        for (Bad const& b : bad)
        {
            std::vector<DimsExprs> badIn = in;
            badIn[b.input] = eb.dims(b.dims);
            finder().logger.messages.clear();
            CHECK(p->getOutputShapes(badIn.data(), 6, nullptr, 0, &out, 1, eb) != 0);
            CHECK(contains(lastLog(), b.mentions));
        }
        finder().logger.messages.clear();
        CHECK(p->getOutputShapes(in.data(), 5, nullptr, 0, &out, 1, eb) != 0);
        CHECK(contains(lastLog(), "expected 6 inputs"));
    }
}

TEST(outlier_linear_output_types)
{
    Fields f = outlierLinearFields();
    auto p = create<OutlierLinearPlugin>(f);
    CHECK(p != nullptr);
    if (!p)
    {
        return;
    }
    for (DataType t : {DataType::kFLOAT, DataType::kHALF})
    {
        DataType in[6] = {t, DataType::kINT8, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT};
        DataType out = DataType::kINT32;
        CHECK_EQ(p->getOutputDataTypes(&out, 1, in, 6), 0);
        CHECK(out == t);
    }
    DataType in[6] = {DataType::kINT8, DataType::kINT8, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT,
        DataType::kFLOAT};
    DataType out = DataType::kFLOAT;
    CHECK(p->getOutputDataTypes(&out, 1, in, 6) != 0);
}

TEST(outlier_linear_supports_format_combination)
{
    for (int32_t wBits : {4, 8})
    {
        Fields f = outlierLinearFields(wBits);
        auto p = create<OutlierLinearPlugin>(f);
        CHECK(p != nullptr);
        if (!p)
        {
            return;
        }
        for (DataType x : {DataType::kFLOAT, DataType::kHALF})
        {
            std::vector<DynamicPluginTensorDesc> io = {desc(x), desc(DataType::kINT8), desc(DataType::kFLOAT),
                desc(DataType::kFLOAT), desc(DataType::kFLOAT), desc(DataType::kFLOAT), desc(x)};
            for (int32_t pos = 0; pos < 7; ++pos)
            {
                CHECK(p->supportsFormatCombination(pos, io.data(), 6, 1));
            }
            // Output must have x's dtype.
            io[6] = desc(x == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT);
            CHECK(!p->supportsFormatCombination(6, io.data(), 6, 1));
            // Packed int4 weight bytes may be UINT8; an 8-bit weight may not.
            io[1] = desc(DataType::kUINT8);
            CHECK_EQ(p->supportsFormatCombination(1, io.data(), 6, 1), wBits == 4);
            io[1] = desc(DataType::kHALF);
            CHECK(!p->supportsFormatCombination(1, io.data(), 6, 1));
            // Scales are fp32 only.
            io[2] = desc(DataType::kHALF);
            CHECK(!p->supportsFormatCombination(2, io.data(), 6, 1));
            // Only linear formats.
            io[0] = desc(x, {}, TensorFormat::kCHW32);
            CHECK(!p->supportsFormatCombination(0, io.data(), 6, 1));
        }
        std::vector<DynamicPluginTensorDesc> io(7, desc(DataType::kINT8));
        CHECK(!p->supportsFormatCombination(0, io.data(), 6, 1));      // int8 activations: not a plugin input type
        CHECK(!p->supportsFormatCombination(7, io.data(), 6, 1));      // out of range
        CHECK(!p->supportsFormatCombination(0, io.data(), 5, 1));      // wrong input count
    }
}

TEST(outlier_linear_serialize_round_trip)
{
    for (int32_t policy : {0, 1})
    {
        Fields f = outlierLinearFields(8);
        f.set("threshold_policy", policy).set("o_bits", 16).setf("k_sigma", 2.75F).set("max_outliers", 17);
        auto p = create<OutlierLinearPlugin>(f);
        CHECK(p != nullptr);
        if (!p)
        {
            return;
        }
        PluginFieldCollection const* fc = p->getFieldsToSerialize();
        CHECK_EQ(fc->nbFields, 11); // every attribute is serialised (std_correction's default included)
        std::vector<uint8_t> bytes;
        auto q = roundTrip(*p, &bytes);
        CHECK(q != nullptr);
        if (!q)
        {
            return;
        }
        CHECK(sameFields(*p, *q));
        CHECK_EQ(q->config().threshold_policy, policy);
        CHECK_EQ(q->config().o_bits, 16);
        CHECK_EQ(q->config().k_sigma, 2.75F);
        CHECK_EQ(q->config().max_outliers, 17);
        CHECK_EQ(std::string(p->getMetadataString()), std::string(q->getMetadataString()));
        // A corrupt/truncated blob is refused, never read past its end.
        bool threw = false;
        try
        {
            deserializeFields(bytes.data(), bytes.size() - 3);
        }
        catch (PluginError const&)
        {
            threw = true;
        }
        CHECK(threw);
    }
}

TEST(outlier_linear_clone_and_attach)
{
    Fields f = outlierLinearFields();
    auto p = create<OutlierLinearPlugin>(f);
    CHECK(p != nullptr);
    if (!p)
    {
        return;
    }
    std::unique_ptr<IPluginV3> c(p->clone());
    auto* cp = dynamic_cast<OutlierLinearPlugin*>(c.get());
    CHECK(cp != nullptr && cp != p.get());
    if (cp)
    {
        CHECK(sameFields(*p, *cp));
        CHECK(c->getCapabilityInterface(PluginCapabilityType::kBUILD) != nullptr);
        CHECK(c->getCapabilityInterface(PluginCapabilityType::kRUNTIME) != nullptr);
    }
    p.reset(); // the clone must not depend on the original
    if (cp)
    {
        CHECK_EQ(cp->getFieldsToSerialize()->nbFields, 11);
        std::unique_ptr<IPluginV3> a(cp->attachToContext(nullptr));
        auto* ap = dynamic_cast<OutlierLinearPlugin*>(a.get());
        CHECK(ap != nullptr && ap != cp);
        if (ap)
        {
            CHECK(sameFields(*cp, *ap));
        }
    }
}

TEST(outlier_linear_workspace_uses_max_profile)
{
    Fields f = outlierLinearFields();
    auto p = create<OutlierLinearPlugin>(f);
    CHECK(p != nullptr);
    if (!p)
    {
        return;
    }
    std::vector<DynamicPluginTensorDesc> in = {desc(DataType::kHALF, {-1, kL, kK}), desc(DataType::kINT8, {kN, kK / 2}),
        desc(DataType::kFLOAT, {kN}), desc(DataType::kFLOAT, {kL}), desc(DataType::kFLOAT, {kL}),
        desc(DataType::kFLOAT, {kN})};
    in[0].min.d[0] = 1;
    in[0].opt.d[0] = 32;
    in[0].max.d[0] = 128;
    DynamicPluginTensorDesc out = desc(DataType::kHALF, {-1, kL, kN});
    size_t const ws = p->getWorkspaceSize(in.data(), 6, &out, 1);
    // The layout of the epilogue the kernels run (fused here: no M x N int32 buffers), for the largest batch.
    CHECK_EQ(ws, ouroOutlierLinearWorkspaceSizeFor(128 * kL, kL, kK, kN, 4, 4, 8, 10, 64, OURO_EPILOGUE_AUTO));
    CHECK_EQ(ws, ouroOutlierLinearWorkspaceSizeFor(128 * kL, kL, kK, kN, 4, 4, 8, 10, 64, OURO_EPILOGUE_FUSED));
    CHECK(ws >= ouroOutlierLinearWorkspaceSizeFor(32 * kL, kL, kK, kN, 4, 4, 8, 10, 64, OURO_EPILOGUE_AUTO));
    CHECK(ws + 2 * size_t{128} * kL * kN * 4 <= ouroOutlierLinearWorkspaceSize(128 * kL, kL, kK, kN, 4, 4, 8, 10, 64));
    CHECK_EQ(p->configurePlugin(in.data(), 6, &out, 1), 0);
    CHECK(p->configurePlugin(in.data(), 4, &out, 1) != 0);
}

// ============================================================================================
// SelectiveScan
// ============================================================================================
constexpr int32_t kD = 768; // Vim-S d_inner
constexpr int32_t kS = 16;  // d_state

Fields scanFieldsFloat(int32_t reverse = 1)
{
    Fields f;
    f.i("reverse", reverse).i("delta_softplus", 1);
    return f;
}

Fields scanFieldsQuant(int32_t policy = 0)
{
    Fields f = scanFieldsFloat();
    f.i("delta_bits", 8)
        .i("delta_bits_outlier", 8)
        .i("b_bits", 4)
        .i("b_bits_outlier", 16)
        .i("c_bits", 4)
        .i("c_bits_outlier", 8)
        .i("n_refresh", 10)
        .i("threshold_policy", policy)
        .f("delta_k_sigma", 3.0F)
        .f("bc_k_sigma", 2.0F)
        .i("h_bits", 8)
        .i("h_group", 10);
    return f;
}

TEST(selective_scan_field_names)
{
    PluginFieldCollection const* fc = creator("SelectiveScan")->getFieldNames();
    std::vector<std::string> const expected = {"reverse", "delta_softplus", "delta_bits", "delta_bits_outlier",
        "b_bits", "b_bits_outlier", "c_bits", "c_bits_outlier", "n_refresh", "threshold_policy", "delta_k_sigma",
        "bc_k_sigma", "h_bits", "h_group", "std_correction"};
    CHECK_EQ(fc->nbFields, static_cast<int32_t>(expected.size()));
    for (int32_t k = 0; k < fc->nbFields && k < static_cast<int32_t>(expected.size()); ++k)
    {
        CHECK_EQ(std::string(fc->fields[k].name), expected[k]);
        bool const isFloat = contains(expected[k], "k_sigma");
        CHECK(fc->fields[k].type == (isFloat ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32));
    }
}

TEST(selective_scan_parses_attributes)
{
    Fields f = scanFieldsFloat(1);
    auto p = create<SelectiveScanPlugin>(f);
    CHECK(p != nullptr);
    if (p)
    {
        CHECK_EQ(p->config().reverse, 1);
        CHECK_EQ(p->config().delta_softplus, 1);
        CHECK(!p->config().quantized());
    }
    Fields q = scanFieldsQuant();
    auto pq = create<SelectiveScanPlugin>(q);
    CHECK(pq != nullptr);
    if (pq)
    {
        SelectiveScanConfig const& c = pq->config();
        CHECK(c.quantized());
        CHECK_EQ(c.delta_bits, 8);
        CHECK_EQ(c.b_bits_outlier, 16);
        CHECK_EQ(c.c_bits, 4);
        CHECK_EQ(c.n_refresh, 10);
        CHECK_EQ(c.delta_k_sigma, 3.0F);
        CHECK_EQ(c.bc_k_sigma, 2.0F);
        CHECK_EQ(c.h_bits, 8);
        CHECK_EQ(c.h_group, 10);
    }
    // Calibrated thresholds: k_sigma fields are not needed.
    Fields cal = scanFieldsQuant(1);
    cal.drop("delta_k_sigma").drop("bc_k_sigma");
    CHECK(create<SelectiveScanPlugin>(cal) != nullptr);
    // Outlier bits 0 (or absent) with an operand quantized = outliers kept in fp16.
    Fields fp16Outliers = scanFieldsQuant();
    fp16Outliers.drop("delta_bits_outlier").set("c_bits_outlier", 0);
    CHECK(create<SelectiveScanPlugin>(fp16Outliers) != nullptr);
    // Only h quantized: operand fields not needed.
    Fields hOnly = scanFieldsFloat();
    hOnly.i("h_bits", 4).i("h_group", 1);
    CHECK(create<SelectiveScanPlugin>(hOnly) != nullptr);
}

TEST(selective_scan_rejects_bad_attributes)
{
    struct Case
    {
        char const* field;
        int32_t value;
    };
    Case const bad[] = {{"reverse", 2}, {"delta_softplus", -1}, {"delta_bits", 1}, {"delta_bits", 9},
        {"b_bits_outlier", 12}, {"c_bits", 16}, {"n_refresh", 0}, {"threshold_policy", 3}, {"h_bits", 16},
        {"h_group", 0}};
    for (Case const& c : bad)
    {
        Fields f = scanFieldsQuant();
        f.set(c.field, c.value);
        expectRejected<SelectiveScanPlugin>(f, c.field);
    }
    struct Missing
    {
        char const* drop;
        char const* field;
    };
    // (dropped field, field the error must name)
    Missing const missing[] = {{"reverse", "reverse"}, {"delta_softplus", "delta_softplus"},
        {"n_refresh", "n_refresh"}, {"threshold_policy", "threshold_policy"}, {"delta_k_sigma", "delta_k_sigma"},
        {"bc_k_sigma", "bc_k_sigma"}, {"h_group", "h_group"}};
    for (Missing const& m : missing)
    {
        Fields f = scanFieldsQuant();
        f.drop(m.drop);
        expectRejected<SelectiveScanPlugin>(f, m.field);
    }
    Fields f = scanFieldsQuant();
    f.setf("bc_k_sigma", std::numeric_limits<float>::infinity());
    expectRejected<SelectiveScanPlugin>(f, "bc_k_sigma");
}

std::vector<DimsExprs> scanInputs(TestExprBuilder& eb, bool quant, std::string const& L = std::to_string(kL))
{
    std::string const D = std::to_string(kD);
    std::string const S = std::to_string(kS);
    std::vector<DimsExprs> in = {eb.dims({"B", L, D}), eb.dims({"B", L, D}), eb.dims({D, S}), eb.dims({"B", L, S}),
        eb.dims({"B", L, S}), eb.dims({D}), eb.dims({"B", L, D})};
    if (quant)
    {
        for (int k = 0; k < 6; ++k)
        {
            in.push_back(eb.dims({L}));
        }
        std::string const G = std::to_string((kL + 9) / 10); // h_group 10
        in.push_back(eb.dims({G}));
        in.push_back(eb.dims({G}));
    }
    return in;
}

TEST(selective_scan_shape_inference)
{
    for (bool quant : {false, true})
    {
        Fields f = quant ? scanFieldsQuant() : scanFieldsFloat();
        auto p = create<SelectiveScanPlugin>(f);
        CHECK(p != nullptr);
        if (!p)
        {
            return;
        }
        TestExprBuilder eb;
        std::vector<DimsExprs> in = scanInputs(eb, quant);
        int32_t const n = static_cast<int32_t>(in.size());
        DimsExprs out{};
        CHECK_EQ(p->getOutputShapes(in.data(), n, nullptr, 0, &out, 1, eb), 0);
        CHECK_EQ(out.nbDims, 3);
        CHECK_EQ(exprText(out.d[0]), std::string("B"));
        CHECK(out.d[1]->getConstantValue() == kL);
        CHECK(out.d[2]->getConstantValue() == kD);
        // Dynamic sequence length is fine too.
        std::vector<DimsExprs> dyn = scanInputs(eb, quant, "L");
        if (quant)
        {
            dyn[13] = eb.dims({"G"});
            dyn[14] = eb.dims({"G"});
        }
        CHECK_EQ(p->getOutputShapes(dyn.data(), n, nullptr, 0, &out, 1, eb), 0);
        CHECK_EQ(exprText(out.d[1]), std::string("L"));

        struct Bad
        {
            size_t input;
            std::vector<std::string> dims;
            char const* mentions;
        };
        std::vector<Bad> bad = {
            {2, {std::to_string(kD), "8"}, "d_state"},
            {1, {"B", std::to_string(kL), "767"}, "(B, L, D)"},
            {3, {"B", "196", std::to_string(kS)}, "sequence length"},
            {5, {"767"}, "d_inner"},
            {6, {"B", std::to_string(kL)}, "rank"},
        };
        if (quant)
        {
            bad.push_back({9, {"196"}, "sequence length"});
            bad.push_back({13, {"19"}, "ceil(L / h_group)"});
            bad.push_back({14, {"21"}, "TGQ group count"});
        }
        for (Bad const& b : bad)
        {
            std::vector<DimsExprs> badIn = in;
            badIn[b.input] = eb.dims(b.dims);
            finder().logger.messages.clear();
            CHECK(p->getOutputShapes(badIn.data(), n, nullptr, 0, &out, 1, eb) != 0);
            if (!contains(lastLog(), b.mentions))
            {
                ++gFailures;
                std::fprintf(stderr, "  FAILED: shape error lacks '%s': \"%s\"\n", b.mentions, lastLog().c_str());
            }
        }
        CHECK(p->getOutputShapes(in.data(), 6, nullptr, 0, &out, 1, eb) != 0);
    }
    // A partly quantized scan (what the exporter writes): the tables of an operand that is not quantized are
    // empty [0]; shape inference accepts them, and rejects an empty table of a quantized operand, naming it.
    {
        Fields part = scanFieldsFloat();
        part.i("delta_bits", 8).i("delta_bits_outlier", 8).i("n_refresh", 10).i("threshold_policy", 0)
            .f("delta_k_sigma", 4.0F).f("bc_k_sigma", 3.0F).i("h_bits", 0).i("h_group", 1).i("b_bits", 0)
            .i("b_bits_outlier", 0).i("c_bits", 0).i("c_bits_outlier", 0);
        auto pp = create<SelectiveScanPlugin>(part);
        CHECK(pp != nullptr);
        TestExprBuilder eb;
        std::vector<DimsExprs> in = scanInputs(eb, true);
        for (int32_t i : {9, 10, 11, 12, 13, 14})
        {
            in[i] = eb.dims({"0"}); // b/c scale+theta and h_scale/h_zero empty
        }
        DimsExprs out{};
        finder().logger.messages.clear();
        CHECK(pp && pp->getOutputShapes(in.data(), 15, nullptr, 0, &out, 1, eb) == 0);
        CHECK_EQ(out.nbDims, 3);
        std::vector<DimsExprs> bad = in;
        bad[7] = eb.dims({"0"}); // delta_scale empty although delta_bits = 8
        finder().logger.messages.clear();
        CHECK(pp && pp->getOutputShapes(bad.data(), 15, nullptr, 0, &out, 1, eb) != 0);
        CHECK(contains(lastLog(), "input 7 (delta_scale) is empty but delta_bits = 8"));
        std::vector<DimsExprs> wrong = in;
        wrong[11] = eb.dims({"5"}); // a non-empty table must still have L entries
        finder().logger.messages.clear();
        CHECK(pp && pp->getOutputShapes(wrong.data(), 15, nullptr, 0, &out, 1, eb) != 0);
        CHECK(contains(lastLog(), "sequence length"));
    }
    // A quantized node must have the 15 inputs.
    Fields q = scanFieldsQuant();
    auto pq = create<SelectiveScanPlugin>(q);
    TestExprBuilder eb;
    std::vector<DimsExprs> in = scanInputs(eb, false);
    DimsExprs out{};
    finder().logger.messages.clear();
    CHECK(pq && pq->getOutputShapes(in.data(), 7, nullptr, 0, &out, 1, eb) != 0);
    CHECK(contains(lastLog(), "need 15"));
}

TEST(selective_scan_supports_format_combination)
{
    for (bool quant : {false, true})
    {
        Fields f = quant ? scanFieldsQuant() : scanFieldsFloat();
        auto p = create<SelectiveScanPlugin>(f);
        CHECK(p != nullptr);
        if (!p)
        {
            return;
        }
        int32_t const n = quant ? 15 : 7;
        for (DataType t : {DataType::kFLOAT, DataType::kHALF})
        {
            DataType const other = t == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
            std::vector<DynamicPluginTensorDesc> io;
            for (int32_t k = 0; k <= n; ++k)
            {
                bool const act = k == 0 || k == 1 || k == 3 || k == 4 || k == 6 || k == n;
                io.push_back(desc(act ? t : DataType::kFLOAT));
            }
            for (int32_t pos = 0; pos <= n; ++pos)
            {
                CHECK(p->supportsFormatCombination(pos, io.data(), n, 1));
            }
            for (int32_t pos : {1, 3, 4, 6, n}) // activations follow u's dtype
            {
                auto bad = io;
                bad[pos] = desc(other);
                CHECK(!p->supportsFormatCombination(pos, bad.data(), n, 1));
            }
            for (int32_t pos = 7; pos < n; ++pos) // quantization tables are fp32
            {
                auto bad = io;
                bad[pos] = desc(DataType::kHALF);
                CHECK(!p->supportsFormatCombination(pos, bad.data(), n, 1));
            }
            auto bad = io;
            bad[2] = desc(DataType::kHALF); // A is fp32
            CHECK(!p->supportsFormatCombination(2, bad.data(), n, 1));
            bad = io;
            bad[0] = desc(t, {}, TensorFormat::kHWC8);
            CHECK(!p->supportsFormatCombination(0, bad.data(), n, 1));
            bad[0] = desc(DataType::kINT8);
            CHECK(!p->supportsFormatCombination(0, bad.data(), n, 1));
        }
    }
}

TEST(selective_scan_serialize_round_trip_and_clone)
{
    for (bool quant : {false, true})
    {
        Fields f = quant ? scanFieldsQuant(1) : scanFieldsFloat(0);
        auto p = create<SelectiveScanPlugin>(f);
        CHECK(p != nullptr);
        if (!p)
        {
            return;
        }
        CHECK_EQ(p->getFieldsToSerialize()->nbFields, 15); // every attribute, defaults included
        auto q = roundTrip(*p);
        CHECK(q != nullptr);
        if (q)
        {
            CHECK(sameFields(*p, *q));
            CHECK_EQ(q->config().quantized(), quant);
            CHECK_EQ(q->config().reverse, quant ? 1 : 0);
        }
        std::unique_ptr<IPluginV3> c(p->clone());
        auto* cp = dynamic_cast<SelectiveScanPlugin*>(c.get());
        CHECK(cp != nullptr && cp != p.get());
        if (cp)
        {
            CHECK(sameFields(*p, *cp));
        }
        std::unique_ptr<IPluginV3> a(p->attachToContext(nullptr));
        auto* ap = dynamic_cast<SelectiveScanPlugin*>(a.get());
        CHECK(ap != nullptr && ap != p.get());
        if (ap)
        {
            CHECK(sameFields(*p, *ap));
        }
    }
}

TEST(selective_scan_workspace_uses_max_profile)
{
    Fields f = scanFieldsFloat();
    auto p = create<SelectiveScanPlugin>(f);
    CHECK(p != nullptr);
    if (!p)
    {
        return;
    }
    for (DataType t : {DataType::kFLOAT, DataType::kHALF})
    {
        std::vector<DynamicPluginTensorDesc> in = {desc(t, {-1, kL, kD}), desc(t, {-1, kL, kD}),
            desc(DataType::kFLOAT, {kD, kS}), desc(t, {-1, kL, kS}), desc(t, {-1, kL, kS}),
            desc(DataType::kFLOAT, {kD}), desc(t, {-1, kL, kD})};
        in[0].max.d[0] = 128;
        DynamicPluginTensorDesc out = desc(t, {-1, kL, kD});
        int const io32 = t == DataType::kFLOAT ? 1 : 0;
        CHECK_EQ(p->getWorkspaceSize(in.data(), 7, &out, 1), ouroSelectiveScanWorkspaceSize(128, kL, kD, kS, io32));
    }
}

PluginTensorDesc plainDesc(DataType t, std::vector<int64_t> dims)
{
    return desc(t, std::move(dims)).desc;
}

// enqueue never dereferences device memory on the host: bad runtime shapes are refused before
// the launch, and a kernel error status (here: null device pointers) becomes a non-zero return
// with a message naming the kernel and the problem size. Safe without a GPU.
TEST(outlier_linear_enqueue_reports_errors)
{
    Fields f = outlierLinearFields();
    auto p = create<OutlierLinearPlugin>(f);
    CHECK(p != nullptr);
    if (!p)
    {
        return;
    }
    std::vector<PluginTensorDesc> in = {plainDesc(DataType::kHALF, {2, kL, kK}), plainDesc(DataType::kINT8, {kN, kK / 2}),
        plainDesc(DataType::kFLOAT, {kN}), plainDesc(DataType::kFLOAT, {kL}), plainDesc(DataType::kFLOAT, {kL}),
        plainDesc(DataType::kFLOAT, {kN})};
    PluginTensorDesc out = plainDesc(DataType::kHALF, {2, kL, kN});
    void const* inputs[6] = {};
    void* outputs[1] = {};
    finder().logger.messages.clear();
    CHECK(p->enqueue(in.data(), &out, inputs, outputs, nullptr, nullptr) != 0);
    CHECK(contains(lastLog(), "ouroOutlierLinearRun failed"));
    CHECK(contains(lastLog(), "M=" + std::to_string(2 * kL)));
    in[0] = plainDesc(DataType::kHALF, {2, kL, kK - 2});
    finder().logger.messages.clear();
    CHECK(p->enqueue(in.data(), &out, inputs, outputs, nullptr, nullptr) != 0);
    CHECK(contains(lastLog(), "expected (B, " + std::to_string(kL) + ", " + std::to_string(kK) + ")"));
}

TEST(selective_scan_enqueue_reports_errors)
{
    Fields f = scanFieldsFloat();
    auto p = create<SelectiveScanPlugin>(f);
    CHECK(p != nullptr);
    if (!p)
    {
        return;
    }
    std::vector<PluginTensorDesc> in = {plainDesc(DataType::kFLOAT, {2, kL, kD}), plainDesc(DataType::kFLOAT, {2, kL, kD}),
        plainDesc(DataType::kFLOAT, {kD, kS}), plainDesc(DataType::kFLOAT, {2, kL, kS}),
        plainDesc(DataType::kFLOAT, {2, kL, kS}), plainDesc(DataType::kFLOAT, {kD}),
        plainDesc(DataType::kFLOAT, {2, kL, kD})};
    PluginTensorDesc out = plainDesc(DataType::kFLOAT, {2, kL, kD});
    void const* inputs[7] = {};
    void* outputs[1] = {};
    finder().logger.messages.clear();
    CHECK(p->enqueue(in.data(), &out, inputs, outputs, nullptr, nullptr) != 0);
    CHECK(contains(lastLog(), "ouroSelectiveScan failed"));
    CHECK(contains(lastLog(), "S=" + std::to_string(kS)));
}

TEST(field_blob_rejects_inconsistent_sizes)
{
    int32_t const v = 4;
    PluginField const field("w_bits", &v, PluginFieldType::kINT32, 1);
    PluginFieldCollection const fc{1, &field};
    std::vector<uint8_t> bytes = serializeFields(fc);
    OwnedFields ok = deserializeFields(bytes.data(), bytes.size());
    CHECK_EQ(ok.collection()->nbFields, 1);
    CHECK_EQ(std::string(ok.collection()->fields[0].name), std::string("w_bits"));
    bytes.push_back(0); // trailing garbage
    bool threw = false;
    try
    {
        deserializeFields(bytes.data(), bytes.size());
    }
    catch (PluginError const& e)
    {
        threw = contains(e.what(), "trailing");
    }
    CHECK(threw);
}

} // namespace

int main(int argc, char** argv)
{
    ::setLoggerFinder(&finder()); // the exported entry point, as TensorRT calls it
    std::string const filter = argc > 1 ? argv[1] : "";
    if (filter == "--print-fields") // "<plugin> <field> <INT32|FLOAT32>" per line, for cross-checks from Python
    {
        int32_t n = 0;
        IPluginCreatorInterface* const* list = getCreators(n);
        for (int32_t k = 0; k < n; ++k)
        {
            auto* c = static_cast<IPluginCreatorV3One*>(list[k]);
            PluginFieldCollection const* fc = c->getFieldNames();
            for (int32_t i = 0; i < fc->nbFields; ++i)
            {
                bool const isFloat = fc->fields[i].type == PluginFieldType::kFLOAT32;
                std::printf("%s %s %s\n", c->getPluginName(), fc->fields[i].name, isFloat ? "FLOAT32" : "INT32");
            }
        }
        return 0;
    }
    if (filter == "--list")
    {
        for (auto const& t : registry())
        {
            std::printf("%s\n", t.name.c_str());
        }
        return 0;
    }
    int ran = 0;
    for (auto const& t : registry())
    {
        if (t.name.compare(0, filter.size(), filter) != 0)
        {
            continue;
        }
        int const before = gFailures;
        t.fn();
        ++ran;
        std::printf("[%s] %s\n", gFailures == before ? "  OK  " : " FAIL ", t.name.c_str());
    }
    ::setLoggerFinder(nullptr);
    if (ran == 0)
    {
        std::fprintf(stderr, "no test matches '%s'\n", filter.c_str());
        return 2;
    }
    std::printf("%d tests, %d checks, %d failures\n", ran, gChecks, gFailures);
    return gFailures == 0 ? 0 : 1;
}
