// ouro TensorRT plugins: shared helpers (attribute parsing, field serialisation, logging).
//
// Every plugin keeps its attributes in a small config struct (plain int32_t / float members).
// A FieldTable<Config> lists each attribute once (name, member, allowed values), and that one
// table drives: the creator's getFieldNames(), attribute parsing with errors that name the
// field, and getFieldsToSerialize(). Nothing here calls into libnvinfer (header-only types).
#pragma once

#include "NvInferRuntime.h"

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

namespace ouro
{
namespace plugin
{

constexpr char const* kPluginNamespace = "ouro";
constexpr char const* kPluginVersion = "1";

//! Error raised while parsing/validating plugin attributes or tensor shapes; the message names
//! the plugin and the offending field (e.g. "OutlierLinear: field 'w_bits' = 3, expected one of {4, 8}").
class PluginError : public std::runtime_error
{
public:
    using std::runtime_error::runtime_error;
};

// ------------------------------------------------------------------------------------------
// Logging: messages go to the logger TensorRT hands over through setLoggerFinder(), else stderr.
// ------------------------------------------------------------------------------------------
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
nvinfer1::ILoggerFinder* getLoggerFinder() noexcept;
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept;
inline void logError(std::string const& msg) noexcept
{
    logMessage(nvinfer1::ILogger::Severity::kERROR, msg);
}

// ------------------------------------------------------------------------------------------
// Attribute tables
// ------------------------------------------------------------------------------------------
//! Constraint on an int field: either an explicit set of allowed values or a closed range.
struct IntRule
{
    std::vector<int32_t> allowed; // non-empty: value must be one of these
    int64_t lo{INT32_MIN};
    int64_t hi{INT32_MAX};

    static IntRule oneOf(std::initializer_list<int32_t> v)
    {
        IntRule r;
        r.allowed = v;
        return r;
    }
    static IntRule range(int64_t lo, int64_t hi = INT32_MAX)
    {
        IntRule r;
        r.lo = lo;
        r.hi = hi;
        return r;
    }
    bool ok(int64_t v) const;
    std::string describe() const;
};

//! One scalar attribute of a plugin, bound to a member of its config struct.
template <class Cfg>
struct FieldSpec
{
    char const* name;
    int32_t Cfg::*intMember;  // exactly one of intMember / floatMember is set
    float Cfg::*floatMember;
    IntRule rule;             // int fields
    float floatLo;            // float fields: finite and within [floatLo, floatHi]
    float floatHi;
    bool required;

    static FieldSpec intField(char const* n, int32_t Cfg::*m, IntRule r, bool req = true)
    {
        return FieldSpec{n, m, nullptr, std::move(r), 0.F, 0.F, req};
    }
    static FieldSpec floatField(char const* n, float Cfg::*m, float lo, float hi, bool req = true)
    {
        return FieldSpec{n, nullptr, m, IntRule{}, lo, hi, req};
    }
    nvinfer1::PluginFieldType type() const
    {
        return intMember ? nvinfer1::PluginFieldType::kINT32 : nvinfer1::PluginFieldType::kFLOAT32;
    }
};

//! Reads one scalar from a PluginField (accepts INT8/16/32/64 and FLOAT32/64 storage);
//! throws PluginError naming `plugin` and the field on a bad length, null data or unsupported type.
int64_t readIntField(nvinfer1::PluginField const& f, char const* plugin);
double readFloatField(nvinfer1::PluginField const& f, char const* plugin);

//! Names TensorRT passes around that are not attributes of ours (tolerated, ignored).
bool isReservedFieldName(char const* name);

template <class Cfg>
class FieldTable
{
public:
    FieldTable(char const* plugin, std::vector<FieldSpec<Cfg>> specs)
        : mPlugin(plugin)
        , mSpecs(std::move(specs))
    {
        for (auto const& s : mSpecs)
        {
            mNames.emplace_back(s.name, nullptr, s.type(), 1);
        }
        mNameCollection.nbFields = static_cast<int32_t>(mNames.size());
        mNameCollection.fields = mNames.data();
    }

    //! The creator's getFieldNames() (names and types, no data).
    nvinfer1::PluginFieldCollection const* fieldNames() const noexcept
    {
        return &mNameCollection;
    }

    //! Parses fc into cfg (members not present keep their defaults). Throws PluginError naming the
    //! field on: unknown name, duplicate, bad type/length, out-of-range value, missing required field.
    //! `present` (optional) receives the names that were given.
    void parse(nvinfer1::PluginFieldCollection const* fc, Cfg& cfg, std::vector<std::string>* present = nullptr) const
    {
        std::vector<bool> seen(mSpecs.size(), false);
        int32_t const n = fc ? fc->nbFields : 0;
        if (n > 0 && fc->fields == nullptr)
        {
            throw PluginError(std::string(mPlugin) + ": PluginFieldCollection has " + std::to_string(n)
                + " fields but a null field array");
        }
        for (int32_t i = 0; i < n; ++i)
        {
            nvinfer1::PluginField const& f = fc->fields[i];
            if (f.name == nullptr)
            {
                throw PluginError(std::string(mPlugin) + ": field #" + std::to_string(i) + " has no name");
            }
            size_t const idx = find(f.name);
            if (idx == mSpecs.size())
            {
                if (isReservedFieldName(f.name))
                {
                    continue;
                }
                throw PluginError(std::string(mPlugin) + ": unknown field '" + f.name + "' (known fields: "
                    + knownNames() + ")");
            }
            if (seen[idx])
            {
                throw PluginError(std::string(mPlugin) + ": field '" + f.name + "' given twice");
            }
            seen[idx] = true;
            assign(mSpecs[idx], f, cfg);
        }
        for (size_t k = 0; k < mSpecs.size(); ++k)
        {
            if (!seen[k] && mSpecs[k].required)
            {
                throw PluginError(std::string(mPlugin) + ": missing required field '" + mSpecs[k].name + "'");
            }
            if (seen[k] && present)
            {
                present->emplace_back(mSpecs[k].name);
            }
        }
    }

