// Status strings, ABI introspection, argument validation shared by all kernel families.
#include "ouro_common.cuh"

#include <math.h>

namespace ouro
{

ouroStatus_t validate_act_quant(const ouroActQuant_t& q, bool required)
{
    if (q.bits == 0)
        return required ? OURO_ERR_INVALID_ARGUMENT : OURO_OK;
    if (q.bits < 2 || q.bits > 8)
        return OURO_ERR_INVALID_ARGUMENT;
    if (!((q.bits_outlier >= 2 && q.bits_outlier <= 8) || q.bits_outlier == 16))
        return OURO_ERR_INVALID_ARGUMENT;
    if (q.n_refresh < 1 || q.scale == nullptr || (q.std_correction != 0 && q.std_correction != 1))
        return OURO_ERR_INVALID_ARGUMENT;
    if (q.policy == OURO_POLICY_DYNAMIC)
        return isfinite(q.k_sigma) ? OURO_OK : OURO_ERR_INVALID_ARGUMENT;
    if (q.policy == OURO_POLICY_CALIBRATED)
        return q.theta != nullptr ? OURO_OK : OURO_ERR_INVALID_ARGUMENT;
    return OURO_ERR_INVALID_ARGUMENT;
}

ouroStatus_t device_cc(int* cc)
{
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess)
        return OURO_ERR_CUDA;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess
        || cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
        return OURO_ERR_CUDA;
    *cc = major * 10 + minor;
    return OURO_OK;
}

} // namespace ouro

extern "C" OURO_API const char* ouroStatusString(ouroStatus_t s)
{
    switch (s)
    {
    case OURO_OK: return "success";
    case OURO_ERR_INVALID_ARGUMENT: return "invalid argument (null pointer, bad bit width or bad enum value)";
    case OURO_ERR_MISALIGNED: return "misaligned pointer (tensors need 16-byte aligned data pointers)";
    case OURO_ERR_UNSUPPORTED_SHAPE: return "unsupported shape";
    case OURO_ERR_OUTLIER_CAPACITY:
        return "outlier capacity exceeded: a window has more outlier channels than max_outliers "
               "(the rows of that window were set to NaN)";
    case OURO_ERR_WORKSPACE: return "workspace too small";
    case OURO_ERR_CUDA: return "CUDA runtime or launch error";
    case OURO_ERR_UNSUPPORTED_ARCH: return "unsupported GPU architecture for this path";
    case OURO_ERR_NOT_IMPLEMENTED:
        return "not implemented in this library (the sm_90 wgmma path does not exist; sm_90 runs the "
               "s8_tensorcore mma.sync kernels)";
    }
    return "unknown ouro status code";
}

extern "C" OURO_API const char* ouroGemmPathString(ouroGemmPath_t p)
{
    switch (p)
    {
    case OURO_PATH_NONE: return "none";
    case OURO_PATH_SM80_S4_TENSORCORE: return "sm80_s4_tensorcore";
    case OURO_PATH_S8_TENSORCORE: return "s8_tensorcore";
    case OURO_PATH_SIMT_FALLBACK: return "simt_fallback";
    case OURO_PATH_SM90_WGMMA: return "sm90_wgmma";
    }
    return "unknown";
}

extern "C" OURO_API size_t ouroAbiStructSize(int which)
{
    switch (which)
    {
    case 0: return sizeof(ouroActQuant_t);
    case 1: return sizeof(ouroOutlierLinearParams_t);
    case 2: return sizeof(ouroSelectiveScanParams_t);
    case 3: return sizeof(ouroOutlierLinearConfig_t);
    case 4: return sizeof(ouroOutlierLinearChoice_t);
    case 5: return sizeof(ouroKernelCost_t);
    case 6: return sizeof(ouroOutlierStats_t);
    }
    return 0;
}
