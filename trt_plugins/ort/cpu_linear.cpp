// OutlierLinear on the CPU (spec: ouro.calib.quantizers.outlier_linear_ref):
//   acc_in[m, n]  = sum_k q_I[m, k] w[n, k]          exact integers (fp32 GEMM, see kExactF32)
//   acc_out[m, n] = sum_k q_O[m, k] w[n, k]          exact (double, over the window's outlier channels only)
//   y[m, n]       = float(acc_in) * (S_I(t) * s_w[n]) + float(acc_out) * (S_O[m] * s_w[n]) + bias[n]
// evaluated with exactly the reference's fp32 operations, so y is bit-identical to it.
//
// Phases: (1) per (image, window), in parallel: the outlier quantizer writes the inlier codes as the GEMM's
// A matrix and the window's outlier channels as a compact list with per-row codes; (2) one fp32 GEMM
// A[M, K] x w^T[K, N]; (3) per row, in parallel: the sparse outlier products and the epilogue.
#include "cpu_kernels.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace ouro::ort::cpu
{

// kExactF32: an fp32 GEMM over integer codes returns the exact integer accumulator as long as every partial
// sum it forms is an integer of magnitude <= 2^24 (all such integers are fp32 numbers, so no product, sum or
// fused multiply-add of them rounds, whatever the order of the additions). Each product is bounded by
// qmax_A * max|w| and a sum over Kc channels by Kc * qmax_A * max|w|, so one call over at most
//     Kc = floor(2^24 / (qmax_A * max|w|))
// channels is exact: W4A4 (qmax 7, |w| <= 8): Kc = 299593; W8A8 (127, 128): Kc = 1032, below Vim-B's
// d_inner of 1536, so 8x8-bit layers that wide are run as several exact calls summed in int64.
// tests/unit/test_ort_native.py checks it at the largest K with all codes at their extremes.
int exact_k_chunk(int a_bits, int w_max_abs)
{
    const int64_t qa = (int64_t(1) << (a_bits - 1)) - 1;
    const int64_t bound = qa * std::max(w_max_abs, 1);
    return static_cast<int>(std::min<int64_t>((int64_t(1) << 24) / bound, std::numeric_limits<int>::max()));
}

// kExactU8S8: onnxruntime's MatMulInteger (MLAS) on A = q_I + 128 (uint8) and B = w (int8), a_zero_point 128.
// MLAS's AVX2 kernel multiplies uint8 by int8 and adds adjacent pairs into int16 with saturation (vpmaddubsw)
// before widening to int32 (VNNI kernels do not saturate), so it is exact when 2 * max(A) * max|B| <= 32767:
// W4A4 gives 2 * (128 + 7) * 8 = 2160; 4-bit activations with 8-bit weights pass up to max|w| = 121, 8-bit
// activations only with max|w| <= 64. Checked per node from the weights' actual max|w|; otherwise the fp32
// GEMM runs (kExactF32). The int32 sums are exact far beyond any K here (|sum| <= K * 255 * 128).
bool u8_gemm_exact(int a_bits, int w_max_abs)
{
    const int64_t qa = (int64_t(1) << (a_bits - 1)) - 1;
    return 2 * (128 + qa) * std::max(w_max_abs, 1) <= 32767;
}

void prepare_weights(const int8_t* w, int w_bits, int N, int K, LinearWeights& out)
{
    out.K = K;
    out.N = N;
    out.w_bits = w_bits;
    out.wt.assign(static_cast<size_t>(K) * N, 0.0f);
    out.wt8.assign(static_cast<size_t>(K) * N, 0);
    int max_abs = 0;
    for (int n = 0; n < N; ++n)
        for (int k = 0; k < K; ++k)
        {
            int code;
            if (w_bits == 8)
                code = w[static_cast<size_t>(n) * K + k];
            else
            {
                const uint8_t byte = static_cast<uint8_t>(w[static_cast<size_t>(n) * (K / 2) + k / 2]);
                const int nib = (k & 1) ? (byte >> 4) : (byte & 0xF);
                code = nib >= 8 ? nib - 16 : nib;
            }
            out.wt[static_cast<size_t>(k) * N + n] = static_cast<float>(code);
            out.wt8[static_cast<size_t>(k) * N + n] = static_cast<int8_t>(code);
            max_abs = std::max(max_abs, code < 0 ? -code : code);
        }
    out.max_abs = max_abs;
}

namespace
{

// Rows 0 .. R-1 of C = A B, fp32, 16 columns per register tile. A: R rows of stride lda; B row k is
// Bm + (idx ? idx[k] : k) * ldb (an index list gathers the rows of a window's outlier channels); C: stride ldc.
template <int R>
OURO_INLINE void gemm_rows(const float* A, size_t lda, const float* Bm, size_t ldb, const int32_t* idx, int K, float* C,
    size_t ldc, int N)
{
    auto brow = [&](int k) { return Bm + static_cast<size_t>(idx ? idx[k] : k) * ldb; };
    int n = 0;
    for (; n + 16 <= N; n += 16)
    {
        v8f acc[R][2];
        for (int r = 0; r < R; ++r)
            acc[r][0] = acc[r][1] = splat(0.0f);
        for (int k = 0; k < K; ++k)
        {
            const float* b = brow(k) + n;
            const v8f b0 = load8(b);
            const v8f b1 = load8(b + 8);
            for (int r = 0; r < R; ++r)
            {
                const v8f av = splat(A[r * lda + k]);
                acc[r][0] += av * b0;
                acc[r][1] += av * b1;
            }
        }
        for (int r = 0; r < R; ++r)
        {
            store8(C + r * ldc + n, acc[r][0]);
            store8(C + r * ldc + n + 8, acc[r][1]);
        }
    }
    for (; n < N; n += 8)
    {
        const int w = std::min(8, N - n);
        v8f acc[R];
        for (int r = 0; r < R; ++r)
            acc[r] = splat(0.0f);
        for (int k = 0; k < K; ++k)
        {
            const v8f b = load_partial(brow(k) + n, w);
            for (int r = 0; r < R; ++r)
                acc[r] += splat(A[r * lda + k]) * b;
        }
        for (int r = 0; r < R; ++r)
            store_partial(C + r * ldc + n, acc[r], w);
    }
}

// C[rows, N] = A[rows, K] B (see gemm_rows), four rows at a time.
__attribute__((target_clones("avx2", "default"))) void gemm_tile(const float* A, size_t lda, const float* Bm, size_t ldb,
    const int32_t* idx, int K, float* C, size_t ldc, int rows, int N)
{
    int r = 0;
    for (; r + 4 <= rows; r += 4)
        gemm_rows<4>(A + r * lda, lda, Bm, ldb, idx, K, C + r * ldc, ldc, N);
    switch (rows - r)
    {
    case 3: gemm_rows<3>(A + r * lda, lda, Bm, ldb, idx, K, C + r * ldc, ldc, N); break;
    case 2: gemm_rows<2>(A + r * lda, lda, Bm, ldb, idx, K, C + r * ldc, ldc, N); break;
    case 1: gemm_rows<1>(A + r * lda, lda, Bm, ldb, idx, K, C + r * ldc, ldc, N); break;
    default: break;
    }
}

// Outlier products of one window's rows over columns [0, nc): acc_out[i][n] = sum_j codes[i][j] * wt[list[j]][n].
// Integer codes in fp32 while exact (kExactF32's bound over the window's n_listed channels), else in double
// (fp16 outliers, or more than 2^24 / (qmax_O * max|w|) channels), rounded once to fp32 as the reference does.
__attribute__((target_clones("avx2", "default"))) void outlier_products(const float* wt, size_t ldw, const int32_t* list,
    int n_listed, const float* codes, size_t ldc, int rows, int nc, bool exact_f32, float* acc_out, double* acc_d)
{
    if (exact_f32) // a small GEMM: codes [rows, n_listed] x the listed rows of w^T
    {
        gemm_tile(codes, ldc, wt, ldw, list, n_listed, acc_out, static_cast<size_t>(nc), rows, nc);
        return;
    }
    for (int i = 0; i < rows; ++i)
    {
        std::fill_n(acc_d, nc, 0.0);
        for (int j = 0; j < n_listed; ++j)
        {
            const double q = codes[static_cast<size_t>(i) * ldc + j];
            if (q == 0.0)
                continue;
            const float* w = wt + static_cast<size_t>(list[j]) * ldw;
            for (int n = 0; n < nc; ++n)
                acc_d[n] += q * static_cast<double>(w[n]);
        }
        for (int n = 0; n < nc; ++n)
            acc_out[static_cast<size_t>(i) * nc + n] = static_cast<float>(acc_d[n]);
    }
}

// Integer outlier codes of row i over all K channels: clamp(round(x / S_O)) on the list (first[c] <= i), else 0.
__attribute__((target_clones("avx2", "default"))) void outlier_codes_row(const float* x, const int32_t* first, int i,
    int K, float so, float qo, float* out)
{
    const v8i pos = v8i{i, i, i, i, i, i, i, i};
    int c = 0;
    for (; c + 8 <= K; c += 8)
    {
        v8i f;
        std::memcpy(&f, first + c, sizeof f);
        store8(out + c, clamp_sym(round_even(select(f <= pos, load8(x + c), splat(0.0f)) / splat(so)), qo));
    }
    for (; c < K; ++c)
        out[c] = clamp_sym(round_even((first[c] <= i ? x[c] : 0.0f) / so), qo);
}

// The reference's fp32 expression for one row: acc_in * (S_I * s_w) + acc_out * (S_O * s_w) + bias.
template <typename Acc>
OURO_INLINE void epilogue(const Acc* acc_in, const float* acc_out, int nc, float s_in, float s_out, const float* w_scale,
    const float* bias, float* y)
{
    for (int n = 0; n < nc; ++n)
    {
        // float(int32) rounds half to even, as int64 -> float in the reference (exact below 2^24)
        float v = static_cast<float>(acc_in[n]) * (s_in * w_scale[n]) + acc_out[n] * (s_out * w_scale[n]);
        if (bias)
            v = v + bias[n];
        y[n] = v;
    }
}

__attribute__((target_clones("avx2", "default"))) void epilogue_row(const float* acc_f, const int32_t* acc_i,
    const float* acc_out, int nc, float s_in, float s_out, const float* w_scale, const float* bias, float* y)
{
    if (acc_i)
        epilogue(acc_i, acc_out, nc, s_in, s_out, w_scale, bias, y);
    else
        epilogue(acc_f, acc_out, nc, s_in, s_out, w_scale, bias, y);
}

// A thread's scratch buffers, grown on demand and reused across calls (never zero-filled: always written first).
template <typename T>
T* grab(std::vector<T>& v, size_t n)
{
    if (v.size() < n)
        v.resize(n);
    return v.data();
}

// Buffers kept for the next call up to this size; larger ones (big batches) are given back after the call.
constexpr size_t kKeepBytes = size_t(32) << 20;

template <typename T>
void trim(std::vector<T>& v)
{
    if (v.capacity() * sizeof(T) > kKeepBytes)
        std::vector<T>().swap(v);
}

} // namespace

void gemm_f32(const float* A, const float* Bm, float* C, int M, int K, int N, const ParallelFor& par)
{
    constexpr int kRows = 4;
    par(static_cast<size_t>((M + kRows - 1) / kRows), [&](size_t blk) {
        const int r0 = static_cast<int>(blk) * kRows;
        gemm_tile(A + static_cast<size_t>(r0) * K, static_cast<size_t>(K), Bm, static_cast<size_t>(N), nullptr, K,
            C + static_cast<size_t>(r0) * N, static_cast<size_t>(N), std::min(kRows, M - r0), N);
    });
}

void outlier_linear(const LinearArgs& a, const Gemm& gemm, const GemmU8& gemm_u8, const ParallelFor& par)
{
    const LinearWeights& w = *a.w;
    const int K = w.K, N = w.N, L = a.L;
    const int M = a.B * L;
    const ActQuant& q = a.act;
    const int nr = q.n_refresh;
    const int W = (L + nr - 1) / nr;
    const int BW = a.B * W;
    const int cap = a.max_outliers > 0 ? a.max_outliers : K;
    const bool fp16_out = q.bits_outlier >= kFp16Outliers;
    const float qo = fp16_out ? 0.0f : static_cast<float>((1 << (q.bits_outlier - 1)) - 1);
    const int out_chunk = fp16_out ? 0 : exact_k_chunk(q.bits_outlier, w.max_abs); // outlier channels summed exactly in fp32

    thread_local struct Buffers
    {
        std::vector<float> x, A, codes, acc, s_out, part, Ac;
        std::vector<int32_t> list, count, acc32;
        std::vector<int64_t> acc64;
        std::vector<uint8_t> A8;
        void trim_all()
        {
            for (auto* v : {&x, &A, &codes, &acc, &s_out, &part, &Ac})
                trim(*v);
            trim(list);
            trim(count);
            trim(acc32);
            trim(acc64);
            trim(A8);
        }
    } buf;
    const float* x = static_cast<const float*>(a.x);
    if (a.fp16)
    {
        float* xf = grab(buf.x, static_cast<size_t>(M) * K);
        widen_fp16(static_cast<const uint16_t*>(a.x), xf, static_cast<size_t>(M) * K);
        x = xf;
    }
    const bool use_u8 = gemm_u8 && u8_gemm_exact(q.bits, w.max_abs);
    float* A = use_u8 ? nullptr : grab(buf.A, static_cast<size_t>(M) * K);
    uint8_t* A8 = use_u8 ? grab(buf.A8, static_cast<size_t>(M) * K) : nullptr;
    float* codes = grab(buf.codes, static_cast<size_t>(M) * K);
    float* s_out = grab(buf.s_out, static_cast<size_t>(M));
    int32_t* list = grab(buf.list, static_cast<size_t>(BW) * K);
    int32_t* count = grab(buf.count, static_cast<size_t>(BW));

    // (1) quantizer, per window: inlier codes into A, the window's outlier channels (ascending) and their codes
    parallel(par, static_cast<size_t>(BW), static_cast<size_t>(M) * K, [&](size_t bw) {
        const int b = static_cast<int>(bw) / W;
        const int t0 = static_cast<int>(bw % W) * nr;
        const int nt = std::min(nr, L - t0);
        const size_t row0 = static_cast<size_t>(b) * L + t0;
        thread_local std::vector<int32_t> first;
        first.resize(static_cast<size_t>(K));
        WindowOut out;
        out.inlier_codes = A ? A + row0 * K : nullptr;
        out.inlier_u8 = A8 ? A8 + row0 * K : nullptr;
        out.ld = static_cast<size_t>(K);
        out.outlier_scale = s_out + row0;
        quantize_window(x + row0 * K, nt, K, t0, q, first.data(), out);
        int32_t* lst = list + bw * K;
        int cnt = 0;
        for (int c = 0; c < K; ++c)
            if (first[c] != kNever)
                lst[cnt++] = c;
        count[bw] = cnt;
        thread_local std::vector<float> dense;
        float* dn = grab(dense, static_cast<size_t>(K));
        for (int i = 0; i < nt && cnt > 0; ++i)
        {
            const float* xr = x + (row0 + i) * K;
            float* cr = codes + (row0 + i) * K;
            if (fp16_out)
                for (int j = 0; j < cnt; ++j)
                    cr[j] = first[lst[j]] <= i ? half_to_float(float_to_half(xr[lst[j]])) : 0.0f;
            else
            {
                outlier_codes_row(xr, first.data(), i, K, s_out[row0 + i], qo, dn); // all channels, vectorized
                for (int j = 0; j < cnt; ++j)
                    cr[j] = dn[lst[j]];
            }
        }
    });

    // (2) inlier GEMM, in exact chunks of K
    const size_t MN = static_cast<size_t>(M) * N;
    float* acc = use_u8 ? nullptr : grab(buf.acc, MN);
    int32_t* acc32 = use_u8 ? grab(buf.acc32, MN) : nullptr;
    const int kc = exact_k_chunk(q.bits, w.max_abs);
    if (use_u8)
        gemm_u8(A8, w.wt8.data(), acc32, M, K, N);
    else if (K <= kc)
        gemm(A, w.wt.data(), acc, M, K, N);
    else
    {
        int64_t* acc64 = grab(buf.acc64, MN);
        std::fill_n(acc64, MN, int64_t(0));
        float* part = grab(buf.part, MN);
        for (int k0 = 0; k0 < K; k0 += kc)
        {
            const int kn = std::min(kc, K - k0);
            float* Ac = grab(buf.Ac, static_cast<size_t>(M) * kn);
            for (int m = 0; m < M; ++m)
                std::copy_n(A + static_cast<size_t>(m) * K + k0, kn, Ac + static_cast<size_t>(m) * kn);
            gemm(Ac, w.wt.data() + static_cast<size_t>(k0) * N, part, M, kn, N);
            for (size_t i = 0; i < MN; ++i)
                acc64[i] += static_cast<int64_t>(part[i]);
        }
        for (size_t i = 0; i < MN; ++i)
            acc[i] = static_cast<float>(acc64[i]); // round half to even, as int64 -> float in the reference
    }

    // (3) per (window, block of columns): outlier products and the epilogue
    constexpr int kCols = 256;
    const int nblk = (N + kCols - 1) / kCols;
    parallel(par, static_cast<size_t>(BW) * nblk, MN, [&](size_t item) {
        const size_t bw = item / nblk;
        const int n0 = static_cast<int>(item % nblk) * kCols;
        const int nc = std::min(kCols, N - n0);
        const int b = static_cast<int>(bw) / W;
        const int t0 = static_cast<int>(bw % W) * nr;
        const int nt = std::min(nr, L - t0);
        const size_t row0 = static_cast<size_t>(b) * L + t0;
        thread_local std::vector<float> acc_out, yrow;
        thread_local std::vector<double> acc_d;
        float* ao = grab(acc_out, static_cast<size_t>(nt) * nc);
        float* yr = grab(yrow, static_cast<size_t>(nc));
        outlier_products(w.wt.data() + n0, static_cast<size_t>(N), list + bw * K, count[bw], codes + row0 * K,
            static_cast<size_t>(K), nt, nc, !fp16_out && count[bw] <= out_chunk, ao, grab(acc_d, static_cast<size_t>(nc)));
        for (int i = 0; i < nt; ++i)
        {
            const size_t m = row0 + i;
            float* yf = a.fp16 ? yr : static_cast<float*>(a.y) + m * N + n0;
            if (count[bw] > cap)
                std::fill_n(yf, nc, std::numeric_limits<float>::quiet_NaN()); // never a silently wrong row
            else
                epilogue_row(acc ? acc + m * N + n0 : nullptr, acc32 ? acc32 + m * N + n0 : nullptr,
                    ao + static_cast<size_t>(i) * nc, nc, q.scale[t0 + i], s_out[m],
                    a.w_scale + n0, a.bias ? a.bias + n0 : nullptr, yf);
            if (a.fp16)
                narrow_fp16(yf, static_cast<uint16_t*>(a.y) + m * N + n0, static_cast<size_t>(nc));
        }
    });
    buf.trim_all();
}

} // namespace ouro::ort::cpu
