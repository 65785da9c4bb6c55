// CUTLASS 2.x tensor-core GEMM of step 3 of the SEPARATE epilogue, D[M, N] = A[M, K] (row-major) x B[N, K]^T
// (B row-major [N, K] = column-major K x N), raw int32 accumulators (ScaleType::Nothing), the input of the
// combine step. SM80 kernels (they also run on sm_86/89/90); one instantiation per .cu file.
#pragma once

#include "gemm.cuh"

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm.h>
#include <cutlass/numeric_types.h>

namespace ouro
{

// Tile configuration shared by both GEMM flavours of one element type.
template <typename Element, int kTileK, int kInstK>
struct TileConfig
{
    static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
    static constexpr int kStages = 3;
    using Threadblock = cutlass::gemm::GemmShape<128, 128, kTileK>;
    using Warp = cutlass::gemm::GemmShape<64, 64, kTileK>;
    using Instruction = cutlass::gemm::GemmShape<16, 8, kInstK>;
};

template <typename Element, int kTileK, int kInstK>
ouroStatus_t run_cutlass_gemm(int M, int N, int K, const void* A, const void* B, int32_t* D, cudaStream_t stream)
{
    using Cfg = TileConfig<Element, kTileK, kInstK>;
    using Epilogue = cutlass::epilogue::thread::LinearCombination<int32_t, 4, int32_t, int32_t,
                                                                  cutlass::epilogue::thread::ScaleType::Nothing>;
    using Gemm = cutlass::gemm::device::Gemm<Element, cutlass::layout::RowMajor, Element, cutlass::layout::ColumnMajor,
                                             int32_t, cutlass::layout::RowMajor, int32_t, cutlass::arch::OpClassTensorOp,
                                             cutlass::arch::Sm80, typename Cfg::Threadblock, typename Cfg::Warp,
                                             typename Cfg::Instruction, Epilogue,
                                             cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>,
                                             Cfg::kStages, Cfg::kAlign, Cfg::kAlign, false,
                                             cutlass::arch::OpMultiplyAddSaturate>;
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
    return launch_status();
}

} // namespace ouro
