// ouro_plugin_run: run ONE plugin's enqueue() on the GPU, the way TensorRT would, without TensorRT.
//
//   ouro_plugin_run <dir>
//
// <dir>/manifest.txt, one item per line:
//   plugin <OutlierLinear|SelectiveScan>
//   field <name> <i|f> <value>                  (a plugin attribute, INT32 or FLOAT32)
//   input <f32|f16|i8|u8> <d0> [<d1> ...]       (input k is read from <dir>/in<k>.bin, raw little-endian)
//   tactic <n>                                  (optional: setTactic(n) before enqueue)
//   enqueues <n>                                (optional: enqueue n times; exit 1 if any enqueue failed)
// Writes output 0 to <dir>/out0.bin (dtype of input 0) and prints the workspace size and status.
// The plugin is created through getCreators() from the fields; its output shape comes from
// getOutputShapes() (through a constant-folding IExprBuilder), its workspace from
// getWorkspaceSize(); enqueue() runs on a fresh CUDA stream. Used by tests/gpu/test_plugins_gpu.py
// to compare the plugin path bit-for-bit with direct kernel calls.
#include "plugin_utils.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

namespace
{
#define CUDA_OK(call)                                                                                                  \
    do                                                                                                                 \
    {                                                                                                                  \
        cudaError_t const e_ = (call);                                                                                 \
        if (e_ != cudaSuccess)                                                                                         \
        {                                                                                                              \
            std::fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);             \
            return 3;                                                                                                  \
        }                                                                                                              \
    } while (0)

// Constant-only expressions: every input dimension is known here.
class ConstExpr : public apiv::VDimensionExpr
{
public:
    explicit ConstExpr(int64_t v)
        : mV(v)
    {
    }
    bool isConstant() const override
    {
        return true;
    }
    int64_t getConstantValue() const override
    {
        return mV;
    }
    bool isSizeTensor() const override
    {
        return false;
    }

private:
    int64_t mV;
};

class Expr : public IDimensionExpr
{
public:
    explicit Expr(int64_t v)
        : mImplObj(v)
    {
        mImpl = &mImplObj;
    }

private:
    ConstExpr mImplObj;
};

class ConstBuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override
    {
        mExprs.push_back(std::make_unique<Expr>(value));
        return mExprs.back().get();
    }
    IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr; // the plugins' shape functions only pass dimensions through or add constants
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }

private:
    std::vector<std::unique_ptr<Expr>> mExprs;
};

class ConstBuilder : public IExprBuilder
{
public:
    ConstBuilder()
    {
        mImpl = &mB;
    }
    ConstBuilderImpl mB;
};

struct Tensor
{
    DataType type{DataType::kFLOAT};
    std::vector<int64_t> dims;
    std::vector<uint8_t> host;
    void* dev{nullptr};
};

size_t elemSize(DataType t)
{
    return t == DataType::kFLOAT ? 4 : t == DataType::kHALF ? 2 : 1;
}

int64_t volume(std::vector<int64_t> const& d)
{
    int64_t v = 1;
    for (int64_t x : d)
    {
        v *= x;
    }
    return v;
}

bool parseType(std::string const& s, DataType& t)
{
    if (s == "f32")
        t = DataType::kFLOAT;
    else if (s == "f16")
        t = DataType::kHALF;
    else if (s == "i8")
        t = DataType::kINT8;
    else if (s == "u8")
        t = DataType::kUINT8;
    else
        return false;
    return true;
}

