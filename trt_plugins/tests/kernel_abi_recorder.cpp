// Test double of the kernel C ABI (ouro_kernels.h) for ouro_plugin_enqueue_tests: records the
// arguments each plugin passes to the kernels, so the plugin -> kernel mapping (shapes, dtypes, bit
// widths, which input feeds which pointer, workspace sizes) is checked on a CPU. It launches nothing.
// The real kernels are linked into libouro_trt_plugins.so and ouro_plugin_tests instead.
#include "kernel_abi_recorder.h"

namespace ouro_test
{
Recorder& recorder()
{
    static Recorder r;
    return r;
}

size_t fakeOutlierLinearWorkspace(int M, int L, int K, int N, int w_bits, int act_bits, int bits_outlier, int n_refresh,
    int max_outliers)
{
    // Distinct for every argument, so a test can tell which values the plugin passed.
    return static_cast<size_t>(M) * 1000003ULL + static_cast<size_t>(L) * 10007ULL + static_cast<size_t>(K) * 101ULL
        + static_cast<size_t>(N) * 7ULL + static_cast<size_t>(w_bits * 1000 + act_bits * 100 + bits_outlier)
        + static_cast<size_t>(n_refresh) * 13ULL + static_cast<size_t>(max_outliers) * 17ULL;
}

size_t fakeOutlierLinearWorkspaceFor(int M, int L, int K, int N, int w_bits, int act_bits, int bits_outlier,
    int n_refresh, int max_outliers, int epilogue)
{
    return fakeOutlierLinearWorkspace(M, L, K, N, w_bits, act_bits, bits_outlier, n_refresh, max_outliers) * 3
        + static_cast<size_t>(epilogue) * 19ULL;
}

size_t fakeSelectiveScanWorkspace(int B, int L, int D, int S, int io_is_fp32)
{
    return static_cast<size_t>(B) * 1000003ULL + static_cast<size_t>(L) * 10007ULL + static_cast<size_t>(D) * 101ULL
        + static_cast<size_t>(S) * 7ULL + static_cast<size_t>(io_is_fp32);
}
} // namespace ouro_test

extern "C"
{
    size_t ouroOutlierLinearWorkspaceSize(int M, int L, int K, int N, int w_bits, int act_bits, int bits_outlier,
        int n_refresh, int max_outliers)
    {
        return ouro_test::fakeOutlierLinearWorkspace(M, L, K, N, w_bits, act_bits, bits_outlier, n_refresh, max_outliers);
    }

    ouroStatus_t ouroOutlierLinear(const ouroOutlierLinearParams_t* p, cudaStream_t stream, ouroGemmPath_t* path_out)
    {
        auto& r = ouro_test::recorder();
        r.linearCalls++;
        r.linear = *p;
        r.linearStream = stream;
        if (path_out)
        {
            *path_out = OURO_PATH_NONE;
        }
        return r.status;
    }

    ouroStatus_t ouroOutlierLinearProfiled(
        const ouroOutlierLinearParams_t* p, cudaStream_t stream, ouroGemmPath_t* path_out, float step_ms[5])
    {
        for (int i = 0; i < 5; ++i)
        {
            step_ms[i] = 0.F;
        }
        return ouroOutlierLinear(p, stream, path_out);
    }

    size_t ouroOutlierLinearWorkspaceSizeFor(int M, int L, int K, int N, int w_bits, int act_bits, int bits_outlier,
        int n_refresh, int max_outliers, ouroEpilogue_t epilogue)
    {
        return ouro_test::fakeOutlierLinearWorkspaceFor(
            M, L, K, N, w_bits, act_bits, bits_outlier, n_refresh, max_outliers, static_cast<int>(epilogue));
    }

    ouroStatus_t ouroOutlierLinearRun(const ouroOutlierLinearParams_t* p, const ouroOutlierLinearConfig_t* cfg,
        cudaStream_t stream, ouroOutlierLinearChoice_t* ran, float* step_ms)
    {
        auto& r = ouro_test::recorder();
        r.linearConfig = cfg ? *cfg : ouroOutlierLinearConfig_t{};
        (void) step_ms;
        if (ran)
        {
            *ran = ouroOutlierLinearChoice_t{};
        }
        return ouroOutlierLinear(p, stream, nullptr);
    }

    int ouroOutlierLinearNumTactics(void)
    {
        return ouro_test::recorder().numTactics;
    }

    int ouroOutlierLinearPlan(int, int, int, int, int, int, int, int, int, int, int, int,
        const ouroOutlierLinearConfig_t*, const ouroOutlierStats_t*, ouroOutlierLinearChoice_t* choice,
        ouroKernelCost_t*, int)
    {
        if (choice)
        {
            *choice = ouroOutlierLinearChoice_t{OURO_PATH_S8_TENSORCORE,
                ouro_test::recorder().planFused ? OURO_EPILOGUE_FUSED : OURO_EPILOGUE_SEPARATE, 0};
        }
        return 2;
    }

    ouroStatus_t ouroHostFlagAlloc(int32_t** flag)
    {
        ouro_test::recorder().flagAllocs++;
        *flag = new int32_t(0);
        return OURO_OK;
    }

    void ouroHostFlagFree(int32_t* flag)
    {
        if (flag)
        {
            ouro_test::recorder().flagFrees++;
            delete flag;
        }
    }

    ouroStatus_t ouroOutlierFakeQuant(const void*, void*, int, int, int, int, const ouroActQuant_t*, cudaStream_t)
    {
        return OURO_ERR_INVALID_ARGUMENT;
    }

    size_t ouroSelectiveScanWorkspaceSize(int B, int L, int D, int S, int io_is_fp32)
    {
        return ouro_test::fakeSelectiveScanWorkspace(B, L, D, S, io_is_fp32);
    }

    ouroStatus_t ouroSelectiveScan(const ouroSelectiveScanParams_t* p, cudaStream_t stream)
    {
        auto& r = ouro_test::recorder();
        r.scanCalls++;
        r.scan = *p;
        r.scanStream = stream;
        return r.status;
    }

    const char* ouroStatusString(ouroStatus_t s)
    {
        return s == OURO_OK ? "OURO_OK" : "recorded failure";
    }
}
