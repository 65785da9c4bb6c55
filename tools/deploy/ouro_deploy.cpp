// ouro_deploy: the smallest C++ TensorRT application that runs an ouro engine.
//
//   ouro_deploy <model.plan> <libouro_trt_plugins.so> [batch=1] [iterations=100]
//
// 1. registers the ouro plugins: IPluginRegistry::loadLibrary(libouro_trt_plugins.so)
//    (needed unless the plan was built with --setPluginsToSerialize, which embeds the library);
// 2. deserialises the engine, creates an execution context, sets the dynamic batch;
// 3. fills the inputs with a fixed pseudo-random pattern, runs enqueueV3 on a CUDA stream,
//    reports the mean latency and the first logits of the first output.
// Links against libnvinfer and the CUDA runtime only; see README.md beside this file.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

namespace
{
class Logger : public nvinfer1::ILogger
{
public:
    void log(Severity severity, char const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            std::fprintf(stderr, "[TensorRT] %s\n", msg);
        }
    }
};

#define CUDA_OK(call)                                                                                                  \
    do                                                                                                                 \
    {                                                                                                                  \
        cudaError_t const e_ = (call);                                                                                 \
        if (e_ != cudaSuccess)                                                                                         \
        {                                                                                                              \
            std::fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);             \
            return 1;                                                                                                  \
        }                                                                                                              \
    } while (0)

size_t elementSize(nvinfer1::DataType t)
{
    switch (t)
    {
    case nvinfer1::DataType::kFLOAT:
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF:
    case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT64: return 8;
    default: return 1;
    }
}

int64_t volume(nvinfer1::Dims const& d)
{
    int64_t v = 1;
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        v *= d.d[i];
    }
    return v;
}

uint16_t floatToHalf(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t const sign = (x >> 16) & 0x8000U;
    int32_t const exp = static_cast<int32_t>((x >> 23) & 0xFFU) - 127 + 15;
    uint32_t const mant = x & 0x7FFFFFU;
    if (exp <= 0)
    {
        return static_cast<uint16_t>(sign); // tiny -> signed zero (fine for a test pattern)
    }
    if (exp >= 31)
    {
        return static_cast<uint16_t>(sign | 0x7C00U);
    }
    return static_cast<uint16_t>(sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13));
}