    //! Fills `out` with one PluginField per attribute, pointing into `cfg` (which must outlive the use).
    void serialize(Cfg const& cfg, std::vector<nvinfer1::PluginField>& out) const
    {
        out.clear();
        for (auto const& s : mSpecs)
        {
            void const* data = s.intMember ? static_cast<void const*>(&(cfg.*s.intMember))
                                           : static_cast<void const*>(&(cfg.*s.floatMember));
            out.emplace_back(s.name, data, s.type(), 1);
        }
    }

    //! "name=value, ..." of every field (for metadata strings and messages).
    std::string describe(Cfg const& cfg) const
    {
        std::string s;
        for (auto const& spec : mSpecs)
        {
            if (!s.empty())
            {
                s += ", ";
            }
            s += spec.name;
            s += "=";
            s += spec.intMember ? std::to_string(cfg.*spec.intMember) : std::to_string(cfg.*spec.floatMember);
        }
        return s;
    }

    std::vector<FieldSpec<Cfg>> const& specs() const noexcept
    {
        return mSpecs;
    }

private:
    size_t find(char const* name) const
    {
        for (size_t k = 0; k < mSpecs.size(); ++k)
        {
            if (std::string(mSpecs[k].name) == name)
            {
                return k;
            }
        }
        return mSpecs.size();
    }

    std::string knownNames() const
    {
        std::string s;
        for (auto const& spec : mSpecs)
        {
            s += (s.empty() ? "" : ", ") + std::string(spec.name);
        }
        return s;
    }

    void assign(FieldSpec<Cfg> const& s, nvinfer1::PluginField const& f, Cfg& cfg) const
    {
        if (s.intMember)
        {
            int64_t const v = readIntField(f, mPlugin);
            if (!s.rule.ok(v))
            {
                throw PluginError(std::string(mPlugin) + ": field '" + s.name + "' = " + std::to_string(v)
                    + ", expected " + s.rule.describe());
            }
            cfg.*s.intMember = static_cast<int32_t>(v);
        }
        else
        {
            double const v = readFloatField(f, mPlugin);
            if (!(v >= s.floatLo && v <= s.floatHi)) // also rejects NaN
            {
                throw PluginError(std::string(mPlugin) + ": field '" + s.name + "' = " + std::to_string(v)
                    + ", expected a finite value in [" + std::to_string(s.floatLo) + ", "
                    + std::to_string(s.floatHi) + "]");
            }
            cfg.*s.floatMember = static_cast<float>(v);
        }
    }

    char const* mPlugin;
    std::vector<FieldSpec<Cfg>> mSpecs;
    std::vector<nvinfer1::PluginField> mNames;
    nvinfer1::PluginFieldCollection mNameCollection{};
};

// ------------------------------------------------------------------------------------------
// Field serialisation: a self-contained byte image of a PluginFieldCollection (what TensorRT
// stores in the plan for IPluginV3). Used by tests to prove that a plugin re-created from its
// serialised fields alone is identical, and by tools that want to inspect a plugin's fields.
// Layout per field: u32 name length, name bytes, i32 type, i32 length, u32 byte count, bytes.
// ------------------------------------------------------------------------------------------
size_t fieldTypeSize(nvinfer1::PluginFieldType type);
std::vector<uint8_t> serializeFields(nvinfer1::PluginFieldCollection const& fc);

//! Owns the names and data of fields read back by deserializeFields().
class OwnedFields
{
public:
    nvinfer1::PluginFieldCollection const* collection() noexcept;
    void add(std::string name, nvinfer1::PluginFieldType type, int32_t length, std::vector<uint8_t> bytes);

private:
    std::vector<std::string> mNames;
    std::vector<std::vector<uint8_t>> mData;
    std::vector<nvinfer1::PluginFieldType> mTypes;
    std::vector<int32_t> mLengths;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

//! Parses the output of serializeFields(); throws PluginError on truncated/corrupt data.
OwnedFields deserializeFields(uint8_t const* data, size_t size);

// ------------------------------------------------------------------------------------------
// Shape helpers
// ------------------------------------------------------------------------------------------
//! Name of a TensorRT data type ("FLOAT", "HALF", ...) for messages.
char const* dataTypeName(nvinfer1::DataType t) noexcept;

//! If dimension expression `e` is a build-time constant, checks it equals `expected`;
//! throws PluginError "<plugin>: input <idx> (<what>) dim <d> is <v>, expected <expected> (<why>)".
void expectDimIfConstant(nvinfer1::IDimensionExpr const* e, int64_t expected, char const* plugin, int32_t inputIdx,
    char const* what, int32_t dim, char const* why);

//! Throws PluginError if `dims.nbDims != rank`.
void expectRank(nvinfer1::DimsExprs const& dims, int32_t rank, char const* plugin, int32_t inputIdx, char const* what);

} // namespace plugin
} // namespace ouro
