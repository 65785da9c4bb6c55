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
};
Recorder& recorder();

size_t fakeOutlierLinearWorkspace(int M, int L, int K, int N, int w_bits, int act_bits, int bits_outlier, int n_refresh,
    int max_outliers);
size_t fakeSelectiveScanWorkspace(int B, int L, int D, int S, int io_is_fp32);
} // namespace ouro_test