float halfToFloat(uint16_t h)
{
    uint32_t const sign = (h & 0x8000U) << 16;
    uint32_t const exp = (h >> 10) & 0x1FU;
    uint32_t const mant = h & 0x3FFU;
    uint32_t x = sign;
    if (exp == 31)
    {
        x |= 0x7F800000U | (mant << 13);
    }
    else if (exp != 0)
    {
        x |= ((exp - 15 + 127) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

//! Deterministic pattern in [-1, 1) so runs are comparable across machines.
std::vector<uint8_t> pattern(nvinfer1::DataType t, int64_t n)
{
    std::vector<uint8_t> bytes(static_cast<size_t>(n) * elementSize(t));
    uint32_t state = 12345U;
    for (int64_t i = 0; i < n; ++i)
    {
        state = state * 1664525U + 1013904223U;
        float const v = static_cast<float>(state >> 8) / static_cast<float>(1U << 24) * 2.F - 1.F;
        if (t == nvinfer1::DataType::kHALF)
        {
            uint16_t const h = floatToHalf(v);
            std::memcpy(bytes.data() + 2 * i, &h, 2);
        }
        else if (t == nvinfer1::DataType::kFLOAT)
        {
            std::memcpy(bytes.data() + 4 * i, &v, 4);
        }
    }
    return bytes;
}
} // namespace

int main(int argc, char** argv)
{
    if (argc < 3)
    {
        std::fprintf(stderr, "usage: %s <model.plan> <libouro_trt_plugins.so> [batch=1] [iterations=100]\n", argv[0]);
        return 2;
    }
    std::string const planPath = argv[1];
    std::string const pluginPath = argv[2];
    int64_t const batch = argc > 3 ? std::stoll(argv[3]) : 1;
    int const iterations = argc > 4 ? std::stoi(argv[4]) : 100;

    std::ifstream file(planPath, std::ios::binary);
    if (!file)
    {
        std::fprintf(stderr, "cannot open engine %s\n", planPath.c_str());
        return 1;
    }
    std::vector<char> plan((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());

    Logger logger;
    std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
    if (!runtime || runtime->getPluginRegistry().loadLibrary(pluginPath.c_str()) == nullptr)
    {
        std::fprintf(stderr, "cannot load plugin library %s\n", pluginPath.c_str());
        return 1;
    }
    std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(plan.data(), plan.size())};
    if (!engine)
    {
        std::fprintf(stderr, "cannot deserialise %s (built by another TensorRT version or GPU?)\n", planPath.c_str());
        return 1;
    }
    std::unique_ptr<nvinfer1::IExecutionContext> context{engine->createExecutionContext()};

    // Inputs: the dynamic batch dimension (-1) becomes `batch`; fill with the test pattern.
    int32_t const nbIO = engine->getNbIOTensors();
    std::vector<void*> buffers(static_cast<size_t>(nbIO), nullptr);
    for (int32_t i = 0; i < nbIO; ++i)
    {
        char const* name = engine->getIOTensorName(i);
        if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kINPUT)
        {
            continue;
        }
        nvinfer1::Dims dims = engine->getTensorShape(name);
        for (int32_t d = 0; d < dims.nbDims; ++d)
        {
            dims.d[d] = dims.d[d] < 0 ? batch : dims.d[d];
        }
        if (!context->setInputShape(name, dims))
        {
            std::fprintf(stderr, "batch %lld is outside the engine's optimisation profile for input %s\n",
                static_cast<long long>(batch), name);
            return 1;
        }
        nvinfer1::DataType const t = engine->getTensorDataType(name);
        std::vector<uint8_t> host = pattern(t, volume(dims));
        CUDA_OK(cudaMalloc(&buffers[i], host.size()));
        CUDA_OK(cudaMemcpy(buffers[i], host.data(), host.size(), cudaMemcpyHostToDevice));
        context->setTensorAddress(name, buffers[i]);
    }
    int32_t firstOutput = -1;
    for (int32_t i = 0; i < nbIO; ++i)
    {
        char const* name = engine->getIOTensorName(i);
        if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kOUTPUT)
        {
            continue;
        }
        size_t const bytes
            = static_cast<size_t>(volume(context->getTensorShape(name))) * elementSize(engine->getTensorDataType(name));
        CUDA_OK(cudaMalloc(&buffers[i], bytes));
        context->setTensorAddress(name, buffers[i]);
        firstOutput = firstOutput < 0 ? i : firstOutput;
    }

    cudaStream_t stream;
    CUDA_OK(cudaStreamCreate(&stream));
    if (!context->enqueueV3(stream)) // warm-up (also triggers the plugins' first launch)
    {
        std::fprintf(stderr, "enqueueV3 failed\n");
        return 1;
    }
    cudaEvent_t start, stop;
    CUDA_OK(cudaEventCreate(&start));
    CUDA_OK(cudaEventCreate(&stop));
    CUDA_OK(cudaEventRecord(start, stream));
    for (int it = 0; it < iterations; ++it)
    {
        context->enqueueV3(stream);
    }
    CUDA_OK(cudaEventRecord(stop, stream));
    CUDA_OK(cudaEventSynchronize(stop));
    float ms = 0.F;
    CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
    double const meanMs = ms / std::max(iterations, 1);
    std::printf("engine %s, batch %lld: mean latency %.3f ms, throughput %.1f images/s\n", planPath.c_str(),
        static_cast<long long>(batch), meanMs, static_cast<double>(batch) * 1000.0 / meanMs);

    if (firstOutput >= 0)
    {
        char const* name = engine->getIOTensorName(firstOutput);
        nvinfer1::DataType const t = engine->getTensorDataType(name);
        nvinfer1::Dims const dims = context->getTensorShape(name);
        int64_t const n = std::min<int64_t>(volume(dims), 5);
        std::vector<uint8_t> host(static_cast<size_t>(n) * elementSize(t));
        CUDA_OK(cudaMemcpy(host.data(), buffers[firstOutput], host.size(), cudaMemcpyDeviceToHost));
        std::printf("%s[0:%lld] =", name, static_cast<long long>(n));
        for (int64_t i = 0; i < n; ++i)
        {
            float v = 0.F;
            if (t == nvinfer1::DataType::kHALF)
            {
                uint16_t h;
                std::memcpy(&h, host.data() + 2 * i, 2);
                v = halfToFloat(h);
            }
            else if (t == nvinfer1::DataType::kFLOAT)
            {
                std::memcpy(&v, host.data() + 4 * i, 4);
            }
            std::printf(" %.5f", v);
        }
        std::printf("\n");
    }
    for (void* b : buffers)
    {
        cudaFree(b);
    }
    cudaStreamDestroy(stream);
    return 0;
}
