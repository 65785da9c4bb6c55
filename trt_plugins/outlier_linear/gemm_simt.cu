// SIMT fallback GEMM on CUDA cores: any K, N and weight layout; obviously-correct 16x16 tiling.
#include "gemm.cuh"

namespace ouro
{

constexpr int kSimtTile = 16;

__global__ void gemm_simt_kernel(const int8_t* __restrict__ A, const int8_t* __restrict__ w, int w_bits,
                                 int32_t* __restrict__ D, int M, int N, int K)
{
    __shared__ int sA[kSimtTile][kSimtTile + 1];
    __shared__ int sB[kSimtTile][kSimtTile + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * kSimtTile + ty;
    const int col = blockIdx.x * kSimtTile + tx;
    const int nb = blockIdx.x * kSimtTile + ty; // weight row loaded by this thread
    int acc = 0;
    for (int k0 = 0; k0 < K; k0 += kSimtTile)
    {
        const int k = k0 + tx;
        sA[ty][tx] = (row < M && k < K) ? A[static_cast<size_t>(row) * K + k] : 0;
        sB[ty][tx] = (nb < N && k < K) ? w_code(w, w_bits, K, nb, k) : 0;
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kSimtTile; ++kk)
            acc += sA[ty][kk] * sB[tx][kk];
        __syncthreads();
    }
    if (row < M && col < N)
        D[static_cast<size_t>(row) * N + col] = acc;
}

ouroStatus_t gemm_simt(int M, int N, int K, const int8_t* A, const int8_t* w, int w_bits, int32_t* D, cudaStream_t s)
{
    const dim3 block(kSimtTile, kSimtTile);
    const dim3 grid(ceil_div(N, kSimtTile), ceil_div(M, kSimtTile));
    if (grid.y > 65535u)
        return OURO_ERR_UNSUPPORTED_SHAPE;
    launch_kernel(gemm_simt_kernel, grid, block, 0, s, A, w, w_bits, D, M, N, K);
    return launch_status();
}

} // namespace ouro
