// Entry points of libouro_trt_plugins.so, the interface TensorRT's plugin loader expects:
//   trtexec --dynamicPlugins=libouro_trt_plugins.so --setPluginsToSerialize=libouro_trt_plugins.so
//   IPluginRegistry::loadLibrary("libouro_trt_plugins.so")   (C++ / Python builder and runtime)
// These are the only symbols the library exports (see cmake/ouro_trt_plugins.map).
#include "OutlierLinearPlugin.h"
#include "SelectiveScanPlugin.h"

using namespace nvinfer1;

// TENSORRTAPI is empty outside TensorRT's own build: export explicitly (the rest is hidden).
#define OURO_PLUGIN_EXPORT __attribute__((visibility("default")))

extern "C" OURO_PLUGIN_EXPORT IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static ouro::plugin::OutlierLinearPluginCreator outlierLinear;
    static ouro::plugin::SelectiveScanPluginCreator selectiveScan;
    static IPluginCreatorInterface* const creators[] = {&outlierLinear, &selectiveScan};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}

extern "C" OURO_PLUGIN_EXPORT void setLoggerFinder(ILoggerFinder* finder)
{
    ouro::plugin::setLoggerFinder(finder);
}
