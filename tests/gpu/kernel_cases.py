"""Shared shapes, synthetic cases and exact references for the GPU kernel tests and tools/bench_gemm.py.

Shapes from Vim-T/S/B (d_model 192/384/768, d_inner 384/768/1536, L = 197 tokens, batch 1 and 32).
The linear reference follows `ouro.calib.quantizers.outlier_linear_ref` exactly (codes and masks come
from `outlier_quant_ref` itself); only its int64 einsum, which CUDA lacks, is replaced by a float64
matmul, which is exact for these integer sums (< 2**53)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ouro.calib.quantizers import ThresholdPolicy, outlier_quant_ref, pack_int4, qmax

L_VIM = 197
BATCHES = (1, 32)
VIM_KN = (  # (K, N) of the Vim linear layers
    (192, 768),  # Vim-T in_proj (N = 2 d_inner)
    (384, 192),  # Vim-T out_proj
    (384, 1536),  # Vim-S in_proj
    (768, 384),  # Vim-S out_proj
    (768, 3072),  # Vim-B in_proj
    (1536, 768),  # Vim-B out_proj
)
VIM_X_PROJ_KN = (  # x_proj: d_inner -> dt_rank + 2 d_state (narrow N)
    (384, 44),  # Vim-T
    (768, 56),  # Vim-S
    (1536, 80),  # Vim-B
)


@dataclass
class LinearCase:
    x: Tensor  # (B, L, K) fp16/fp32
    w_codes: Tensor  # int8 (N, K)
    w: Tensor  # what the kernel gets: int8 (N, K) or packed uint8 (N, K/2)
    w_bits: int
    w_scale: Tensor  # (N,)
    bias: Tensor | None
    scale: Tensor  # (L,) static inlier scale
    act_bits: int
    bits_outlier: int
    n_refresh: int
    policy: ThresholdPolicy = ThresholdPolicy.DYNAMIC
    k_sigma: float = 3.0
    theta: Tensor | None = None
    std_correction: int = 0  # passed explicitly to both the kernels and the reference

    def to(self, device) -> "LinearCase":
        f = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LinearCase(f(self.x), f(self.w_codes), f(self.w), self.w_bits, f(self.w_scale), f(self.bias),
                          f(self.scale), self.act_bits, self.bits_outlier, self.n_refresh, self.policy, self.k_sigma,
                          f(self.theta), self.std_correction)

    def act(self):
        from ouro.exporter.cuda_kernels import ActQuant

        return ActQuant(self.act_bits, self.bits_outlier, self.n_refresh, self.scale, self.policy, self.k_sigma,
                        self.theta, std_correction=self.std_correction)


def make_linear_case(B: int, L: int, K: int, N: int, *, w_bits: int = 4, act_bits: int = 4, bits_outlier: int = 8,
                     n_refresh: int = 10, outlier_frac: float = 0.02, seed: int = 0, dtype=torch.float16,
                     bias: bool = True, scale_mult: float = 1.0, std_correction: int = 0,
                     k_sigma: float = 3.0) -> LinearCase:
    """Activations with a clear margin around every outlier threshold, so that the kernels' fp32/fp64
    reductions of mean/std (which may differ from torch's by a few ulp) cannot flip a decision:

    * inliers are uniform in [-1, 1]; a fraction `outlier_frac` of the channels are spike channels;
    * spike channel c spikes (|x| uniform in [8, 12], random sign) at the tokens t with
      t % n_refresh >= offset_c (offset_c random in [1, n_refresh), [0, 1) for n_refresh = 1), so outlier lists
      grow inside windows and (n_refresh >= 2) the first token of each window has no outliers;
    * static scale S_I(t) = scale_mult * 3 sigma_t / qmax. For outlier_frac <= 0.02 the threshold
      mu + 3 sigma then lies between 1.3 and 6.5, far from both populations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, L, K, generator=g) * 2 - 1
    n_out = round(outlier_frac * K)
    if n_out:
        ch = torch.randperm(K, generator=g)[:n_out]
        # offsets >= 1 (for n_refresh >= 2): the first token of every window has no spike, so every case has rows
        # without outliers (the rows the tests compare bit for bit whatever the outlier arithmetic)
        offset = torch.randint(1 if n_refresh > 1 else 0, n_refresh, (n_out,), generator=g)
        active = (torch.arange(L).reshape(L, 1) % n_refresh) >= offset.reshape(1, n_out)  # (L, n_out)
        mag = (torch.rand(B, L, n_out, generator=g) * 4 + 8) * torch.where(torch.rand(B, L, n_out, generator=g) < 0.5, -1.0, 1.0)
        x[..., ch] = torch.where(active.unsqueeze(0), mag, x[..., ch])
    x = x.to(dtype)
    qi = qmax(act_bits)
    scale = (scale_mult * 3.0 * x.float().std(dim=(0, 2)) / qi).contiguous()
    qw = qmax(w_bits)
    w_codes = torch.randint(-qw, qw + 1, (N, K), generator=g, dtype=torch.int8)
    w = pack_int4(w_codes) if w_bits == 4 else w_codes
    w_scale = torch.rand(N, generator=g) * 0.01 + 1e-3
    b = torch.randn(N, generator=g) * 0.1 if bias else None
    return LinearCase(x, w_codes, w, w_bits, w_scale, b, scale, act_bits, bits_outlier, n_refresh,
                      k_sigma=k_sigma, std_correction=std_correction)