PluginTensorDesc descOf(Tensor const& t)
{
    PluginTensorDesc d{};
    d.type = t.type;
    d.format = TensorFormat::kLINEAR;
    d.scale = -1.F;
    d.dims.nbDims = static_cast<int32_t>(t.dims.size());
    for (size_t k = 0; k < t.dims.size(); ++k)
    {
        d.dims.d[k] = t.dims[k];
    }
    return d;
}
} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s <dir with manifest.txt and in<k>.bin>\n", argv[0]);
        return 2;
    }
    std::string const dir = argv[1];
    std::ifstream manifest(dir + "/manifest.txt");
    if (!manifest)
    {
        std::fprintf(stderr, "cannot open %s/manifest.txt\n", dir.c_str());
        return 2;
    }
    std::string pluginName;
    int32_t tactic = 0;  // setTactic before enqueue (0: TensorRT's default)
    int enqueues = 1;    // enqueue this many times (an overflow is reported by the enqueue after it)
    std::vector<std::string> fieldNames;
    std::vector<std::vector<uint8_t>> fieldData;
    std::vector<PluginFieldType> fieldTypes;
    std::vector<Tensor> inputs;
    std::string line;
    while (std::getline(manifest, line))
    {
        std::istringstream is(line);
        std::string kind;
        if (!(is >> kind))
        {
            continue;
        }
        if (kind == "plugin")
        {
            is >> pluginName;
        }
        else if (kind == "field")
        {
            std::string name, type;
            is >> name >> type;
            std::vector<uint8_t> bytes(4);
            if (type == "i")
            {
                int32_t v;
                is >> v;
                std::memcpy(bytes.data(), &v, 4);
                fieldTypes.push_back(PluginFieldType::kINT32);
            }
            else
            {
                float v;
                is >> v;
                std::memcpy(bytes.data(), &v, 4);
                fieldTypes.push_back(PluginFieldType::kFLOAT32);
            }
            fieldNames.push_back(name);
            fieldData.push_back(bytes);
        }
        else if (kind == "tactic")
        {
            is >> tactic;
        }
        else if (kind == "enqueues")
        {
            is >> enqueues;
        }
        else if (kind == "input")
        {
            Tensor t;
            std::string type;
            is >> type;
            if (!parseType(type, t.type))
            {
                std::fprintf(stderr, "bad dtype '%s' in: %s\n", type.c_str(), line.c_str());
                return 2;
            }
            int64_t d;
            while (is >> d)
            {
                t.dims.push_back(d);
            }
            std::string const path = dir + "/in" + std::to_string(inputs.size()) + ".bin";
            std::ifstream f(path, std::ios::binary);
            t.host.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
            if (t.host.size() != static_cast<size_t>(volume(t.dims)) * elemSize(t.type))
            {
                std::fprintf(stderr, "%s has %zu bytes, expected %lld\n", path.c_str(), t.host.size(),
                    static_cast<long long>(volume(t.dims) * static_cast<int64_t>(elemSize(t.type))));
                return 2;
            }
            inputs.push_back(std::move(t));
        }
    }

    // Create the plugin through its creator, as TensorRT's ONNX parser does.
    std::vector<PluginField> fields;
    for (size_t k = 0; k < fieldNames.size(); ++k)
    {
        fields.emplace_back(fieldNames[k].c_str(), fieldData[k].data(), fieldTypes[k], 1);
    }
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    IPluginV3* plugin = nullptr;
    for (int32_t k = 0; k < n; ++k)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(creators[k]);
        if (pluginName == c->getPluginName())
        {
            plugin = c->createPlugin("ouro_plugin_run", &fc, TensorRTPhase::kBUILD);
        }
    }
    if (plugin == nullptr)
    {
        std::fprintf(stderr, "could not create plugin '%s' (see the error above)\n", pluginName.c_str());
        return 2;
    }
    std::unique_ptr<IPluginV3> owner(plugin);
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    int32_t const nbIn = static_cast<int32_t>(inputs.size());

    // Output shape and dtype from the plugin itself.
    ConstBuilder eb;
    std::vector<DimsExprs> inExprs(inputs.size());
    for (size_t k = 0; k < inputs.size(); ++k)
    {
        inExprs[k].nbDims = static_cast<int32_t>(inputs[k].dims.size());
        for (size_t d = 0; d < inputs[k].dims.size(); ++d)
        {
            inExprs[k].d[d] = eb.mB.constant(inputs[k].dims[d]);
        }
    }
    DimsExprs outExpr{};
    if (build->getOutputShapes(inExprs.data(), nbIn, nullptr, 0, &outExpr, 1, eb) != 0)
    {
        return 2;
    }
    Tensor out;
    out.type = inputs[0].type;
    for (int32_t d = 0; d < outExpr.nbDims; ++d)
    {
        out.dims.push_back(outExpr.d[d]->getConstantValue());
    }

    std::vector<DynamicPluginTensorDesc> dyn;
    std::vector<PluginTensorDesc> descs;
    for (Tensor const& t : inputs)
    {
        DynamicPluginTensorDesc x{};
        x.desc = descOf(t);
        x.min = x.opt = x.max = x.desc.dims;
        dyn.push_back(x);
        descs.push_back(x.desc);
    }
    DynamicPluginTensorDesc dynOut{};
    dynOut.desc = descOf(out);
    dynOut.min = dynOut.opt = dynOut.max = dynOut.desc.dims;
    std::vector<DynamicPluginTensorDesc> all = dyn;
    all.push_back(dynOut);
    for (int32_t pos = 0; pos <= nbIn; ++pos)
    {
        if (!build->supportsFormatCombination(pos, all.data(), nbIn, 1))
        {
            std::fprintf(stderr, "plugin rejects the dtype/format of %s %d\n", pos < nbIn ? "input" : "output",
                pos < nbIn ? pos : 0);
            return 2;
        }
    }
    if (build->configurePlugin(dyn.data(), nbIn, &dynOut, 1) != 0)
    {
        return 2;
    }
    size_t const wsBytes = build->getWorkspaceSize(dyn.data(), nbIn, &dynOut, 1);

    // Device buffers, enqueue on a stream, copy back.
    std::vector<void const*> inPtrs;
    for (Tensor& t : inputs)
    {
        CUDA_OK(cudaMalloc(&t.dev, std::max<size_t>(t.host.size(), 1)));
        CUDA_OK(cudaMemcpy(t.dev, t.host.data(), t.host.size(), cudaMemcpyHostToDevice));
        inPtrs.push_back(t.dev);
    }
    size_t const outBytes = static_cast<size_t>(volume(out.dims)) * elemSize(out.type);
    CUDA_OK(cudaMalloc(&out.dev, outBytes));
    void* ws = nullptr;
    CUDA_OK(cudaMalloc(&ws, std::max<size_t>(wsBytes, 1)));
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreate(&stream));
    PluginTensorDesc outDesc = descOf(out);
    void* outPtrs[1] = {out.dev};
    if (tactic != 0 && runtime->setTactic(tactic) != 0)
    {
        return 2;
    }
    if (runtime->onShapeChange(descs.data(), nbIn, &outDesc, 1) != 0)
    {
        return 2;
    }
    int32_t rc = 0;
    for (int k = 0; k < enqueues; ++k)
    {
        int32_t const r = runtime->enqueue(descs.data(), &outDesc, inPtrs.data(), outPtrs, ws, stream);
        CUDA_OK(cudaStreamSynchronize(stream));
        std::printf("plugin %s: workspace %zu bytes, tactic %d, enqueue %d status %d\n", pluginName.c_str(), wsBytes,
            tactic, k, r);
        rc = rc != 0 ? rc : r;
    }
    if (rc != 0)
    {
        return 1;
    }
    out.host.resize(outBytes);
    CUDA_OK(cudaMemcpy(out.host.data(), out.dev, outBytes, cudaMemcpyDeviceToHost));
    std::ofstream(dir + "/out0.bin", std::ios::binary)
        .write(reinterpret_cast<char const*>(out.host.data()), static_cast<std::streamsize>(outBytes));
    for (Tensor& t : inputs)
    {
        cudaFree(t.dev);
    }
    cudaFree(out.dev);
    cudaFree(ws);
    cudaStreamDestroy(stream);
    return 0;
}
