// CUTLASS 2.x tensor-core GEMM producing exact int32 accumulators:
//   D[M, N] (row-major int32) = A[M, K] (row-major) x B[N, K]^T  (B row-major [N, K] = column-major K x N)
// Instantiated once per element type in gemm_s8_sm80.cu / gemm_s4_sm80.cu (SM80 kernels, which also run
// on sm_86/89/90). The epilogue writes the raw accumulator (ScaleType::Nothing); dequantization is
// applied in the combine step so that the debug accumulators stay bit-exact.
#pragma once

#include "ouro_kernels.h"

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm.h>
#include <cutlass/numeric_types.h>

namespace ouro
{

template <typename Element, int kTileK, int kInstK>
ouroStatus_t run_cutlass_gemm(int M, int N, int K, const void* A, const void* B, int32_t* D, cudaStream_t stream)
{
    constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
    using Epilogue = cutlass::epilogue::thread::LinearCombination<int32_t, 4, int32_t, int32_t,
                                                                  cutlass::epilogue::thread::ScaleType::Nothing>;
    using Gemm = cutlass::gemm::device::Gemm<Element, cutlass::layout::RowMajor, Element, cutlass::layout::ColumnMajor,
                                             int32_t, cutlass::layout::RowMajor, int32_t, cutlass::arch::OpClassTensorOp,
                                             cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, kTileK>,
                                             cutlass::gemm::GemmShape<64, 64, kTileK>,
                                             cutlass::gemm::GemmShape<16, 8, kInstK>, Epilogue,
                                             cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 3, kAlign,
                                             kAlign, false, cutlass::arch::OpMultiplyAddSaturate>;
    using RefA = cutlass::TensorRef<Element const, cutlass::layout::RowMajor>;
    using RefB = cutlass::TensorRef<Element const, cutlass::layout::ColumnMajor>;
    using RefC = cutlass::TensorRef<int32_t const, cutlass::layout::RowMajor>;
    using RefD = cutlass::TensorRef<int32_t, cutlass::layout::RowMajor>;
    typename Gemm::Arguments args({M, N, K}, RefA(static_cast<Element const*>(A), K),
                                  RefB(static_cast<Element const*>(B), K), RefC(D, N), RefD(D, N),
                                  typename Epilogue::Params(), 1);
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess)
        return OURO_ERR_UNSUPPORTED_SHAPE;
    Gemm gemm;
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess)
        return OURO_ERR_CUDA;
    if (gemm(stream) != cutlass::Status::kSuccess)
        return OURO_ERR_CUDA;
    return cudaGetLastError() == cudaSuccess ? OURO_OK : OURO_ERR_CUDA;
}

} // namespace ouro
