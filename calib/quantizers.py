"""Fake-quant reference numerics (`_ref`): the specification every kernel must reproduce.

Notation used throughout (defined once):
    B  batch, L  tokens (time steps), C  channels (K for a linear layer's input)
    N  output channels of a linear layer
    b  bit width; symmetric grid is restricted: q in [-qmax, qmax], qmax = 2**(b-1) - 1

Conventions shared by PyTorch, the onnxruntime reference ops and the CUDA kernels:
    * rounding is round-half-to-even (`torch.round`, CUDA `rintf`);
    * division is IEEE fp32 division `x / s` (never a multiply by a reciprocal);
    * all arithmetic is fp32; fp16 inputs are widened to fp32 first;
    * bit widths are the kernels' C ABI integers: `bits >= 16` (FP_PASSTHROUGH_BITS) means "keep in
      FP16": the value is rounded to fp16 and back, nothing else. Above these functions the format
      objects of ouro.recipes.formats say FP16 explicitly (`abi_bits` converts).

OuroMamba dynamic outlier quantizer (seed Algorithm 2), as implemented here:
    * tokens are grouped in windows of `n_refresh` consecutive positions (t // n_refresh), in
      the tensor's own token order; the last window may be shorter;
    * the outlier list is a channel mask kept PER BATCH ELEMENT and per window (as the official
      code does); a kernel processes one (b, window) independently;
    * inside a window tokens are processed in increasing t. At token t, with the current mask:
        I      = x[b, t] with outlier channels zeroed
        trig   = max_c |I| / qmax  >  S_I(t)                        (per-token trigger)
        theta  = mean_c |I| + k * std_c |I|   (policy "dynamic"; statistics over all C channels
                                               of I; std with correction c in {0, 1}:
                                               sqrt(sum (a - mean)^2 / max(C - c, 1)), c = 1 is
                                               Bessel's, as torch.std: the recipes' default; the
                                               functions here default to 0, as the kernels' ABI and
                                               an ONNX node without `std_correction` do)
               = theta(t)                     (policy "calibrated"; a static per-token value)
        mask  |= trig & (|I| > theta)
      then the token is quantized with the updated mask:
        inliers : q_I = clamp(round(I / S_I(t)), -qmax_I, qmax_I);   I_hat = q_I * S_I(t)
        outliers: S_O = max_{c in mask} |x| / qmax_O (1 if that max is 0)
                  q_O = clamp(round(O / S_O), -qmax_O, qmax_O);     O_hat = q_O * S_O
                  (bits_outlier >= 16: O_hat = fp16(O))
        x_hat = I_hat + O_hat
    The per-token trigger replaces the official code's global `.any()` over the batch, so one
    image never changes another image's quantization (and a kernel needs no grid-wide sync).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ouro.recipes.formats import DEFAULT_K_SIGMA, DELTA_K_SIGMA, FP16_ABI_BITS, ThresholdPolicy

__all__ = [
    "ThresholdPolicy",
    "qmax",
    "round_ste",
    "fp16_roundtrip",
    "quant_sym_ref",
    "fake_quant_sym",
    "quant_asym_ref",
    "fake_quant_asym",
    "quantize_weight_ref",
    "pack_int4",
    "unpack_int4",
    "OutlierQuantResult",
    "channel_std",
    "outlier_quant_ref",
    "outlier_fake_quant",
    "outlier_linear_ref",
    "DEFAULT_K_SIGMA",
    "DELTA_K_SIGMA",
]

FP_PASSTHROUGH_BITS = FP16_ABI_BITS
"""The kernels' C ABI spelling of fp16 outliers (`bits_outlier` 16); formats say `FP16` (ouro.recipes.formats)."""


def qmax(bits: int) -> int:
    """Largest code of the restricted symmetric grid, 2**(bits-1)-1 (7 at 4 bits, 127 at 8)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    return 2 ** (bits - 1) - 1


def round_ste(x: Tensor) -> Tensor:
    """round-half-to-even forward, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fp16_roundtrip(x: Tensor) -> Tensor:
    """x rounded to fp16 and back (identity gradient): the FP16 format."""
    return x + (x.half().float() - x).detach()


