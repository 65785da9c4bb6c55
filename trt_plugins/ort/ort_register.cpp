// libouro_ort_ops.so entry point: RegisterCustomOps, looked up by onnxruntime's
// SessionOptions.register_custom_ops_library (Python), Ort::SessionOptions::RegisterCustomOpsLibrary (C++),
// SessionOptions.RegisterCustomOpLibraryV2 (C#), OrtSession.SessionOptions.registerCustomOpLibrary (Java).
//
// Domain "ouro", op types OutlierLinear and SelectiveScan, each for FLOAT and FLOAT16 activations, on the
// CPU execution provider and (when built with CUDA) the CUDA execution provider.
#include "ort_common.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#if defined(_WIN32)
#define OURO_ORT_EXPORT __declspec(dllexport)
#else
#define OURO_ORT_EXPORT __attribute__((visibility("default")))
#endif

namespace
{

using namespace ouro::ort;

std::once_flag g_init;
std::vector<CustomOp*> g_ops;
std::mutex g_domains_mu;

// Domains must outlive the sessions that use them: kept until the library is unloaded.
struct Domains
{
    std::vector<OrtCustomOpDomain*> list;
    ~Domains()
    {
        if (g_api)
            for (OrtCustomOpDomain* d : list)
                g_api->ReleaseCustomOpDomain(d);
    }
} g_domains;

// onnxruntime's C API version equals its minor release number (1.17 -> 17).
uint32_t runtime_api_version(const OrtApiBase* base)
{
    const char* v = base->GetVersionString ? base->GetVersionString() : nullptr;
    if (!v)
        return 0;
    const char* dot = std::strchr(v, '.');
    return dot ? static_cast<uint32_t>(std::strtoul(dot + 1, nullptr, 10)) : 0;
}

} // namespace

extern "C" OURO_ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base)
{
    const uint32_t runtime = runtime_api_version(base);
    if (runtime < kMinApiVersion)
    {
        const OrtApi* api = runtime > 0 ? base->GetApi(runtime) : nullptr;
        const std::string msg = std::string("libouro_ort_ops needs onnxruntime >= 1.") + std::to_string(kMinApiVersion)
            + "; this process runs onnxruntime " + (base->GetVersionString ? base->GetVersionString() : "(unknown)");
        if (api)
            return api->CreateStatus(ORT_FAIL, msg.c_str());
        std::fprintf(stderr, "%s\n", msg.c_str());
        return nullptr;
    }
    std::call_once(g_init, [&] {
        g_api_version = runtime < ORT_API_VERSION ? runtime : ORT_API_VERSION;
        g_api = base->GetApi(g_api_version);
        if (!g_api)
            return;
        append_cpu_ops(g_ops);
        append_cuda_ops(g_ops);
    });
    if (!g_api)
        return nullptr; // unreachable: GetApi(v) exists for every v up to the runtime's version
    return guarded([&] {
        OrtCustomOpDomain* domain = nullptr;
        check(g_api->CreateCustomOpDomain("ouro", &domain), "CreateCustomOpDomain");
        {
            std::lock_guard<std::mutex> lock(g_domains_mu);
            g_domains.list.push_back(domain);
        }
        for (CustomOp* op : g_ops)
            check(g_api->CustomOpDomain_Add(domain, op), "CustomOpDomain_Add");
        check(g_api->AddCustomOpDomain(options, domain), "AddCustomOpDomain");
    });
}
