// ouro kernels: C ABI shared by the TensorRT plugins and the Python (ctypes) binding.
//
// Shape notation (defined once):
//   B batch, L tokens, M = B*L rows (row m is token t = m % L of image b = m / L)
//   K input channels (GEMM reduction), N output channels, D = d_inner, S = d_state (16)
//
// Numerics are defined by the PyTorch references in ouro.calib.quantizers
// (`outlier_quant_ref`, `outlier_linear_ref`) and ouro.calib.scan (`selective_scan_ref`).
// Integer codes and integer accumulators must match those references bit-exactly.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define OURO_API __declspec(dllexport)
#else
#define OURO_API __attribute__((visibility("default")))
#endif

typedef enum
{
    OURO_OK = 0,
    OURO_ERR_INVALID_ARGUMENT = 1,  // null pointer, bad bit width, bad enum value
    OURO_ERR_MISALIGNED = 2,        // a pointer is not aligned as the kernel requires (16 B)
    OURO_ERR_UNSUPPORTED_SHAPE = 3, // e.g. K not a multiple of the required granularity
    OURO_ERR_OUTLIER_CAPACITY = 4,  // more outlier channels in a window than max_outliers
    OURO_ERR_WORKSPACE = 5,         // workspace smaller than ouro*WorkspaceSize()
    OURO_ERR_CUDA = 6,              // a CUDA launch/runtime error (read with cudaPeekAtLastError after launches)
    OURO_ERR_UNSUPPORTED_ARCH = 7,
    OURO_ERR_NOT_IMPLEMENTED = 8    // (v1.3) a requested path that this library does not implement
} ouroStatus_t;

typedef enum
{
    OURO_POLICY_DYNAMIC = 0,    // theta = mean|I| + k_sigma * std|I| per token
    OURO_POLICY_CALIBRATED = 1  // theta = theta[t], a static per-token table
} ouroThresholdPolicy_t;

typedef enum
{
    OURO_PATH_NONE = 0,
    OURO_PATH_SM80_S4_TENSORCORE = 1, // native INT4 MMA (sm_80 / sm_86 / sm_89)
    OURO_PATH_S8_TENSORCORE = 2,      // INT8 MMA (sm_90 with 4-bit weights unpacked in registers, and all INT8)
    OURO_PATH_SIMT_FALLBACK = 3,      // plain CUDA cores (any arch; used for tiny or odd shapes)
    OURO_PATH_SM90_WGMMA = 4          // (v1.3) reserved: Hopper wgmma; NOT implemented, requests return
                                      // OURO_ERR_NOT_IMPLEMENTED (sm_90 runs OURO_PATH_S8_TENSORCORE, mma.sync)
} ouroGemmPath_t;

// Static + dynamic activation quantizer of one operand (OuroMamba Algorithm 2).
typedef struct
{
    int bits;                 // inlier bits (2..8); 0 = operand not quantized
    int bits_outlier;         // outlier bits (2..8), or 16 = outliers kept in fp16
    int n_refresh;            // outlier-list refresh window, >= 1
    int policy;               // ouroThresholdPolicy_t
    float k_sigma;            // dynamic policy: threshold = mean + k_sigma * std
    int std_correction;       // (v1.3) std over the C channels divides by max(C - std_correction, 1): 0 or 1
                              // (1 = Bessel, like torch.std). Occupies what was padding: layout and size unchanged,
                              // and zero-initialised callers get 0, the behaviour before v1.3.
    const float* scale;       // [L] static inlier scale S_I(t), > 0  (device)
    const float* theta;       // [L] calibrated thresholds (device), only for OURO_POLICY_CALIBRATED
} ouroActQuant_t;

// ---------------------------------------------------------------------------------------------
// Outlier-split linear:  Y[M, N] = X[M, K] * W[N, K]^T (+ bias)
// ---------------------------------------------------------------------------------------------
typedef struct
{
    int M, L, K, N;
    const void* x;            // [M, K], fp16 (x_is_fp32 = 0) or fp32 (x_is_fp32 = 1), row-major
    int x_is_fp32;
    const int8_t* w;          // w_bits = 8: int8 [N, K]; w_bits = 4: [N, K/2] packed (low nibble = even k)
    int w_bits;               // 4 or 8
    const float* w_scale;     // [N] per-output-channel weight scale
    const float* bias;        // [N] or NULL
    ouroActQuant_t act;       // act.bits in {4, 8}; act.bits_outlier in {4, 8, 16}
    int max_outliers;         // capacity of outlier channels per (image, window); <= K
    void* y;                  // [M, N], same dtype as x
    void* workspace;
    size_t workspace_size;
    // Optional debug outputs (device, may be NULL): exact integer results for tests.
    int32_t* acc_inlier;      // [M, N]
    int32_t* acc_outlier;     // [M, N] (int8/int4 outliers only)
    int8_t* inlier_codes;     // [M, K]
    uint8_t* outlier_mask;    // [M, K]
} ouroOutlierLinearParams_t;

