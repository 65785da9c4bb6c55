#include "plugin_utils.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>

using nvinfer1::PluginFieldType;

namespace ouro
{
namespace plugin
{

namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

char const* severityName(nvinfer1::ILogger::Severity s)
{
    switch (s)
    {
    case nvinfer1::ILogger::Severity::kINTERNAL_ERROR: return "INTERNAL_ERROR";
    case nvinfer1::ILogger::Severity::kERROR: return "ERROR";
    case nvinfer1::ILogger::Severity::kWARNING: return "WARNING";
    case nvinfer1::ILogger::Severity::kINFO: return "INFO";
    case nvinfer1::ILogger::Severity::kVERBOSE: return "VERBOSE";
    }
    return "?";
}

template <class T>
T loadScalar(void const* p)
{
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

void checkScalar(nvinfer1::PluginField const& f, char const* plugin)
{
    if (f.data == nullptr)
    {
        throw PluginError(std::string(plugin) + ": field '" + f.name + "' has no data");
    }
    if (f.length != 1)
    {
        throw PluginError(std::string(plugin) + ": field '" + f.name + "' has length " + std::to_string(f.length)
            + ", expected a scalar (length 1)");
    }
}

std::string typeName(PluginFieldType t)
{
    switch (t)
    {
    case PluginFieldType::kFLOAT16: return "FLOAT16";
    case PluginFieldType::kFLOAT32: return "FLOAT32";
    case PluginFieldType::kFLOAT64: return "FLOAT64";
    case PluginFieldType::kINT8: return "INT8";
    case PluginFieldType::kINT16: return "INT16";
    case PluginFieldType::kINT32: return "INT32";
    case PluginFieldType::kCHAR: return "CHAR";
    case PluginFieldType::kDIMS: return "DIMS";
    case PluginFieldType::kUNKNOWN: return "UNKNOWN";
    case PluginFieldType::kBF16: return "BF16";
    case PluginFieldType::kINT64: return "INT64";
    case PluginFieldType::kFP8: return "FP8";
    case PluginFieldType::kINT4: return "INT4";
    case PluginFieldType::kFP4: return "FP4";
    }
    return "type " + std::to_string(static_cast<int32_t>(t));
}
} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

nvinfer1::ILoggerFinder* getLoggerFinder() noexcept
{
    return gLoggerFinder.load();
}

void logMessage(nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept
{
    try
    {
        nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
        nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
        if (logger)
        {
            logger->log(severity, msg.c_str());
            return;
        }
        std::fprintf(stderr, "[ouro_trt_plugins] %s: %s\n", severityName(severity), msg.c_str());
    }
    catch (...)
    {
    }
}

bool IntRule::ok(int64_t v) const
{
    if (!allowed.empty())
    {
        for (int32_t a : allowed)
        {
            if (v == a)
            {
                return true;
            }
        }
        return false;
    }
    return v >= lo && v <= hi;
}

std::string IntRule::describe() const
{
    if (!allowed.empty())
    {
        std::string s = "one of {";
        for (size_t i = 0; i < allowed.size(); ++i)
        {
            s += (i ? ", " : "") + std::to_string(allowed[i]);
        }
        return s + "}";
    }
    if (hi >= INT32_MAX)
    {
        return "an integer >= " + std::to_string(lo);
    }
    return "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
}

int64_t readIntField(nvinfer1::PluginField const& f, char const* plugin)
{
    checkScalar(f, plugin);
    switch (f.type)
    {
    case PluginFieldType::kINT8: return loadScalar<int8_t>(f.data);
    case PluginFieldType::kINT16: return loadScalar<int16_t>(f.data);
    case PluginFieldType::kINT32: return loadScalar<int32_t>(f.data);
    case PluginFieldType::kINT64: return loadScalar<int64_t>(f.data);
    default: break;
    }
    throw PluginError(std::string(plugin) + ": field '" + f.name + "' has type " + typeName(f.type)
        + ", expected an integer (INT32)");
}

double readFloatField(nvinfer1::PluginField const& f, char const* plugin)
{
    checkScalar(f, plugin);
    switch (f.type)
    {
    case PluginFieldType::kFLOAT32: return loadScalar<float>(f.data);
    case PluginFieldType::kFLOAT64: return loadScalar<double>(f.data);
    case PluginFieldType::kINT32: return loadScalar<int32_t>(f.data);
    case PluginFieldType::kINT64: return static_cast<double>(loadScalar<int64_t>(f.data));
    default: break;
    }
    throw PluginError(std::string(plugin) + ": field '" + f.name + "' has type " + typeName(f.type)
        + ", expected a float (FLOAT32)");
}

bool isReservedFieldName(char const* name)
{
    return std::strcmp(name, "plugin_version") == 0 || std::strcmp(name, "plugin_namespace") == 0;
}

// ------------------------------------------------------------------------------------------
// Field serialisation
// ------------------------------------------------------------------------------------------
size_t fieldTypeSize(PluginFieldType type)
{
    switch (type)
    {
    case PluginFieldType::kFLOAT16: return 2;
    case PluginFieldType::kFLOAT32: return 4;
    case PluginFieldType::kFLOAT64: return 8;
    case PluginFieldType::kINT8: return 1;
    case PluginFieldType::kINT16: return 2;
    case PluginFieldType::kINT32: return 4;
    case PluginFieldType::kCHAR: return 1;
    case PluginFieldType::kDIMS: return sizeof(nvinfer1::Dims);
    case PluginFieldType::kUNKNOWN: return 1; // length counts bytes
    case PluginFieldType::kBF16: return 2;
    case PluginFieldType::kINT64: return 8;
    case PluginFieldType::kFP8: return 1;
    default: break;
    }
    throw PluginError("serializeFields: unsupported field type " + typeName(type));
}

namespace
{
template <class T>
void put(std::vector<uint8_t>& out, T v)
{
    uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    out.insert(out.end(), b, b + sizeof(T));
}

class Reader
{
public:
    Reader(uint8_t const* d, size_t n)
        : mData(d)
        , mSize(n)
    {
    }
    template <class T>
    T get()
    {
        T v;
        std::memcpy(&v, take(sizeof(T)), sizeof(T));
        return v;
    }
    uint8_t const* take(size_t n)
    {
        if (n > mSize - mPos)
        {
            throw PluginError("deserializeFields: truncated field data (need " + std::to_string(n) + " bytes at offset "
                + std::to_string(mPos) + " of " + std::to_string(mSize) + ")");
        }
        uint8_t const* p = mData + mPos;
        mPos += n;
        return p;
    }
    bool done() const
    {
        return mPos == mSize;
    }

private:
    uint8_t const* mData;
    size_t mSize;
    size_t mPos{0};
};
} // namespace

std::vector<uint8_t> serializeFields(nvinfer1::PluginFieldCollection const& fc)
{
    std::vector<uint8_t> out;
    put<uint32_t>(out, static_cast<uint32_t>(fc.nbFields));
    for (int32_t i = 0; i < fc.nbFields; ++i)
    {
        nvinfer1::PluginField const& f = fc.fields[i];
        std::string const name = f.name ? f.name : "";
        size_t const bytes = fieldTypeSize(f.type) * static_cast<size_t>(f.length < 0 ? 0 : f.length);
        put<uint32_t>(out, static_cast<uint32_t>(name.size()));
        out.insert(out.end(), name.begin(), name.end());
        put<int32_t>(out, static_cast<int32_t>(f.type));
        put<int32_t>(out, f.length);
        put<uint32_t>(out, static_cast<uint32_t>(bytes));
        auto const* p = static_cast<uint8_t const*>(f.data);
        if (bytes > 0 && p == nullptr)
        {
            throw PluginError("serializeFields: field '" + name + "' has length " + std::to_string(f.length)
                + " but no data");
        }
        out.insert(out.end(), p, p + bytes);
    }
    return out;
}

void OwnedFields::add(std::string name, PluginFieldType type, int32_t length, std::vector<uint8_t> bytes)
{
    mNames.push_back(std::move(name));
    mTypes.push_back(type);
    mLengths.push_back(length);
    mData.push_back(std::move(bytes));
}

nvinfer1::PluginFieldCollection const* OwnedFields::collection() noexcept
{
    mFields.clear();
    for (size_t i = 0; i < mNames.size(); ++i)
    {
        mFields.emplace_back(mNames[i].c_str(), mData[i].empty() ? nullptr : mData[i].data(), mTypes[i], mLengths[i]);
    }
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
    return &mCollection;
}

OwnedFields deserializeFields(uint8_t const* data, size_t size)
{
    Reader r(data, size);
    OwnedFields fields;
    uint32_t const n = r.get<uint32_t>();
    for (uint32_t i = 0; i < n; ++i)
    {
        uint32_t const nameLen = r.get<uint32_t>();
        auto const* nameBytes = reinterpret_cast<char const*>(r.take(nameLen));
        std::string name(nameBytes, nameLen);
        auto const type = static_cast<PluginFieldType>(r.get<int32_t>());
        int32_t const length = r.get<int32_t>();
        uint32_t const bytes = r.get<uint32_t>();
        if (length < 0 || static_cast<size_t>(bytes) != fieldTypeSize(type) * static_cast<size_t>(length))
        {
            throw PluginError("deserializeFields: field '" + name + "' has " + std::to_string(bytes)
                + " bytes, inconsistent with length " + std::to_string(length) + " of type " + typeName(type));
        }
        uint8_t const* p = r.take(bytes);
        fields.add(std::move(name), type, length, std::vector<uint8_t>(p, p + bytes));
    }
    if (!r.done())
    {
        throw PluginError("deserializeFields: trailing bytes after " + std::to_string(n) + " fields");
    }
    return fields;
}

// ------------------------------------------------------------------------------------------
// Shapes
// ------------------------------------------------------------------------------------------
char const* dataTypeName(nvinfer1::DataType t) noexcept
{
    switch (t)
    {
    case nvinfer1::DataType::kFLOAT: return "FLOAT";
    case nvinfer1::DataType::kHALF: return "HALF";
    case nvinfer1::DataType::kINT8: return "INT8";
    case nvinfer1::DataType::kINT32: return "INT32";
    case nvinfer1::DataType::kBOOL: return "BOOL";
    case nvinfer1::DataType::kUINT8: return "UINT8";
    case nvinfer1::DataType::kFP8: return "FP8";
    case nvinfer1::DataType::kBF16: return "BF16";
    case nvinfer1::DataType::kINT64: return "INT64";
    default: return "OTHER";
    }
}

void expectRank(nvinfer1::DimsExprs const& dims, int32_t rank, char const* plugin, int32_t inputIdx, char const* what)
{
    if (dims.nbDims != rank)
    {
        throw PluginError(std::string(plugin) + ": input " + std::to_string(inputIdx) + " (" + what + ") has rank "
            + std::to_string(dims.nbDims) + ", expected " + std::to_string(rank));
    }
}

void expectDimIfConstant(nvinfer1::IDimensionExpr const* e, int64_t expected, char const* plugin, int32_t inputIdx,
    char const* what, int32_t dim, char const* why)
{
    if (e != nullptr && e->isConstant() && e->getConstantValue() != expected)
    {
        throw PluginError(std::string(plugin) + ": input " + std::to_string(inputIdx) + " (" + what + ") dim "
            + std::to_string(dim) + " is " + std::to_string(e->getConstantValue()) + ", expected "
            + std::to_string(expected) + " (" + why + ")");
    }
}

} // namespace plugin
} // namespace ouro
