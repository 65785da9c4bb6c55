// CPU kernels of the onnxruntime custom ops (independent of onnxruntime: raw pointers in, raw pointers out).
//
// Shape notation (as ouro_kernels.h): B batch, L tokens, M = B*L rows (row m is token t = m % L of image
// b = m / L), K input channels, N output channels, C channels of a quantized operand, D = d_inner,
// S = d_state. Windows: W = ceil(L / n_refresh) per image; window (b, w) holds tokens w*n_refresh ..
// min(L, (w+1)*n_refresh) - 1 of image b.
//
// Numerics are those of the PyTorch references (the specification):
//   outlier quantizer   ouro.calib.quantizers.outlier_quant_ref      integer codes and masks bit-exact
//   OutlierLinear       ouro.calib.quantizers.outlier_linear_ref     accumulators bit-exact, y = its fp32 expression
//   SelectiveScan       ouro.calib.scan.selective_scan_ref           fp32, within a named tolerance
// fp16 activations are widened to fp32 first and the result is rounded to fp16 once (what the onnxruntime
// reference ops do with their Cast / CastLike around an fp32 kernel).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace ouro::ort::cpu
{

// Calls fn(i) once for every i in [0, n), possibly concurrently. The ops pass onnxruntime's intra-op
// thread pool (KernelContext_ParallelFor); tests pass a serial loop.
using ParallelFor = std::function<void(size_t n, const std::function<void(size_t)>& fn)>;

void serial_for(size_t n, const std::function<void(size_t)>& fn);

// Work of fewer element operations than this runs on the calling thread: a thread-pool dispatch costs more.
constexpr size_t kSerialWork = size_t(1) << 15;
inline void parallel(const ParallelFor& par, size_t n, size_t work, const std::function<void(size_t)>& fn)
{
    if (work < kSerialWork)
        serial_for(n, fn);
    else
        par(n, fn);
}

constexpr int kFp16Outliers = 16; // bits_outlier >= 16: outliers kept in fp16
constexpr int32_t kNever = INT32_MAX;

// One activation quantizer (OuroMamba dynamic outliers, seed Algorithm 2); mirrors ouroActQuant_t.
struct ActQuant
{
    int bits = 0;              // inlier bits, 2..8
    int bits_outlier = 16;     // outlier bits 2..8, or 16 = fp16 outliers
    int n_refresh = 1;         // >= 1
    int policy = 0;            // 0 dynamic: theta = mean + k_sigma * std over the channels; 1 calibrated: theta[t]
    float k_sigma = 3.0f;
    int std_correction = 0;    // std = sqrt(sum (a - mean)^2 / max(C - std_correction, 1))
    const float* scale = nullptr; // [L] static inlier scale S_I(t) > 0
    const float* theta = nullptr; // [L] (policy 1)
};

// Dynamic threshold of one token: mean(a) + k * std(a) over C channels, rounded as the reference rounds it.
// The mean is PyTorch's own fp32 sum (its CPU reduction order for 8-lane vectors, the AVX2 kernel) divided
// by C; the std is accumulated in double and rounded once (PyTorch's CPU std accumulates in double too).
float dynamic_threshold(const float* a, int C, float k_sigma, int std_correction);
// PyTorch's fp32 CPU sum of a contiguous row (cascade order of its AVX2 reduction kernel).
float torch_order_sum(const float* a, int64_t n);

// Outputs of one window of the quantizer (any pointer may be null). Rows i = 0 .. nt-1 of the window.
struct WindowOut
{
    float* inlier_codes = nullptr; // [nt, ld] integer codes of the inliers (0 at outlier channels)
    size_t ld = 0;
    uint8_t* inlier_u8 = nullptr;  // [nt, ld] the same codes + 128, as uint8 (the integer GEMM's A)
    float* x_hat = nullptr;        // [nt, C] fake-quantized values I_hat + O_hat
    float* outlier_scale = nullptr; // [nt] S_O (1 for fp16 outliers or rows without outliers)
    uint8_t* mask = nullptr;       // [nt, C] the outlier list in force at each token
    float* outlier_codes = nullptr; // [nt, C] outlier codes (fp16-rounded values for fp16 outliers), 0 at inliers
};

// Quantizes one window: x = rows [nt, C] of tokens t0 .. t0+nt-1. first[C] (out) = window position at
// which each channel joined the outlier list, kNever if it never did.
void quantize_window(const float* x, int nt, int C, int t0, const ActQuant& q, int32_t* first, const WindowOut& out);

// Fake quantization of x [B, L, C] into y (fp32), the operand quantizer of the selective scan.
void outlier_fake_quant(const float* x, float* y, int B, int L, int C, const ActQuant& q, const ParallelFor& par);

// ---------------------------------------------------------------------------------------- OutlierLinear
// Weight codes prepared once per node: wt [K, N] = w^T as exact fp32 integers.
struct LinearWeights
{
    int K = 0, N = 0, w_bits = 0;
    int max_abs = 0; // largest |code| (bounds the partial sums of the GEMM)
    std::vector<float> wt;     // [K, N] codes as fp32
    std::vector<int8_t> wt8;   // [K, N] codes as int8 (the integer GEMM's B)
};
// w: w_bits 8: int8 [N, K]; w_bits 4: [N, K/2] packed two per byte along K, low nibble = even k.
void prepare_weights(const int8_t* w, int w_bits, int N, int K, LinearWeights& out);

// C[M, N] = A[M, K] * B[K, N], all row-major and contiguous, fp32. The ops use onnxruntime's MatMul (MLAS);
// gemm_f32 is the library's own (fallback, tests). Both are exact here: see kExactF32 in cpu_linear.cpp.
using Gemm = std::function<void(const float* A, const float* Bm, float* C, int M, int K, int N)>;
void gemm_f32(const float* A, const float* Bm, float* C, int M, int K, int N, const ParallelFor& par);

// C[M, N] (int32) = (A[M, K] - 128) B[K, N], A uint8, B int8, all row-major and contiguous: onnxruntime's
// MatMulInteger (MLAS) with a_zero_point 128. Used when u8_gemm_exact() holds (see cpu_linear.cpp, kExactU8S8).
using GemmU8 = std::function<void(const uint8_t* A, const int8_t* Bm, int32_t* C, int M, int K, int N)>;
bool u8_gemm_exact(int a_bits, int w_max_abs);

// Largest K of one fp32 GEMM call such that every partial sum of code products is an exact fp32 integer.
int exact_k_chunk(int a_bits, int w_max_abs);

struct LinearArgs
{
    const void* x = nullptr; // [M, K] fp32 or fp16
    bool fp16 = false;       // x and y dtype
    int B = 0, L = 0;
    const LinearWeights* w = nullptr;
    const float* w_scale = nullptr; // [N]
    const float* bias = nullptr;    // [N] or null
    ActQuant act;
    int max_outliers = 0;    // outlier channels per (image, window); 0 = K. Rows of a window that exceeds it are NaN.
    void* y = nullptr;       // [M, N]
};
// gemm_u8 may be empty (then every inlier GEMM is fp32).
void outlier_linear(const LinearArgs& a, const Gemm& gemm, const GemmU8& gemm_u8, const ParallelFor& par);

// ---------------------------------------------------------------------------------------- SelectiveScan
struct ScanArgs
{
    int B = 0, L = 0, D = 0, S = 0;
    bool fp16 = false;        // dtype of u, delta, Bm, Cm, z and out
    const void* u = nullptr;  // [B, L, D]
    const void* delta = nullptr; // [B, L, D] pre-softplus, bias included
    const float* A = nullptr; // [D, S]
    const void* Bm = nullptr; // [B, L, S]
    const void* Cm = nullptr; // [B, L, S]
    const float* Dskip = nullptr; // [D] or null
    const void* z = nullptr;  // [B, L, D] or null
    void* out = nullptr;      // [B, L, D]
    int reverse = 0, delta_softplus = 1;
    ActQuant delta_q, b_q, c_q; // bits 0: operand not quantized
    int h_bits = 0, h_group = 1; // TGQ of the hidden state (h_bits 0: off)
    const float* h_scale = nullptr; // [ceil(L / h_group)]
    const float* h_zero = nullptr;
};
void selective_scan(const ScanArgs& a, const ParallelFor& par);

// fp16 <-> fp32 conversion of n elements (exact widening; narrowing rounds half to even).
void widen_fp16(const uint16_t* src, float* dst, size_t n);
void narrow_fp16(const float* src, uint16_t* dst, size_t n);

} // namespace ouro::ort::cpu