OURO_API size_t ouroOutlierLinearWorkspaceSize(int M, int L, int K, int N, int w_bits, int act_bits,
                                               int bits_outlier, int n_refresh, int max_outliers);

// Picks the GEMM path from the device's compute capability; writes it to *path_out if non-NULL.
OURO_API ouroStatus_t ouroOutlierLinear(const ouroOutlierLinearParams_t* p, cudaStream_t stream,
                                        ouroGemmPath_t* path_out);

// Per-step timings (ms) of the five pipeline steps of the last ouroOutlierLinearProfiled call:
// [0] detect+extract outliers, [1] inlier quantize/pack, [2] inlier GEMM, [3] outlier GEMM,
// [4] outlier dequant + combine. Synchronises the stream; for benchmarks only.
OURO_API ouroStatus_t ouroOutlierLinearProfiled(const ouroOutlierLinearParams_t* p, cudaStream_t stream,
                                                ouroGemmPath_t* path_out, float step_ms[5]);

// ---------------------------------------------------------------------------------------------
// Standalone OuroMamba fake quantization of x [B, L, C] (used on Delta/B/C before the scan).
// ---------------------------------------------------------------------------------------------
OURO_API ouroStatus_t ouroOutlierFakeQuant(const void* x, void* y, int x_is_fp32, int B, int L, int C,
                                           const ouroActQuant_t* q, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Selective scan (Mamba-1), token-major layout, fp32 state.
//   h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t ;  y_t = C_t . h_t + Dskip * u_t
//   delta_t = softplus(delta_in_t) if delta_softplus else delta_in_t
//   out_t = y_t * silu(z_t)   (if z != NULL)
// reverse = 1 runs t = L-1 .. 0 (the backward direction of Vim, without flipped copies).
// ---------------------------------------------------------------------------------------------
typedef struct
{
    int B, L, D, S;
    int io_is_fp32;           // 1: fp32 u/delta/B/C/z/out, 0: fp16
    int reverse;
    int delta_softplus;
    const void* u;            // [B, L, D]
    const void* delta;        // [B, L, D]  (dt_proj output, bias included, before softplus)
    const float* A;           // [D, S]  (A = -exp(A_log), possibly already fake-quantized)
    const void* Bm;           // [B, L, S]
    const void* Cm;           // [B, L, S]
    const float* Dskip;       // [D] or NULL
    const void* z;            // [B, L, D] or NULL
    void* out;                // [B, L, D]
    // SSM-operand fake quantization applied before the recurrence (bits = 0: off)
    ouroActQuant_t delta_q;   // over D channels per token
    ouroActQuant_t b_q;       // over S channels per token
    ouroActQuant_t c_q;       // over S channels per token
    // Hidden-state quantization inside the recurrence (TGQ): step i (0-based, in scan order)
    // uses group g = i / h_group:  h = h_scale[g] * (clamp(round(h / h_scale[g]) + h_zero[g], 0, 2^h_bits - 1) - h_zero[g])
    int h_bits;               // 0 = off
    int h_group;
    const float* h_scale;     // [ceil(L / h_group)]
    const float* h_zero;      // [ceil(L / h_group)], integer-valued
    void* workspace;
    size_t workspace_size;
} ouroSelectiveScanParams_t;

OURO_API size_t ouroSelectiveScanWorkspaceSize(int B, int L, int D, int S, int io_is_fp32);
OURO_API ouroStatus_t ouroSelectiveScan(const ouroSelectiveScanParams_t* p, cudaStream_t stream);

// Human-readable message for a status code (static string).
OURO_API const char* ouroStatusString(ouroStatus_t s);

// ---------------------------------------------------------------------------------------------
// Additions (v1.1, additive: nothing above changed)
// ---------------------------------------------------------------------------------------------
// Outlier capacity: the kernels detect "more outlier channels in a window than max_outliers" on the
// device, so ouroOutlierLinear (asynchronous) cannot return OURO_ERR_OUTLIER_CAPACITY itself. Instead the
// rows of every overflowing window are written as NaN (never a silently wrong result) and a flag is set
// in the workspace; ouroOutlierLinearCheck synchronises the stream and returns OURO_ERR_OUTLIER_CAPACITY
// if the last call on this workspace overflowed. ouroOutlierLinearProfiled returns it directly.
OURO_API ouroStatus_t ouroOutlierLinearCheck(const ouroOutlierLinearParams_t* p, cudaStream_t stream);

// As ouroOutlierLinear / ouroOutlierLinearProfiled, forcing a GEMM path (OURO_PATH_NONE = automatic).
// A path the device or shape cannot run returns OURO_ERR_UNSUPPORTED_ARCH / OURO_ERR_UNSUPPORTED_SHAPE.
OURO_API ouroStatus_t ouroOutlierLinearWithPath(const ouroOutlierLinearParams_t* p, ouroGemmPath_t requested,
                                                cudaStream_t stream, ouroGemmPath_t* path_out);
OURO_API ouroStatus_t ouroOutlierLinearProfiledWithPath(const ouroOutlierLinearParams_t* p, ouroGemmPath_t requested,
                                                        cudaStream_t stream, ouroGemmPath_t* path_out,
                                                        float step_ms[5]);

// ---------------------------------------------------------------------------------------------
// Additions (v1.2, additive): the fused epilogue
// ---------------------------------------------------------------------------------------------
// OURO_EPILOGUE_FUSED: the outlier term and the dequantization inside one tensor-core GEMM that writes y once
// (the design changed in v1.3; see the v1.3 section below). OURO_EPILOGUE_SEPARATE: the five-kernel pipeline whose
// y equals the reference's fp32 expression rounded once. OURO_EPILOGUE_AUTO (what ouroOutlierLinear uses): fused
// whenever the shape allows. Since v1.3 both epilogues write the debug outputs and run fp16 and fp32 x.
typedef enum
{
    OURO_EPILOGUE_AUTO = 0,
    OURO_EPILOGUE_FUSED = 1,
    OURO_EPILOGUE_SEPARATE = 2
} ouroEpilogue_t;

// Forced path and epilogue (AUTO for either = automatic), the path and epilogue that ran (outputs may be NULL),
// and per-step timings when step_ms (float[5]) is non-NULL, in which case the call synchronises and returns
// OURO_ERR_OUTLIER_CAPACITY itself. Forcing FUSED where it cannot run returns OURO_ERR_UNSUPPORTED_SHAPE.
// ouroOutlierLinearRun (v1.3) is the general entry point (adds tactics and the overflow report).
OURO_API ouroStatus_t ouroOutlierLinearEx(const ouroOutlierLinearParams_t* p, ouroGemmPath_t requested_path,
                                          ouroEpilogue_t requested_epilogue, cudaStream_t stream,
                                          ouroGemmPath_t* path_out, ouroEpilogue_t* epilogue_out, float* step_ms);

// Name of a GEMM path (static string), e.g. "s8_tensorcore".
OURO_API const char* ouroGemmPathString(ouroGemmPath_t p);

// sizeof of the ABI structs as compiled into the library, for binding self-checks:
// 0 ouroActQuant_t, 1 ouroOutlierLinearParams_t, 2 ouroSelectiveScanParams_t, (v1.3) 3 ouroOutlierLinearConfig_t,
// 4 ouroOutlierLinearChoice_t, 5 ouroKernelCost_t, 6 ouroOutlierStats_t (0 for other values).
OURO_API size_t ouroAbiStructSize(int which);

// ---------------------------------------------------------------------------------------------
// Additions (v1.3, additive): the fused outlier GEMM, tactics, capacity reporting, launch plans
// ---------------------------------------------------------------------------------------------
// OURO_EPILOGUE_FUSED now means: one activation-prep kernel per (image, window) reads x once and writes the
// inlier codes and the compacted outliers; ONE tensor-core GEMM kernel then runs the inlier GEMM, gathers the
// union of its M-tile's outlier channels (the matching W rows captured from the GEMM's own shared-memory
// stream, K-major), runs them as an extra K-slab into a second accumulator, and writes y once:
//   y = float(acc_in) * (S_I(t) * s_w[n]) + float(acc_out) * (S_O[m] * s_w[n]) (+ bias[n])
// with the reference's roundings, so y is the reference's y for integer outliers (bit for bit after the
// final rounding to y's dtype), for fp16 and fp32 x. fp16 outliers (bits_outlier 16) run on fp16 tensor
// cores with fp32 accumulation: y within a named tolerance. The debug accumulators and codes are written
// from the same kernels. Needs a tensor-core path and K % 16 == 0 (8-bit weights) or K % 32 == 0 (4-bit);
// any N. OURO_EPILOGUE_SEPARATE stays the five-kernel exact variant. AUTO picks FUSED whenever possible.

// Tactics = tile shapes (BM x BN) of the fused GEMM; 0 = automatic (fewest waves on the device, then the
// largest tile). Valid ids are 1..ouroOutlierLinearNumTactics().
OURO_API int ouroOutlierLinearNumTactics(void);
OURO_API const char* ouroOutlierLinearTacticName(int tactic); // "128x128", ...; NULL for an invalid id

typedef struct
{
    ouroGemmPath_t path;       // OURO_PATH_NONE = automatic
    ouroEpilogue_t epilogue;   // OURO_EPILOGUE_AUTO = automatic
    int tactic;                // 0 = automatic
    int32_t* overflow_report;  // optional, device-writable (e.g. ouroHostFlagAlloc): set to 1 by the kernels
                               // when a window exceeds max_outliers; never cleared by the library
} ouroOutlierLinearConfig_t;

typedef struct
{
    ouroGemmPath_t path;
    ouroEpilogue_t epilogue;
    int tactic;                // tile of the fused kernel, 0 for the separate epilogue
} ouroOutlierLinearChoice_t;

// The general entry point (v1.3). cfg may be NULL (all automatic). ran (may be NULL) receives what ran.
// step_ms (float[5] or NULL): as ouroOutlierLinearEx; with the fused epilogue step 0 is the activation prep
// and step 2 the fused GEMM, the others are 0.
OURO_API ouroStatus_t ouroOutlierLinearRun(const ouroOutlierLinearParams_t* p, const ouroOutlierLinearConfig_t* cfg,
                                           cudaStream_t stream, ouroOutlierLinearChoice_t* ran, float* step_ms);

// Workspace of one epilogue (AUTO: the one AUTO runs for this shape, which does not depend on the GPU).
// The fused epilogue needs no M x N buffer. ouroOutlierLinearWorkspaceSize returns the SEPARATE size, which
// is enough for every epilogue.
OURO_API size_t ouroOutlierLinearWorkspaceSizeFor(int M, int L, int K, int N, int w_bits, int act_bits,
                                                  int bits_outlier, int n_refresh, int max_outliers,
                                                  ouroEpilogue_t epilogue);

// Pinned host memory mapped into the device address space (one zeroed int32), for overflow_report: the
// kernels write it, the host reads and clears it with plain (volatile) accesses, no CUDA call, no sync.
OURO_API ouroStatus_t ouroHostFlagAlloc(int32_t** flag);
OURO_API void ouroHostFlagFree(int32_t* flag);

// ---- launch plans, for traffic models (tools/perf_model.py); pure host code, no GPU needed.
typedef enum
{
    OURO_MMA_NONE = 0,
    OURO_MMA_S8 = 1,  // int8 x int8 -> int32 tensor cores
    OURO_MMA_S4 = 2,  // int4 x int4 -> int32
    OURO_MMA_F16 = 3  // fp16 x fp16 -> fp32
} ouroMmaKind_t;

typedef struct
{
    char name[48];
    unsigned grid[3];
    unsigned block[3];
    unsigned smem_bytes;
    int mma_kind;            // ouroMmaKind_t of mma_ops
    int mma_kind_outlier;    // ouroMmaKind_t of mma_ops_outlier
    double dram_read_bytes;  // each global tensor counted once per kernel (re-reads assumed to hit L2)
    double dram_write_bytes;
    double l2_read_bytes;    // bytes the SMs load, counting every CTA's re-reads of shared operands
    double mma_ops;          // 2 x multiply-adds issued on tensor cores (tile padding included), inlier GEMM
    double mma_ops_outlier;  // 2 x multiply-adds of the outlier term (union slabs, padding included)
    double simt_ops;         // other arithmetic, per element of work (for reporting only)
} ouroKernelCost_t;

typedef struct
{
    double window_channels;  // average number of channels in one window's outlier list
    double hot_channels;     // distinct channels that are ever outliers (windows draw from these); 0 = K
} ouroOutlierStats_t;

// Fills out[0 .. n-1] with the kernels ouroOutlierLinearRun would launch for this problem on a GPU with
// compute capability cc and num_sms SMs (same code as the launch: path, epilogue, tile, grid, shared memory),
// each with its modelled traffic and MMA work; returns n (>= 0), or -(ouroStatus_t) on an invalid request.
OURO_API int ouroOutlierLinearPlan(int M, int L, int K, int N, int w_bits, int act_bits, int bits_outlier,
                                   int n_refresh, int max_outliers, int x_is_fp32, int cc, int num_sms,
                                   const ouroOutlierLinearConfig_t* cfg, const ouroOutlierStats_t* stats,
                                   ouroOutlierLinearChoice_t* choice, ouroKernelCost_t* out, int max_out);

// Same for the selective scan (io_is_fp32, quantized operands as in ouroSelectiveScanParams_t).
OURO_API int ouroSelectiveScanPlan(int B, int L, int D, int S, int io_is_fp32, int delta_bits, int b_bits,
                                   int c_bits, int h_bits, int has_z, int cc, int num_sms, ouroKernelCost_t* out,
                                   int max_out);

#ifdef __cplusplus
}
#endif
