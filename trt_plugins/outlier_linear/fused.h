// The fused outlier-split linear (OURO_EPILOGUE_FUSED): host-visible definitions shared by the launch code,
// the launch plans (ouroOutlierLinearPlan) and the kernels: tile shapes (= plugin tactics), operand kinds,
// shared-memory sizes, kernel arguments. Kernels: act_prep.cuh, fused_gemm.cuh; launches: fused_gemm_*.cu.
#pragma once

#include "ouro_common.cuh"

namespace ouro
{
namespace fused
{

// Operand kinds of the fused GEMM.
enum Op : int
{
    kOpS8W8 = 0, // int8 activation codes x int8 weights, mma m16n8k32 s8
    kOpS8W4 = 1, // int8 activation codes x packed int4 weights, unpacked to int8 in registers (sm_90, A>4 bits)
    kOpS4 = 2    // packed int4 x packed int4, native mma m16n8k64 s4 (sm_80/86/89)
};

struct TileShape
{
    int bm, bn;             // CTA tile (rows of M, columns of N)
    int warps_m, warps_n;   // warp grid; warp tile (bm / warps_m) x (bn / warps_n)
    int stages;             // cp.async pipeline depth of the main loop
    const char* name;
};

// The tactics: id = index + 1. Warp tiles are at most 64x32 (MI * NI <= 16) so that the inlier and the outlier
// accumulators (2 x 64 registers) fit beside the fragments.
constexpr TileShape kTiles[] = {
    {128, 128, 2, 4, 3, "128x128"}, // large M and N (in_proj at batch 32)
    {64, 64, 2, 2, 4, "64x64"},
    {32, 64, 1, 2, 4, "32x64"},     // small M (batch 1): more CTAs
    {128, 48, 4, 1, 3, "128x48"},   // N = 44 (Vim-T x_proj)
    {64, 80, 4, 1, 3, "64x80"},     // N = 80 (Vim-B x_proj) without an empty half tile
};
constexpr int kNumTiles = static_cast<int>(sizeof(kTiles) / sizeof(kTiles[0]));

constexpr int kUnionChunk = 64; // outlier channels of the union per outlier K-slab
constexpr int kMaxKFused = 8192; // the prep kernel keeps a few rows of x and a K-entry list in shared memory

// Bytes per row per pipeline stage: A (64 k int8 or 128 k int4), B (as A, or 64 k int4 for kOpS8W4).
constexpr int row_bytes_a()
{
    return 64;
}
constexpr int row_bytes_b(int op)
{
    return op == kOpS8W4 ? 32 : 64;
}
constexpr int k_per_stage(int op)
{
    return op == kOpS4 ? 128 : 64;
}
constexpr int slab_row_bytes(bool fp16_outliers)
{
    return fp16_outliers ? 2 * kUnionChunk : kUnionChunk;
}

// Dynamic shared memory of the fused GEMM: [main: pipeline stages, reused by the outlier slabs]
// [W rows of union chunk 0, captured during the main loop] [bitmap of the union][prefix popcounts].
inline size_t gemm_smem_bytes(int op, bool fp16_outliers, const TileShape& t, int K)
{
    const size_t stage = static_cast<size_t>(t.bm) * row_bytes_a() + static_cast<size_t>(t.bn) * row_bytes_b(op);
    const size_t slab = slab_row_bytes(fp16_outliers);
    size_t main = stage * t.stages;
    const size_t outlier = (static_cast<size_t>(t.bm) + t.bn) * slab;
    main = main > outlier ? main : outlier;
    const size_t words = static_cast<size_t>((K + 31) / 32);
    return main + t.bn * slab + 2 * words * sizeof(uint32_t);
}

inline int gemm_threads(const TileShape& t)
{
    return 32 * t.warps_m * t.warps_n;
}

// Arguments of the fused GEMM kernel.
struct GemmArgs
{
    int M, L, K, N, W, n_refresh, max_outliers, w_bits, y_is_fp32;
    const void* a;             // inlier codes: int8 [M, K], or packed int4 [M, K/2] (kOpS4)
    const int8_t* w;           // weights: int8 [N, K], or packed int4 [N, K/2]
    const float* w_scale;      // [N]
    const float* bias;         // [N] or null
    const float* s_in;         // [L] static inlier scale S_I(t)
    const float* s_out;        // [M] dynamic outlier scale S_O
    const void* a_out;         // [M, max_outliers] outlier codes (int8), or fp16 values
    const int32_t* slot_chan;  // [BW, max_outliers] channel of each slot (join order)
    const int32_t* slot_first; // [BW, max_outliers] window position at which it joined
    const int32_t* count;      // [BW] list length (> max_outliers: overflow, rows NaN)
    void* y;                   // [M, N] fp16 or fp32
    int32_t* dbg_acc_in;       // [M, N] or null
    int32_t* dbg_acc_out;      // [M, N] or null (integer outliers only)
};

// Arguments of the activation-prep kernel (one block per (image, window)).
struct PrepArgs
{
    int M, L, K, n_refresh, max_outliers, ring;
    ouroActQuant_t q;
    const void* x;             // [M, K] fp16 / fp32
    int8_t* a_in;              // int8 [M, K] or packed int4 [M, K/2]
    void* a_out;               // [M, max_outliers]
    float* s_out;              // [M]
    int32_t* slot_chan;        // [BW, max_outliers]
    int32_t* slot_first;       // [BW, max_outliers]
    int32_t* count;            // [BW]
    int32_t* flag;             // [1] bit 0: some window overflowed
    int32_t* report;           // optional caller flag (ouroOutlierLinearConfig_t::overflow_report)
    int8_t* dbg_codes;         // [M, K] or null
    uint8_t* dbg_mask;         // [M, K] or null
};

// Launches (fused_gemm_*.cu, one file per operand kind; kOpS4 compiled only for the native-s4 archs).
ouroStatus_t launch_gemm_s8w8(const GemmArgs& a, bool fp16_outliers, int tile, cudaStream_t s);
ouroStatus_t launch_gemm_s8w4(const GemmArgs& a, bool fp16_outliers, int tile, cudaStream_t s);
ouroStatus_t launch_gemm_s4(const GemmArgs& a, int tile, cudaStream_t s);
bool gemm_s4_compiled();
ouroStatus_t launch_prep(const PrepArgs& a, bool x_fp32, bool pack_s4, cudaStream_t s);

} // namespace fused
} // namespace ouro