@dataclass
class LinearRef:
    y: Tensor  # fp32 (B, L, N)
    y_inlier: Tensor  # fp32 (B, L, N): the inlier term + bias, what the fused GEMM epilogue writes
    acc_in: Tensor  # int64
    acc_out: Tensor  # int64, or fp32 for fp16 outliers
    inlier_codes: Tensor  # int8 (B, L, K)
    outlier_mask: Tensor  # bool (B, L, K)
    outlier_rate: float  # fraction of (token, channel) entries that are outliers


def linear_ref(c: LinearCase) -> LinearRef:
    """outlier_linear_ref, on c's device (float64 matmuls instead of the int64 einsum)."""
    r = outlier_quant_ref(c.x, c.scale, c.act_bits, c.bits_outlier, c.n_refresh, c.policy, k_sigma=c.k_sigma,
                          theta=c.theta, std_correction=c.std_correction)
    B, L, K = c.x.shape
    w64 = c.w_codes.double()
    acc_in = torch.matmul(r.inlier_codes.double(), w64.T).round().to(torch.int64)
    acc_out = torch.matmul(r.outlier_codes.double(), w64.T)
    acc_out = acc_out.float() if c.bits_outlier >= 16 else acc_out.round().to(torch.int64)
    s_in = c.scale.float().reshape(1, L, 1)
    sw = c.w_scale.float().reshape(1, 1, -1)
    y = acc_in.float() * (s_in * sw) + acc_out.float() * (r.outlier_scale.unsqueeze(-1) * sw)
    y_inlier = acc_in.float() * (s_in * sw)
    if c.bias is not None:
        y = y + c.bias.float()
        y_inlier = y_inlier + c.bias.float()
    return LinearRef(y, y_inlier, acc_in, acc_out, r.inlier_codes.to(torch.int8), r.outlier_mask,
                     float(r.outlier_mask.float().mean()))


FUSED_Y_REL = 2.0 ** -10
"""Fused epilogue vs the reference's y. The GEMM epilogue rounds the inlier term (+ bias) to fp16 and the
outlier kernel adds the outlier term and rounds again: two fp16 roundings of at most 2**-11 relative each,
one of |inlier term| and one of |y|, plus fp32 reassociation (~2**-24). FUSED_Y_REL = 2 * 2**-11 bounds
both with a factor-2 margin: |y - ref| <= FUSED_Y_REL * (|y_inlier| + |y_ref|) + 2**-24."""


def assert_fused_close(y: Tensor, ref: LinearRef, rows: Tensor | None = None) -> None:
    """y (B, L, N) from the fused epilogue within FUSED_Y_REL of the reference (on `rows` (B, L) if given)."""
    got, want, inl = y.float(), ref.y, ref.y_inlier
    if rows is not None:
        got, want, inl = got[rows], want[rows], inl[rows]
    err = (got - want).abs()
    bound = FUSED_Y_REL * (inl.abs() + want.abs()) + 2.0 ** -24
    worst = float((err - bound).max()) if err.numel() else 0.0
    assert bool((err <= bound).all()), f"fused y off by up to {float(err.max()):.3g} (bound exceeded by {worst:.3g})"