# --------------------------------------------------------------------------- uniform quantizers
def quant_sym_ref(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Integer codes of the restricted symmetric quantizer: clamp(round(x/s), -qmax, qmax).

    `scale` broadcasts against `x` (per tensor: scalar; per output channel: (N, 1);
    per time step: (1, L, 1)). Returns float codes (exact small integers)."""
    q = qmax(bits)
    return torch.clamp(torch.round(x.float() / scale.float()), -q, q)


def fake_quant_sym(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Symmetric fake quantization with STE on round: s * clamp(round(x/s), -qmax, qmax).

    Gradients reach `scale` (learned step size) and pass straight through to `x` inside the range."""
    if bits >= FP_PASSTHROUGH_BITS:
        return fp16_roundtrip(x.float())
    q = qmax(bits)
    return torch.clamp(round_ste(x.float() / scale), -q, q) * scale


def quant_asym_ref(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Unsigned asymmetric codes: clamp(round(x/s) + z, 0, 2**b - 1). `zero_point` holds integers."""
    return torch.clamp(torch.round(x.float() / scale.float()) + zero_point, 0, 2**bits - 1)


def fake_quant_asym(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Asymmetric fake quantization: s * (clamp(round(x/s) + z, 0, 2**b-1) - z), STE on round.

    `zero_point` may be a learned float; it is rounded (STE) before use so codes stay integers."""
    if bits >= FP_PASSTHROUGH_BITS:
        return fp16_roundtrip(x.float())
    z = round_ste(zero_point)
    return (torch.clamp(round_ste(x.float() / scale) + z, 0, 2**bits - 1) - z) * scale


def quantize_weight_ref(weight: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Per-output-channel weight codes, int8 tensor of shape (N, K); `scale` has shape (N, 1) or (N,)."""
    return quant_sym_ref(weight, scale.reshape(-1, 1), bits).to(torch.int8)


# --------------------------------------------------------------------------- int4 packing
def pack_int4(codes: Tensor) -> Tensor:
    """Pack int4 codes (int8 tensor [..., K], values in [-8, 7], K even) two per byte along K.

    Byte j holds element 2j in its low nibble and element 2j+1 in its high nibble, two's complement.
    Result: uint8 tensor [..., K/2]."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.int16)
    if int(c.min()) < -8 or int(c.max()) > 7:
        raise ValueError("int4 codes must lie in [-8, 7]")
    lo = c[..., 0::2] & 0xF
    hi = c[..., 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: uint8 [..., K/2] -> int8 codes [..., K]."""
    p = packed.to(torch.int16)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = torch.where(hi > 7, hi - 16, hi)
    return torch.stack([lo, hi], dim=-1).flatten(-2).to(torch.int8)


# --------------------------------------------------------------------------- OuroMamba outliers
@dataclass
class OutlierQuantResult:
    """Everything a kernel produces, for bit-exact comparison.

    x_hat:          (B, L, C) fp32 fake-quantized activation (I_hat + O_hat)
    inlier_codes:   (B, L, C) fp32 integer codes of the inliers (0 at outlier positions)
    outlier_mask:   (B, L, C) bool, the outlier list in force when token t was quantized
    outlier_codes:  (B, L, C) fp32 integer codes of the outliers (0 at inlier positions);
                    for bits_outlier >= 16 these are the fp16-rounded values themselves
    outlier_scale:  (B, L) fp32 dynamic per-token outlier scale S_O (1 for fp16 outliers)
    """

    x_hat: Tensor
    inlier_codes: Tensor
    outlier_mask: Tensor
    outlier_codes: Tensor
    outlier_scale: Tensor


def _as_token_vector(v: Tensor | float, L: int, name: str) -> Tensor:
    v = v.float() if isinstance(v, Tensor) else torch.tensor(v, dtype=torch.float32, device="cpu")  # keeps a tensor's device
    if v.numel() == 1:
        return v.reshape(1).expand(L)
    if v.numel() != L:
        raise ValueError(f"{name} must have one value per token (L={L}) or be a scalar; got shape {tuple(v.shape)}")
    return v.reshape(L)


def channel_std(a: Tensor, correction: int, keepdim: bool = False) -> Tensor:
    """std over the last axis with correction c: sqrt(sum (a - mean)^2 / max(C - c, 1)) (torch.std,
    with the divisor kept >= 1 so a single channel gives 0, not NaN)."""
    if correction not in (0, 1):
        raise ValueError(f"std_correction must be 0 or 1, got {correction}")
    return a.std(-1, correction=min(correction, a.shape[-1] - 1), keepdim=keepdim)


def outlier_quant_ref(
    x: Tensor,
    static_scale: Tensor,
    bits_inlier: int,
    bits_outlier: int,
    n_refresh: int,
    threshold_policy: ThresholdPolicy | str = ThresholdPolicy.DYNAMIC,
    *,
    k_sigma: float = DEFAULT_K_SIGMA,
    theta: Tensor | None = None,
    std_correction: int = 0,
) -> OutlierQuantResult:
    """The OuroMamba dynamic outlier quantizer (module docstring), returning codes and masks.

    x: (B, L, C); static_scale S_I: (1, L, 1), (L,) or scalar; theta (policy calibrated): same.
    std_correction: c of the dynamic threshold's std (module docstring).
    All windows are processed in parallel; the loop runs over the n_refresh positions of a window.
    Gradients flow to `static_scale` and `x` through STE rounding."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, C), got shape {tuple(x.shape)}")
    if n_refresh < 1:
        raise ValueError(f"n_refresh must be >= 1, got {n_refresh}")
    if std_correction not in (0, 1):
        raise ValueError(f"std_correction must be 0 or 1, got {std_correction}")
    policy = ThresholdPolicy(threshold_policy)
    B, L, C = x.shape
    qi = qmax(bits_inlier)
    s = static_scale.float().reshape(-1)
    s = s.expand(L) if s.numel() == 1 else s
    if s.numel() != L:
        raise ValueError(f"static_scale must have shape (1, L, 1) with L={L}; got {tuple(static_scale.shape)}")
    if policy is ThresholdPolicy.CALIBRATED:
        if theta is None:
            raise ValueError("threshold_policy 'calibrated' needs theta (one value per token)")
        th_static = _as_token_vector(theta, L, "theta").to(x.device)

    n = n_refresh
    W = -(-L // n)
    pad = W * n - L
    xf = x.float()
    # (B, W, n, C) windows; padded tokens are zeros with scale 1 and never trigger.
    xw = torch.nn.functional.pad(xf, (0, 0, 0, pad)).reshape(B, W, n, C)
    sw = torch.nn.functional.pad(s, (0, pad), value=1.0).reshape(1, W, n, 1)
    if policy is ThresholdPolicy.CALIBRATED:
        thw = torch.nn.functional.pad(th_static, (0, pad), value=float("inf")).reshape(1, W, n)

    mask = torch.zeros(B, W, C, dtype=torch.bool, device=x.device)
    x_hat, in_codes, masks, out_codes, out_scales = [], [], [], [], []
    for i in range(n):
        xi = xw[:, :, i]  # (B, W, C)
        si = sw[:, :, i]  # (1, W, 1)
        a = torch.where(mask, torch.zeros_like(xi), xi).abs().detach()
        trig = (a.amax(-1) / qi) > si[..., 0]  # (B, W)
        if policy is ThresholdPolicy.DYNAMIC:
            th = a.mean(-1) + k_sigma * channel_std(a, std_correction)
        else:
            th = thw[:, :, i].expand(B, W)
        mask = mask | (trig.unsqueeze(-1) & (a > th.unsqueeze(-1)))
        inl = torch.where(mask, torch.zeros_like(xi), xi)
        q_in = torch.clamp(round_ste(inl / si), -qi, qi)
        outl = torch.where(mask, xi, torch.zeros_like(xi))
        if bits_outlier >= FP_PASSTHROUGH_BITS:
            q_out = fp16_roundtrip(outl)
            s_out = torch.ones(B, W, 1, device=x.device)
            o_hat = q_out
        else:
            qo = qmax(bits_outlier)
            amax = outl.detach().abs().amax(-1, keepdim=True)
            s_out = torch.where(amax > 0, amax / qo, torch.ones_like(amax))
            q_out = torch.clamp(round_ste(outl / s_out), -qo, qo)
            o_hat = q_out * s_out
        x_hat.append(q_in * si + o_hat)
        in_codes.append(q_in)
        masks.append(mask)
        out_codes.append(q_out)
        out_scales.append(s_out[..., 0])

    def _unwindow(parts: list[Tensor]) -> Tensor:
        t = torch.stack(parts, dim=2)  # (B, W, n, ...)
        return t.reshape(B, W * n, *t.shape[3:])[:, :L]

    return OutlierQuantResult(
        x_hat=_unwindow(x_hat),
        inlier_codes=_unwindow(in_codes),
        outlier_mask=_unwindow(masks),
        outlier_codes=_unwindow(out_codes),
        outlier_scale=_unwindow(out_scales),
    )


def _outlier_masks(xf: Tensor, s: Tensor, qi: int, n: int, policy: ThresholdPolicy, k_sigma: float,
                   th_static: Tensor | None, std_correction: int = 0) -> Tensor:
    """The outlier list in force at every token (B, L, C) bool: `outlier_quant_ref`'s mask recurrence,
    the same operations on the same windows (so the same bits), without the quantization."""
    B, L, C = xf.shape
    W = -(-L // n)
    pad = W * n - L
    xw = torch.nn.functional.pad(xf, (0, 0, 0, pad)).reshape(B, W, n, C)
    sw = torch.nn.functional.pad(s, (0, pad), value=1.0).reshape(1, W, n, 1)
    if policy is ThresholdPolicy.CALIBRATED:
        thw = torch.nn.functional.pad(th_static, (0, pad), value=float("inf")).reshape(1, W, n)
    mask = torch.zeros(B, W, C, dtype=torch.bool, device=xf.device)
    masks = []
    for i in range(n):
        xi = xw[:, :, i]
        a = torch.where(mask, torch.zeros_like(xi), xi).abs()
        trig = (a.amax(-1) / qi) > sw[:, :, i, 0]
        th = a.mean(-1) + k_sigma * channel_std(a, std_correction) if policy is ThresholdPolicy.DYNAMIC else thw[:, :, i].expand(B, W)
        mask = mask | (trig.unsqueeze(-1) & (a > th.unsqueeze(-1)))
        masks.append(mask)
    return torch.stack(masks, dim=2).reshape(B, W * n, C)[:, :L]


def outlier_fake_quant(
    x: Tensor,
    static_scale: Tensor,
    bits_inlier: int,
    bits_outlier: int,
    n_refresh: int,
    threshold_policy: ThresholdPolicy | str = ThresholdPolicy.DYNAMIC,
    *,
    k_sigma: float = DEFAULT_K_SIGMA,
    theta: Tensor | None = None,
    std_correction: int = 0,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """OuroMamba fake quantization of x (B, L, C) with static per-token scale (1, L, 1): the x_hat of
    `outlier_quant_ref` (bit for bit), fast. Only the outlier-mask recurrence runs token by token
    (without gradient: the mask is a detached function of x); x_hat is then one vectorised pass over
    all tokens, and nothing the caller does not read (codes, per-window stacks) is built.
    std_correction: c of the dynamic threshold's std (module docstring).
    return_mask: also return the outlier mask (B, L, C) (for outlier-rate statistics)."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, C), got shape {tuple(x.shape)}")
    if n_refresh < 1:
        raise ValueError(f"n_refresh must be >= 1, got {n_refresh}")
    if std_correction not in (0, 1):
        raise ValueError(f"std_correction must be 0 or 1, got {std_correction}")
    policy = ThresholdPolicy(threshold_policy)
    B, L, C = x.shape
    qi = qmax(bits_inlier)
    s = static_scale.float().reshape(-1)
    s = s.expand(L) if s.numel() == 1 else s
    if s.numel() != L:
        raise ValueError(f"static_scale must have shape (1, L, 1) with L={L}; got {tuple(static_scale.shape)}")
    th_static = None
    if policy is ThresholdPolicy.CALIBRATED:
        if theta is None:
            raise ValueError("threshold_policy 'calibrated' needs theta (one value per token)")
        th_static = _as_token_vector(theta, L, "theta").to(x.device)
    xf = x.float()
    with torch.no_grad():
        mask = _outlier_masks(xf.detach(), s.detach(), qi, n_refresh, policy, k_sigma, th_static, std_correction)
    si = s.view(1, L, 1)
    inl = torch.where(mask, torch.zeros_like(xf), xf)
    q_in = torch.clamp(round_ste(inl / si), -qi, qi)
    outl = torch.where(mask, xf, torch.zeros_like(xf))
    if bits_outlier >= FP_PASSTHROUGH_BITS:
        o_hat = fp16_roundtrip(outl)
    else:
        qo = qmax(bits_outlier)
        amax = outl.detach().abs().amax(-1, keepdim=True)
        s_out = torch.where(amax > 0, amax / qo, torch.ones_like(amax))
        o_hat = torch.clamp(round_ste(outl / s_out), -qo, qo) * s_out
    x_hat = q_in * si + o_hat
    return (x_hat, mask) if return_mask else x_hat


def outlier_linear_ref(
    x: Tensor,
    w_codes: Tensor,
    w_scale: Tensor,
    static_scale: Tensor,
    bits_inlier: int,
    bits_outlier: int,
    n_refresh: int,
    threshold_policy: ThresholdPolicy | str = ThresholdPolicy.DYNAMIC,
    *,
    k_sigma: float = DEFAULT_K_SIGMA,
    theta: Tensor | None = None,
    bias: Tensor | None = None,
    std_correction: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Integer reference of the outlier-split GEMM  Y = X W^T  (seed section E).

    x: (B, L, K); w_codes: int8 (N, K) unpacked codes; w_scale: (N,).
    Returns (y fp32 (B, L, N), acc_inlier int64 (B, L, N), acc_outlier (B, L, N)):
        acc_inlier  = sum_k q_I[m, k] * w[n, k]              (exact integers)
        acc_outlier = sum_k q_O[m, k] * w[n, k]              (exact integers; fp32 for fp16 outliers)
        y = acc_inlier * (S_I(t) * s_w[n]) + acc_outlier * (S_O[m] * s_w[n]) (+ bias[n])
    """
    r = outlier_quant_ref(
        x, static_scale, bits_inlier, bits_outlier, n_refresh, threshold_policy, k_sigma=k_sigma, theta=theta,
        std_correction=std_correction,
    )
    B, L, K = x.shape
    w64 = w_codes.to(torch.int64)
    acc_in = torch.einsum("blk,nk->bln", r.inlier_codes.to(torch.int64), w64)
    if bits_outlier >= FP_PASSTHROUGH_BITS:
        acc_out = torch.einsum("blk,nk->bln", r.outlier_codes.double(), w64.double()).float()
    else:
        acc_out = torch.einsum("blk,nk->bln", r.outlier_codes.to(torch.int64), w64)
    s_in = static_scale.float().reshape(-1).expand(L).reshape(1, L, 1)
    sw = w_scale.float().reshape(1, 1, -1)
    y = acc_in.float() * (s_in * sw) + acc_out.float() * (r.outlier_scale.unsqueeze(-1) * sw)
    if bias is not None:
        y = y + bias.float()
    return y, acc_in, acc_out
