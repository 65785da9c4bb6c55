// ouro TensorRT plugins: the IPluginV3 boilerplate shared by every plugin, and its creator.
//
// A plugin `P` derives from PluginBase<P, Cfg> and provides:
//   static constexpr char const* kName;                 // = ONNX op type = TensorRT plugin name
//   static FieldTable<Cfg> const& table();              // its attributes
//   static Cfg parseConfig(PluginFieldCollection const*); // table().parse + cross-field checks (throws PluginError)
//   int32_t checkInputs / getOutputShapes / supportsFormatCombination / getWorkspaceSize / enqueue
// Creation, clone, attachToContext, serialisation (getFieldsToSerialize) and naming live here.
#pragma once

#include "plugin_utils.h"

#include <exception>
#include <string>
#include <vector>

namespace ouro
{
namespace plugin
{

template <class Derived, class Cfg>
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit PluginBase(Cfg const& cfg)
        : mCfg(cfg)
    {
    }
    ~PluginBase() override = default;

    Cfg const& config() const noexcept
    {
        return mCfg;
    }

    // ---- IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    nvinfer1::IPluginV3* clone() noexcept override
    {
        try
        {
            return self().makeClone();
        }
        catch (std::exception const& e)
        {
            logError(std::string(Derived::kName) + ": clone failed: " + e.what());
        }
        return nullptr;
    }

    // ---- IPluginV3OneCore
    char const* getPluginName() const noexcept override
    {
        return Derived::kName;
    }
    char const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    // ---- IPluginV3OneBuild (shared parts)
    int32_t getNbOutputs() const noexcept override
    {
        return 1;
    }

    //! Output 0 has the data type of input 0 (FLOAT or HALF).
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbOutputs != 1 || nbInputs < 1 || outputTypes == nullptr || inputTypes == nullptr)
        {
            logError(std::string(Derived::kName) + ": getOutputDataTypes called with " + std::to_string(nbInputs)
                + " inputs / " + std::to_string(nbOutputs) + " outputs");
            return -1;
        }
        nvinfer1::DataType const t = inputTypes[0];
        if (t != nvinfer1::DataType::kFLOAT && t != nvinfer1::DataType::kHALF)
        {
            logError(std::string(Derived::kName) + ": input 0 has type " + dataTypeName(t)
                + ", supported: FLOAT, HALF");
            return -1;
        }
        outputTypes[0] = t;
        return 0;
    }

    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override
    {
        try
        {
            self().checkCounts(inputs == nullptr ? 0 : nbInputs, outputs == nullptr ? 0 : nbOutputs);
            self().inferShapes(inputs, nbInputs, outputs[0], exprBuilder);
            return 0;
        }
        catch (std::exception const& e)
        {
            logError(e.what());
        }
        return -1;
    }

    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept override
    {
        try
        {
            self().checkCounts(nbInputs, nbOutputs);
            (void) in;
            return 0;
        }
        catch (std::exception const& e)
        {
            logError(e.what());
        }
        return -1;
    }

    char const* getMetadataString() noexcept override
    {
        try
        {
            mMetadata = Derived::table().describe(mCfg);
            return mMetadata.c_str();
        }
        catch (...)
        {
        }
        return nullptr;
    }

    char const* getTimingCacheID() noexcept override
    {
        // Timing depends on the attributes (bit widths, shapes): key the cache on all of them.
        return getMetadataString();
    }

    // ---- IPluginV3OneRuntime (shared parts)
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* /*in*/, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept override
    {
        try
        {
            self().checkCounts(nbInputs, nbOutputs);
            return 0;
        }
        catch (std::exception const& e)
        {
            logError(e.what());
        }
        return -1;
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept override
    {
        return clone();
    }

    //! Every attribute, one PluginField each (pointing into this plugin's config).
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        try
        {
            Derived::table().serialize(mCfg, mSerialFields);
            mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
            mSerialCollection.fields = mSerialFields.data();
            return &mSerialCollection;
        }
        catch (std::exception const& e)
        {
            logError(std::string(Derived::kName) + ": getFieldsToSerialize failed: " + e.what());
        }
        return nullptr;
    }

    //! A new plugin with this one's configuration; a plugin with runtime state (e.g. a tactic) hides this.
    Derived* makeClone() const
    {
        return new Derived(mCfg);
    }

protected:
    Derived& self() noexcept
    {
        return static_cast<Derived&>(*this);
    }

    Cfg mCfg;

private:
    std::vector<nvinfer1::PluginField> mSerialFields;
    nvinfer1::PluginFieldCollection mSerialCollection{};
    std::string mMetadata;
};

//! IPluginCreatorV3One for plugin P: parses/validates the fields, logs the reason on failure.
template <class P>
class PluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    nvinfer1::IPluginV3* createPlugin(
        char const* /*name*/, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept override
    {
        try
        {
            return new P(P::parseConfig(fc));
        }
        catch (std::exception const& e)
        {
            logError(e.what());
        }
        return nullptr;
    }

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override
    {
        return P::table().fieldNames();
    }
    char const* getPluginName() const noexcept override
    {
        return P::kName;
    }
    char const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }
};

} // namespace plugin
} // namespace ouro
