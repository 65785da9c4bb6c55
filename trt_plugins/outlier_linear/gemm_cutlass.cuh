// CUTLASS 2.x tensor-core GEMMs of step 3, D[M, N] = A[M, K] (row-major) x B[N, K]^T (B row-major [N, K] =
// column-major K x N). SM80 kernels (they also run on sm_86/89/90); one instantiation per .cu file:
//   run_cutlass_gemm          raw int32 accumulators (ScaleType::Nothing): the exact path whose accumulators
//                             tests compare bit for bit, and the input of the separate combine step;
//   run_cutlass_gemm_dequant  the inlier dequantization fused into the epilogue through an epilogue visitor
//                             tree (EVT): y = half(float(acc) * (row_scale[m] * col_scale[n]) + bias[n]).
#pragma once

#include "gemm.cuh"

// Include order matters: the EVT visitors need cutlass::gemm declared before cute's `gemm` function.
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm.h>
#include <cutlass/gemm/device/gemm_universal.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/default_gemm_universal_with_visitor.h>
#include <cutlass/epilogue/threadblock/fusion/visitors.hpp>
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
    return cudaGetLastError() == cudaSuccess ? OURO_OK : OURO_ERR_CUDA;
}

// EVT compute node: element-wise ouro::dequant_inlier over (accumulator, row scale, column scale, bias).
template <typename T>
struct DequantInlierFn;

template <int N>
struct DequantInlierFn<cutlass::Array<float, N>>
{
    using Frag = cutlass::Array<float, N>;
    CUTLASS_DEVICE Frag operator()(Frag const& acc, Frag const& s_row, Frag const& s_col, Frag const& bias) const
    {
        Frag y;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < N; ++i)
            y[i] = dequant_inlier(acc[i], s_row[i], s_col[i], bias[i]);
        return y;
    }
};

template <typename Element, int kTileK, int kInstK>
ouroStatus_t run_cutlass_gemm_dequant(int M, int N, int K, const void* A, const void* B, const InlierDequant& e,
                                      cudaStream_t stream)
{
    using namespace cute;
    namespace tb = cutlass::epilogue::threadblock;
    using Cfg = TileConfig<Element, kTileK, kInstK>;
    using ElementY = cutlass::half_t;
    constexpr int kAlignY = 8;
    constexpr int kEpilogueStages = 1;
    using ThreadMap = tb::OutputTileThreadLayout<typename Cfg::Threadblock, typename Cfg::Warp, ElementY, kAlignY,
                                                 kEpilogueStages>;
    using Acc = tb::VisitorAccFetch;
    using RowScale = tb::VisitorColBroadcast<ThreadMap, float, Stride<_1, _0, int32_t>>; // one value per row m
    using ColScale = tb::VisitorRowBroadcast<ThreadMap, float, Stride<_0, _1, int32_t>>; // one value per column n
    using Bias = tb::VisitorRowBroadcast<ThreadMap, float, Stride<_0, _1, int32_t>>;     // null pointer -> 0
    using Dequant = tb::VisitorCompute<DequantInlierFn, ElementY, float, cutlass::FloatRoundStyle::round_to_nearest>;
    using DequantTree = tb::Sm80EVT<Dequant, Acc, RowScale, ColScale, Bias>;
    using Store = tb::VisitorAuxStore<ThreadMap, ElementY, cutlass::FloatRoundStyle::round_to_nearest,
                                      Stride<int64_t, _1, int64_t>>;
    using Tree = tb::Sm80EVT<Store, DequantTree>;
    using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
        Element, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, Cfg::kAlign, Element,
        cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, Cfg::kAlign, ElementY,
        cutlass::layout::RowMajor, kAlignY, int32_t, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
        typename Cfg::Threadblock, typename Cfg::Warp, typename Cfg::Instruction, Tree,
        cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Cfg::kStages,
        cutlass::arch::OpMultiplyAddSaturate, kEpilogueStages>::GemmKernel;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

    const int64_t MN = static_cast<int64_t>(M) * N;
    typename Tree::Arguments tree{
        {
            {},                                               // Acc
            {e.row_scale, 0.f, {_1{}, _0{}, M}},              // RowScale
            {e.col_scale, 0.f, {_0{}, _1{}, N}},              // ColScale
            {e.bias, 0.f, {_0{}, _1{}, N}},                   // Bias
            {}                                                // Dequant
        },
        {reinterpret_cast<ElementY*>(e.y), {int64_t(N), _1{}, MN}} // Store
    };
    typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K}, 1, tree, A, B, nullptr, nullptr,
                                  int64_t(M) * K, int64_t(N) * K, 0, 0, int64_t(K), int64_t(K), 0, 0);
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess)
        return OURO_ERR_UNSUPPORTED_SHAPE;
    Gemm gemm;
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess)
        return OURO_ERR_CUDA;
    if (gemm.run(stream) != cutlass::Status::kSuccess)
        return OURO_ERR_CUDA;
    return cudaGetLastError() == cudaSuccess ? OURO_OK : OURO_ERR_CUDA;
}

} // namespace ouro
