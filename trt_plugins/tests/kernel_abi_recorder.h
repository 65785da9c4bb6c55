// Test double of the kernel C ABI: see kernel_abi_recorder.cpp.
#pragma once

#include "ouro_kernels.h"

namespace ouro_test
{
struct Recorder
{
    int linearCalls{0};
    int scanCalls{0};
    ouroOutlierLinearParams_t linear{};
    ouroSelectiveScanParams_t scan{};
    cudaStream_t linearStream{};
    cudaStream_t scanStream{};
    ouroStatus_t status{OURO_OK}; // what the next kernel call returns
    ouroOutlierLinearConfig_t linearConfig{}; // the config the last ouroOutlierLinearRun received
    bool planFused{true};         // what ouroOutlierLinearPlan answers (choice.epilogue FUSED or SEPARATE)
    int numTactics{7};            // what ouroOutlierLinearNumTactics answers
    int flagAllocs{0};            // ouroHostFlagAlloc calls (each returns a fresh host int)
    int flagFrees{0};
};
Recorder& recorder();

size_t fakeOutlierLinearWorkspace(int M, int L, int K, int N, int w_bits, int act_bits, int bits_outlier, int n_refresh,
    int max_outliers);
size_t fakeSelectiveScanWorkspace(int B, int L, int D, int S, int io_is_fp32);
size_t fakeOutlierLinearWorkspaceFor(int M, int L, int K, int N, int w_bits, int act_bits, int bits_outlier,
    int n_refresh, int max_outliers, int epilogue);
} // namespace ouro_test
