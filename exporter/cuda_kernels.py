"""ctypes binding to the ouro CUDA kernels (libouro_kernels.so, C ABI trt_plugins/common/ouro_kernels.h).

For tests and benchmarks on a GPU: the functions take torch CUDA tensors, validate shapes, dtypes and
alignment before calling, and turn status codes into messages naming the sizes.

Shape notation: B batch, L tokens, M = B*L rows, K input channels, N output channels, D = d_inner,
S = d_state.

The library is found by `ouro.exporter.native.find_library("ouro_kernels")`: the environment
variable OURO_KERNELS_LIB, else build/trt/libouro_kernels.so under the repository root. Importing this module never loads it (it
imports on CPU-only machines); the first kernel call does, and raises `KernelUnavailable` with the
command to fix it when the library or a GPU is missing.
"""
from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import torch
from torch import Tensor

from ouro.calib.quantizers import DEFAULT_K_SIGMA, ThresholdPolicy
from ouro.calib.scan import TemporalGroupQuant

from .native import LIBRARIES, library_candidate

__all__ = [
    "LIB_ENV",
    "BUILD_HINT",
    "KernelUnavailable",
    "KernelError",
    "Status",
    "GemmPath",
    "Epilogue",
    "ActQuant",
    "OutlierLinearResult",
    "library_path",
    "open_library",
    "load_library",
    "available",
    "last_gemm_path",
    "workspace_size",
    "tactic_names",
    "outlier_linear",
    "outlier_linear_profiled",
    "outlier_linear_launcher",
    "outlier_fake_quant",
    "selective_scan",
    "STEP_NAMES",
    "KernelCost",
    "LaunchPlan",
    "linear_plan",
    "scan_plan",
]

LIB_ENV = LIBRARIES["ouro_kernels"].env
LIB_NAME = LIBRARIES["ouro_kernels"].file
BUILD_HINT = (
    "build it with: cmake -S trt_plugins -B build/trt -DOURO_BUILD_PLUGINS=OFF && cmake --build build/trt -j2 "
    f"(from the repository root), or point {LIB_ENV} at an existing {LIB_NAME}"
)
STEP_NAMES = ("detect+extract", "inlier quant", "inlier GEMM", "outlier GEMM", "dequant+combine")
"""The five pipeline steps timed by `outlier_linear_profiled` (seed section E), as the separate epilogue runs
them. The fused epilogue has two kernels: the activation prep (detect + extract + quantize) is timed as step 0
and the fused GEMM (inlier GEMM + outlier K-slab + dequantization) as step 2; steps 1, 3 and 4 are 0."""
MAX_K = 16384
"""Largest K (channels per token) the kernels accept (one thread block holds a token's channel mask)."""
MAX_STATE = 16
"""Largest d_state of the selective scan kernel (the state lives in registers)."""
ALIGN = 16


class KernelUnavailable(RuntimeError):
    """The kernel library or a CUDA GPU is missing; the message says how to fix it."""


class KernelError(RuntimeError):
    """A kernel call returned an error status; `status` holds the code."""

    def __init__(self, message: str, status: "Status"):
        super().__init__(message)
        self.status = status


class Status(IntEnum):
    OK = 0
    INVALID_ARGUMENT = 1
    MISALIGNED = 2
    UNSUPPORTED_SHAPE = 3
    OUTLIER_CAPACITY = 4
    WORKSPACE = 5
    CUDA = 6
    UNSUPPORTED_ARCH = 7
    NOT_IMPLEMENTED = 8


class Epilogue(IntEnum):
    """FUSED: one activation-prep kernel and one tensor-core GEMM that also runs the outlier term and writes y
    once (no M x N buffer); SEPARATE: the five-kernel exact variant. Both give the reference's y for integer
    outliers (fp16 outliers: fused within a named tolerance). AUTO: fused whenever the shape allows."""

    AUTO = 0
    FUSED = 1
    SEPARATE = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class GemmPath(IntEnum):
    """GEMM path of the outlier-split linear; AUTO lets the library pick by compute capability."""

    AUTO = 0
    SM80_S4_TENSORCORE = 1
    S8_TENSORCORE = 2
    SIMT_FALLBACK = 3
    SM90_WGMMA = 4  # reserved: not implemented (requests raise KernelError NOT_IMPLEMENTED)

    @property
    def label(self) -> str:
        return self.name.lower()


# --------------------------------------------------------------------------- C structs (ABI mirror)
class _ActQuantC(ctypes.Structure):
    _fields_ = [
        ("bits", ctypes.c_int),
        ("bits_outlier", ctypes.c_int),
        ("n_refresh", ctypes.c_int),
        ("policy", ctypes.c_int),
        ("k_sigma", ctypes.c_float),
        ("std_correction", ctypes.c_int),
        ("scale", ctypes.c_void_p),
        ("theta", ctypes.c_void_p),
    ]


class _LinearParamsC(ctypes.Structure):
    _fields_ = [
        ("M", ctypes.c_int),
        ("L", ctypes.c_int),
        ("K", ctypes.c_int),
        ("N", ctypes.c_int),
        ("x", ctypes.c_void_p),
        ("x_is_fp32", ctypes.c_int),
        ("w", ctypes.c_void_p),
        ("w_bits", ctypes.c_int),
        ("w_scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("act", _ActQuantC),
        ("max_outliers", ctypes.c_int),
        ("y", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_size", ctypes.c_size_t),
        ("acc_inlier", ctypes.c_void_p),
        ("acc_outlier", ctypes.c_void_p),
        ("inlier_codes", ctypes.c_void_p),
        ("outlier_mask", ctypes.c_void_p),
    ]


class _ScanParamsC(ctypes.Structure):
    _fields_ = [
        ("B", ctypes.c_int),
        ("L", ctypes.c_int),
        ("D", ctypes.c_int),
        ("S", ctypes.c_int),
        ("io_is_fp32", ctypes.c_int),
        ("reverse", ctypes.c_int),
        ("delta_softplus", ctypes.c_int),
        ("u", ctypes.c_void_p),
        ("delta", ctypes.c_void_p),
        ("A", ctypes.c_void_p),
        ("Bm", ctypes.c_void_p),
        ("Cm", ctypes.c_void_p),
        ("Dskip", ctypes.c_void_p),
        ("z", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("delta_q", _ActQuantC),
        ("b_q", _ActQuantC),
        ("c_q", _ActQuantC),
        ("h_bits", ctypes.c_int),
        ("h_group", ctypes.c_int),
        ("h_scale", ctypes.c_void_p),
        ("h_zero", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_size", ctypes.c_size_t),
    ]


class _LinearConfigC(ctypes.Structure):
    _fields_ = [
        ("path", ctypes.c_int),
        ("epilogue", ctypes.c_int),
        ("tactic", ctypes.c_int),
        ("overflow_report", ctypes.c_void_p),
    ]


class _LinearChoiceC(ctypes.Structure):
    _fields_ = [("path", ctypes.c_int), ("epilogue", ctypes.c_int), ("tactic", ctypes.c_int)]


class _KernelCostC(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * 48),
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("smem_bytes", ctypes.c_uint),
        ("mma_kind", ctypes.c_int),
        ("mma_kind_outlier", ctypes.c_int),
        ("dram_read_bytes", ctypes.c_double),
        ("dram_write_bytes", ctypes.c_double),
        ("l2_read_bytes", ctypes.c_double),
        ("mma_ops", ctypes.c_double),
        ("mma_ops_outlier", ctypes.c_double),
        ("simt_ops", ctypes.c_double),
    ]


class _OutlierStatsC(ctypes.Structure):
    _fields_ = [("window_channels", ctypes.c_double), ("hot_channels", ctypes.c_double)]


_ABI_STRUCTS = {0: _ActQuantC, 1: _LinearParamsC, 2: _ScanParamsC, 3: _LinearConfigC, 4: _LinearChoiceC,
                5: _KernelCostC, 6: _OutlierStatsC}

_PROTOTYPES = {
    "ouroStatusString": (ctypes.c_char_p, [ctypes.c_int]),
    "ouroGemmPathString": (ctypes.c_char_p, [ctypes.c_int]),
    "ouroAbiStructSize": (ctypes.c_size_t, [ctypes.c_int]),
    "ouroOutlierLinearWorkspaceSize": (ctypes.c_size_t, [ctypes.c_int] * 9),
    "ouroOutlierLinearWithPath": (
        ctypes.c_int, [ctypes.POINTER(_LinearParamsC), ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    ),
    "ouroOutlierLinearEx": (
        ctypes.c_int,
        [ctypes.POINTER(_LinearParamsC), ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
         ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_float)],
    ),
    "ouroOutlierLinearCheck": (ctypes.c_int, [ctypes.POINTER(_LinearParamsC), ctypes.c_void_p]),
    "ouroOutlierFakeQuant": (
        ctypes.c_int,
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
         ctypes.POINTER(_ActQuantC), ctypes.c_void_p],
    ),
    "ouroSelectiveScanWorkspaceSize": (ctypes.c_size_t, [ctypes.c_int] * 5),
    "ouroSelectiveScan": (ctypes.c_int, [ctypes.POINTER(_ScanParamsC), ctypes.c_void_p]),
    "ouroOutlierLinearRun": (
        ctypes.c_int,
        [ctypes.POINTER(_LinearParamsC), ctypes.POINTER(_LinearConfigC), ctypes.c_void_p,
         ctypes.POINTER(_LinearChoiceC), ctypes.POINTER(ctypes.c_float)],
    ),
    "ouroOutlierLinearWorkspaceSizeFor": (ctypes.c_size_t, [ctypes.c_int] * 10),
    "ouroOutlierLinearNumTactics": (ctypes.c_int, []),
    "ouroOutlierLinearTacticName": (ctypes.c_char_p, [ctypes.c_int]),
    "ouroOutlierLinearPlan": (
        ctypes.c_int,
        [ctypes.c_int] * 12 + [ctypes.POINTER(_LinearConfigC), ctypes.POINTER(_OutlierStatsC),
                               ctypes.POINTER(_LinearChoiceC), ctypes.POINTER(_KernelCostC), ctypes.c_int],
    ),
    "ouroSelectiveScanPlan": (ctypes.c_int, [ctypes.c_int] * 12 + [ctypes.POINTER(_KernelCostC), ctypes.c_int]),
    "ouroHostFlagAlloc": (ctypes.c_int, [ctypes.POINTER(ctypes.c_void_p)]),
    "ouroHostFlagFree": (None, [ctypes.c_void_p]),
}

_LIB: ctypes.CDLL | None = None
_LAST_PATH: GemmPath | None = None


def library_path() -> Path:
    """Where the library is looked for: $OURO_KERNELS_LIB, else build/trt/libouro_kernels.so (`ouro.exporter.native`)."""
    return library_candidate("ouro_kernels")


def open_library(path: Path | str) -> ctypes.CDLL:
    """Load a kernel library from `path` (the CUDA build, or the CPU-emulator build of the same sources, whose
    launch plans are the same host code) with the binding's prototypes and ABI self-check; not cached."""
    path = Path(path)
    if not path.is_file():
        raise KernelUnavailable(f"ouro CUDA kernel library not found at {path}; {BUILD_HINT}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"could not load {path}: {e}; rebuild it ({BUILD_HINT})") from e
    for name, (restype, argtypes) in _PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as e:
            raise KernelUnavailable(f"{path} has no symbol {name}: it is older than this binding; {BUILD_HINT}") from e
        fn.restype, fn.argtypes = restype, argtypes
    for which, struct in _ABI_STRUCTS.items():
        native = lib.ouroAbiStructSize(which)
        if native != ctypes.sizeof(struct):
            raise KernelUnavailable(
                f"ABI mismatch: {struct.__name__} is {ctypes.sizeof(struct)} bytes here but {native} bytes in {path}; "
                f"rebuild the library from this checkout ({BUILD_HINT})"
            )
    return lib


def load_library() -> ctypes.CDLL:
    """Load (once) and self-check the kernel library; raise KernelUnavailable with a fix if that fails."""
    global _LIB
    if _LIB is None:
        _LIB = open_library(library_path())
    return _LIB


def available() -> bool:
    """True when the library loads and a CUDA GPU is present."""
    try:
        load_library()
    except KernelUnavailable:
        return False
    return torch.cuda.is_available()


def _require_gpu() -> ctypes.CDLL:
    lib = load_library()
    if not torch.cuda.is_available():
        raise KernelUnavailable(
            "the ouro CUDA kernels need a CUDA GPU and a CUDA build of torch; none is available here "
            "(use ouro.calib.quantizers / ouro.calib.scan references on CPU)"
        )
    return lib


def last_gemm_path() -> str | None:
    """Label of the GEMM path the last outlier_linear call ran (None before the first call)."""
    return None if _LAST_PATH is None else _LAST_PATH.label


def status_message(status: int) -> str:
    try:
        return load_library().ouroStatusString(int(status)).decode()
    except KernelUnavailable:
        return Status(status).name


# --------------------------------------------------------------------------- validation helpers
def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_tensor(t: Tensor, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], align: int = 4,
                  device: torch.device | None = None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}; put all operands on one GPU")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()); shape {tuple(t.shape)}, strides {t.stride()}")
    if t.data_ptr() % align:
        raise ValueError(f"{name} data pointer must be {align}-byte aligned (got address {t.data_ptr():#x}); pass a fresh tensor, not a view")


@dataclass
class ActQuant:
    """One activation quantizer (ouroActQuant_t): OuroMamba static inliers + dynamic outliers.

    scale: (L,) fp32 static inlier scale S_I(t); theta: (L,) for policy "calibrated"."""

    bits: int
    bits_outlier: int
    n_refresh: int
    scale: Tensor
    policy: ThresholdPolicy | str = ThresholdPolicy.DYNAMIC
    k_sigma: float = DEFAULT_K_SIGMA
    theta: Tensor | None = None
    std_correction: int = 0
    """std of the dynamic threshold divides by max(C - std_correction, 1): 0, or 1 (Bessel, like torch.std)."""

    def __post_init__(self) -> None:
        self.policy = ThresholdPolicy(self.policy)
        if self.std_correction not in (0, 1):
            raise ValueError(f"std_correction must be 0 or 1, got {self.std_correction}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"inlier bits must be in [2, 8], got {self.bits}")
        if not (2 <= self.bits_outlier <= 8 or self.bits_outlier == 16):
            raise ValueError(f"bits_outlier must be in [2, 8] or 16 (fp16 outliers), got {self.bits_outlier}")
        if self.n_refresh < 1:
            raise ValueError(f"n_refresh must be >= 1, got {self.n_refresh}")
        if self.policy is ThresholdPolicy.CALIBRATED and self.theta is None:
            raise ValueError("policy 'calibrated' needs theta (one threshold per token)")

    def to_c(self, L: int, name: str, device: torch.device | None = None) -> _ActQuantC:
        _check_tensor(self.scale, f"{name}.scale", (L,), (torch.float32,), device=device)
        if self.theta is not None:
            _check_tensor(self.theta, f"{name}.theta", (L,), (torch.float32,), device=device)
        policy = 0 if self.policy is ThresholdPolicy.DYNAMIC else 1
        return _ActQuantC(bits=self.bits, bits_outlier=self.bits_outlier, n_refresh=self.n_refresh, policy=policy,
                          k_sigma=float(self.k_sigma), std_correction=int(self.std_correction),
                          scale=self.scale.data_ptr(), theta=_ptr(self.theta) if policy == 1 else None)


_NO_QUANT = _ActQuantC(bits=0, bits_outlier=0, n_refresh=1)


def _raise(fn: str, status: int, sizes: str, hint: str = "") -> None:
    st = Status(status)
    msg = f"{fn} failed: {status_message(status)} [{sizes}]"
    if hint:
        msg += f"; {hint}"
    raise KernelError(msg, st)


def _on_device(t: Tensor):
    """Run on t's GPU (kernels launch on the current device and its current stream)."""
    return torch.cuda.device(t.device) if isinstance(t, Tensor) and t.is_cuda else contextlib.nullcontext()


def _stream() -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


# --------------------------------------------------------------------------- outlier-split linear
@dataclass
class OutlierLinearResult:
    """y (B, L, N) in x's dtype; path / epilogue / tactic: what ran; debug tensors when requested."""

    y: Tensor
    path: str
    epilogue: str = "none"
    tactic: str | None = None  # tile of the fused GEMM ("128x128", ...), None for the separate epilogue
    acc_inlier: Tensor | None = None  # int32 (B, L, N)
    acc_outlier: Tensor | None = None  # int32 (B, L, N), integer outliers only
    inlier_codes: Tensor | None = None  # int8 (B, L, K)
    outlier_mask: Tensor | None = None  # bool (B, L, K)
    step_ms: list[float] = field(default_factory=list)


def workspace_size(M: int, L: int, K: int, N: int, w_bits: int, act: ActQuant, max_outliers: int,
                   epilogue: Epilogue | str = Epilogue.AUTO) -> int:
    """Workspace bytes of `epilogue` (AUTO: the one AUTO runs for this shape; the fused one needs no M x N buffer)."""
    lib = load_library()
    epi = _enum_arg(Epilogue, epilogue, "epilogue")
    return int(lib.ouroOutlierLinearWorkspaceSizeFor(M, L, K, N, w_bits, act.bits, act.bits_outlier, act.n_refresh,
                                                     max_outliers, int(epi)))


def tactic_names() -> list[str]:
    """Tile shapes of the fused GEMM, in tactic order (tactic id = index + 1; 0 = automatic)."""
    lib = load_library()
    return [lib.ouroOutlierLinearTacticName(i).decode() for i in range(1, lib.ouroOutlierLinearNumTactics() + 1)]


def _tactic_arg(tactic, lib) -> int:
    """A tactic id (0 = automatic) from an int or a tile name."""
    n = lib.ouroOutlierLinearNumTactics()
    names = [lib.ouroOutlierLinearTacticName(i).decode() for i in range(1, n + 1)]
    if isinstance(tactic, str):
        if tactic == "auto":
            return 0
        if tactic not in names:
            raise ValueError(f"unknown tactic {tactic!r}; choose 'auto' or one of {', '.join(names)}")
        return names.index(tactic) + 1
    if not 0 <= int(tactic) <= n:
        raise ValueError(f"unknown tactic {tactic!r}; choose 0 (auto) or 1..{n} ({', '.join(names)})")
    return int(tactic)


def _shape_hint(status: Status, K: int, N: int, w_bits: int, path: GemmPath, epilogue: Epilogue) -> str:
    if epilogue is Epilogue.FUSED and status in (Status.UNSUPPORTED_SHAPE, Status.INVALID_ARGUMENT):
        need = "K % 16 == 0" if w_bits == 8 else "K % 32 == 0"
        return (f"the fused epilogue needs a tensor-core path, {need} and K <= 8192 (K={K}), and for the int4 path "
                "integer outliers; use epilogue='auto'")
    if status is Status.UNSUPPORTED_SHAPE:
        if K > MAX_K:
            return f"K={K} exceeds the kernels' limit {MAX_K}"
        if path is GemmPath.S8_TENSORCORE:
            return f"the INT8 tensor-core path needs K % 16 == 0 and N % 4 == 0 (K={K}, N={N}); use path='auto'"
        if path is GemmPath.SM80_S4_TENSORCORE:
            return f"the INT4 tensor-core path needs K % 32 == 0 and N % 4 == 0 (K={K}, N={N}); use path='auto'"
        if w_bits == 4 and K % 2:
            return f"4-bit weights need an even K (got K={K})"
    if status is Status.UNSUPPORTED_ARCH:
        return "the native INT4 path runs only on sm_80/86/89 built with those archs; all paths need sm_80+"
    if status is Status.NOT_IMPLEMENTED:
        return "the sm_90 wgmma path is not implemented; use path='auto' (sm_90 runs s8_tensorcore)"
    if status is Status.OUTLIER_CAPACITY:
        return "raise max_outliers (at most K) or check the static scales (too small S_I triggers everything)"
    return ""


@dataclass
class _PreparedLinear:
    params: _LinearParamsC
    config: _LinearConfigC
    result: OutlierLinearResult
    keep: list  # tensors the params point into (workspace, debug mask)
    sizes: str
    path: GemmPath
    epilogue: Epilogue
    K: int
    N: int
    w_bits: int


def _enum_arg(enum: type[IntEnum], value, what: str):
    """`value` as a member of `enum` (a member, its value, or its name in any case); else ValueError."""
    try:
        return enum[value.upper()] if isinstance(value, str) else enum(value)
    except (KeyError, ValueError):
        names = ", ".join(repr(m.name.lower()) for m in enum)
        raise ValueError(f"unknown {what} {value!r}; choose one of {names}") from None


def _prepare_linear(lib, x, w, w_scale, act, w_bits, bias, max_outliers, path, epilogue, tactic,
                    debug) -> _PreparedLinear:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, K), got shape {tuple(x.shape)}")
    B, L, K = x.shape
    M = B * L
    if w_bits not in (4, 8):
        raise ValueError(f"w_bits must be 4 or 8, got {w_bits}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (N, K) int8 codes or (N, K/2) packed int4, got shape {tuple(w.shape)}")
    N = w.shape[0]
    if w_bits == 4 and K % 2:
        raise ValueError(f"4-bit weights are packed two per byte along K, so K must be even (got K={K})")
    if K > MAX_K:
        raise ValueError(f"K={K} exceeds the kernels' limit {MAX_K}")
    max_outliers = K if max_outliers is None else int(max_outliers)
    if not 0 <= max_outliers <= K:
        raise ValueError(f"max_outliers must be in [0, K={K}], got {max_outliers}")
    _check_tensor(x, "x", (B, L, K), (torch.float16, torch.float32), ALIGN)
    dev = x.device
    _check_tensor(w, "w", (N, K if w_bits == 8 else K // 2), (torch.int8,) if w_bits == 8 else (torch.uint8, torch.int8),
                  ALIGN, dev)
    _check_tensor(w_scale, "w_scale", (N,), (torch.float32,), device=dev)
    if bias is not None:
        _check_tensor(bias, "bias", (N,), (torch.float32,), device=dev)
    path = _enum_arg(GemmPath, path, "path")
    epilogue = _enum_arg(Epilogue, epilogue, "epilogue")
    tactic_id = _tactic_arg(tactic, lib)
    c_act = act.to_c(L, "act", dev)
    y = torch.empty(B, L, N, dtype=x.dtype, device=dev)
    ws_epi = Epilogue.SEPARATE if path is GemmPath.SIMT_FALLBACK else epilogue  # SIMT runs the separate epilogue
    ws = torch.empty(max(workspace_size(M, L, K, N, w_bits, act, max_outliers, ws_epi), 1), dtype=torch.uint8,
                     device=dev)
    res = OutlierLinearResult(y=y, path="none")
    keep = [ws]
    mask_u8 = None
    if debug:
        res.acc_inlier = torch.zeros(B, L, N, dtype=torch.int32, device=dev)
        res.acc_outlier = torch.zeros(B, L, N, dtype=torch.int32, device=dev) if act.bits_outlier < 16 else None
        res.inlier_codes = torch.zeros(B, L, K, dtype=torch.int8, device=dev)
        mask_u8 = torch.zeros(B, L, K, dtype=torch.uint8, device=dev)
        keep.append(mask_u8)
    p = _LinearParamsC(
        M=M, L=L, K=K, N=N, x=x.data_ptr(), x_is_fp32=int(x.dtype == torch.float32), w=w.data_ptr(), w_bits=w_bits,
        w_scale=w_scale.data_ptr(), bias=_ptr(bias), act=c_act, max_outliers=max_outliers, y=y.data_ptr(),
        workspace=ws.data_ptr(), workspace_size=ws.numel(),
        acc_inlier=_ptr(res.acc_inlier), acc_outlier=_ptr(res.acc_outlier), inlier_codes=_ptr(res.inlier_codes),
        outlier_mask=_ptr(mask_u8),
    )
    cfg = _LinearConfigC(path=int(path), epilogue=int(epilogue), tactic=tactic_id, overflow_report=None)
    sizes = (f"B={B}, L={L}, M={M}, K={K}, N={N}, w_bits={w_bits}, act bits={act.bits}/{act.bits_outlier}, "
             f"n_refresh={act.n_refresh}, max_outliers={max_outliers}, path={path.label}, epilogue={epilogue.label}, "
             f"tactic={tactic_id}")
    return _PreparedLinear(p, cfg, res, keep, sizes, path, epilogue, K, N, w_bits)


def _record_choice(lib, ran: _LinearChoiceC, res: OutlierLinearResult) -> None:
    global _LAST_PATH
    if ran.path:
        _LAST_PATH = GemmPath(ran.path)
        res.path = _LAST_PATH.label
    if ran.epilogue:
        res.epilogue = Epilogue(ran.epilogue).label
    res.tactic = lib.ouroOutlierLinearTacticName(ran.tactic).decode() if ran.tactic else None


def _call_linear(lib, pl: _PreparedLinear, ran: _LinearChoiceC, steps=None) -> int:
    return lib.ouroOutlierLinearRun(ctypes.byref(pl.params), ctypes.byref(pl.config), _stream(), ctypes.byref(ran),
                                    steps)


def _raise_linear(pl: _PreparedLinear, st: int) -> None:
    _raise("ouroOutlierLinear", st, pl.sizes, _shape_hint(Status(st), pl.K, pl.N, pl.w_bits, pl.path, pl.epilogue))


def _outlier_linear(x, w, w_scale, act, w_bits, bias, max_outliers, path, epilogue, tactic, debug,
                    profiled) -> OutlierLinearResult:
    lib = _require_gpu()
    with _on_device(x):
        pl = _prepare_linear(lib, x, w, w_scale, act, w_bits, bias, max_outliers, path, epilogue, tactic, debug)
        return _outlier_linear_on_device(lib, pl, debug, profiled)


def _outlier_linear_on_device(lib, pl: _PreparedLinear, debug: bool, profiled: bool) -> OutlierLinearResult:
    res = pl.result
    ran = _LinearChoiceC()
    if profiled:
        steps = (ctypes.c_float * 5)()
        st = _call_linear(lib, pl, ran, steps)
        res.step_ms = [float(v) for v in steps]
    else:
        st = _call_linear(lib, pl, ran)
        if st == Status.OK:
            st = lib.ouroOutlierLinearCheck(ctypes.byref(pl.params), _stream())
    _record_choice(lib, ran, res)
    if st != Status.OK:
        _raise_linear(pl, st)
    if debug:
        res.outlier_mask = pl.keep[1].bool()
    return res


def outlier_linear_launcher(
    x: Tensor, w: Tensor, w_scale: Tensor, act: ActQuant, *, w_bits: int = 8, bias: Tensor | None = None,
    max_outliers: int | None = None, path: GemmPath | str = GemmPath.AUTO,
    epilogue: Epilogue | str = Epilogue.AUTO, tactic: int | str = 0,
) -> tuple[Callable[[], None], OutlierLinearResult]:
    """Validate and allocate once; return (launch, result): launch() enqueues one asynchronous call on the
    current stream writing result.y (no synchronisation, no capacity check, no Python work but the ctypes call:
    it can be captured in a CUDA graph). Call `outlier_linear` once first to check the capacity and the numerics."""
    lib = _require_gpu()
    with _on_device(x):
        pl = _prepare_linear(lib, x, w, w_scale, act, w_bits, bias, max_outliers, path, epilogue, tactic, False)
    ran = _LinearChoiceC()

    def launch() -> None:
        with _on_device(x):
            st = _call_linear(lib, pl, ran)
        if st != Status.OK:
            _raise_linear(pl, st)
        _record_choice(lib, ran, pl.result)

    launch.keep = (pl, x, w, w_scale, bias, act)  # keep every tensor the params point into alive
    return launch, pl.result


def outlier_linear(
    x: Tensor, w: Tensor, w_scale: Tensor, act: ActQuant, *, w_bits: int = 8, bias: Tensor | None = None,
    max_outliers: int | None = None, path: GemmPath | str = GemmPath.AUTO,
    epilogue: Epilogue | str = Epilogue.AUTO, tactic: int | str = 0, debug: bool = False,
) -> OutlierLinearResult:
    """Outlier-split linear Y = X W^T on the GPU (numerics: ouro.calib.quantizers.outlier_linear_ref).

    x: (B, L, K) fp16/fp32 CUDA; w: int8 codes (N, K) (w_bits=8) or `pack_int4` output (N, K/2) (w_bits=4);
    w_scale, bias: (N,) fp32. max_outliers defaults to K (the window can never overflow).
    epilogue: see `Epilogue`; tactic: tile of the fused GEMM (0 / 'auto', an id, or a name from `tactic_names`).
    debug=True also returns the exact integer accumulators, inlier codes and outlier masks (both epilogues)."""
    return _outlier_linear(x, w, w_scale, act, w_bits, bias, max_outliers, path, epilogue, tactic, debug,
                           profiled=False)


def outlier_linear_profiled(
    x: Tensor, w: Tensor, w_scale: Tensor, act: ActQuant, *, w_bits: int = 8, bias: Tensor | None = None,
    max_outliers: int | None = None, path: GemmPath | str = GemmPath.AUTO,
    epilogue: Epilogue | str = Epilogue.AUTO, tactic: int | str = 0,
) -> OutlierLinearResult:
    """As `outlier_linear`, synchronising after each of the five steps; result.step_ms follows STEP_NAMES."""
    return _outlier_linear(x, w, w_scale, act, w_bits, bias, max_outliers, path, epilogue, tactic, False,
                           profiled=True)


# --------------------------------------------------------------------------- launch plans (no GPU needed)
MMA_KINDS = {0: None, 1: "s8", 2: "s4", 3: "f16"}


@dataclass(frozen=True)
class KernelCost:
    """One kernel of a launch plan: its launch configuration and modelled work (see ouroKernelCost_t)."""

    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem_bytes: int
    mma_kind: str | None
    mma_kind_outlier: str | None
    dram_read_bytes: float
    dram_write_bytes: float
    l2_read_bytes: float
    mma_ops: float
    mma_ops_outlier: float
    simt_ops: float


@dataclass(frozen=True)
class LaunchPlan:
    path: str
    epilogue: str
    tactic: str | None
    kernels: tuple[KernelCost, ...]


def _costs(buf, n: int) -> tuple[KernelCost, ...]:
    return tuple(KernelCost(k.name.decode(), tuple(k.grid), tuple(k.block), int(k.smem_bytes), MMA_KINDS[k.mma_kind],
                            MMA_KINDS[k.mma_kind_outlier], k.dram_read_bytes, k.dram_write_bytes, k.l2_read_bytes,
                            k.mma_ops, k.mma_ops_outlier, k.simt_ops) for k in buf[:n])


def linear_plan(M: int, L: int, K: int, N: int, *, w_bits: int, act_bits: int, bits_outlier: int, n_refresh: int,
                cc: int, num_sms: int, max_outliers: int | None = None, x_fp32: bool = False,
                path: GemmPath | str = GemmPath.AUTO, epilogue: Epilogue | str = Epilogue.AUTO,
                tactic: int | str = 0, window_channels: float = 0.0, hot_channels: float = 0.0,
                lib: ctypes.CDLL | None = None) -> LaunchPlan:
    """The kernels `outlier_linear` would launch on a GPU of compute capability `cc` with `num_sms` SMs, from the
    library's own launch code (ouroOutlierLinearPlan; host code, no GPU needed), with modelled traffic and MMA
    work for outlier lists of `window_channels` channels per window drawn from `hot_channels` channels."""
    lib = lib or load_library()
    cfg = _LinearConfigC(path=int(_enum_arg(GemmPath, path, "path")), epilogue=int(_enum_arg(Epilogue, epilogue, "epilogue")),
                         tactic=_tactic_arg(tactic, lib))
    stats = _OutlierStatsC(window_channels, hot_channels)
    choice = _LinearChoiceC()
    buf = (_KernelCostC * 8)()
    n = lib.ouroOutlierLinearPlan(M, L, K, N, w_bits, act_bits, bits_outlier, n_refresh,
                                  K if max_outliers is None else max_outliers, int(x_fp32), cc, num_sms,
                                  ctypes.byref(cfg), ctypes.byref(stats), ctypes.byref(choice), buf, 8)
    if n < 0:
        _raise("ouroOutlierLinearPlan", -n, f"M={M}, L={L}, K={K}, N={N}, w_bits={w_bits}, cc={cc}")
    tactic_name = lib.ouroOutlierLinearTacticName(choice.tactic).decode() if choice.tactic else None
    return LaunchPlan(GemmPath(choice.path).label, Epilogue(choice.epilogue).label, tactic_name, _costs(buf, n))


def scan_plan(B: int, L: int, D: int, S: int, *, io_fp32: bool = False, delta_bits: int = 0, b_bits: int = 0,
              c_bits: int = 0, h_bits: int = 0, has_z: bool = True, cc: int = 90, num_sms: int = 132,
              lib: ctypes.CDLL | None = None) -> tuple[KernelCost, ...]:
    """The kernels `selective_scan` launches (ouroSelectiveScanPlan), with modelled traffic."""
    lib = lib or load_library()
    buf = (_KernelCostC * 4)()
    n = lib.ouroSelectiveScanPlan(B, L, D, S, int(io_fp32), delta_bits, b_bits, c_bits, h_bits, int(has_z), cc,
                                  num_sms, buf, 4)
    if n < 0:
        _raise("ouroSelectiveScanPlan", -n, f"B={B}, L={L}, D={D}, S={S}")
    return _costs(buf, n)


# --------------------------------------------------------------------------- fake quant, scan
def outlier_fake_quant(x: Tensor, act: ActQuant) -> Tensor:
    """OuroMamba fake quantization of x (B, L, C) on the GPU (numerics: outlier_fake_quant); same dtype."""
    lib = _require_gpu()
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, C), got shape {tuple(x.shape)}")
    B, L, C = x.shape
    if C > MAX_K:
        raise ValueError(f"C={C} exceeds the kernels' limit {MAX_K}")
    _check_tensor(x, "x", (B, L, C), (torch.float16, torch.float32))
    c_act = act.to_c(L, "act", x.device)
    y = torch.empty_like(x)
    with _on_device(x):
        st = lib.ouroOutlierFakeQuant(x.data_ptr(), y.data_ptr(), int(x.dtype == torch.float32), B, L, C,
                                      ctypes.byref(c_act), _stream())
    if st != Status.OK:
        _raise("ouroOutlierFakeQuant", st, f"B={B}, L={L}, C={C}, bits={act.bits}/{act.bits_outlier}")
    return y


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, Dskip: Tensor | None = None, z: Tensor | None = None,
    *, delta_softplus: bool = True, reverse: bool = False, delta_q: ActQuant | None = None,
    b_q: ActQuant | None = None, c_q: ActQuant | None = None, h_quant: TemporalGroupQuant | None = None,
) -> Tensor:
    """Selective scan on the GPU (numerics: ouro.calib.scan.selective_scan_ref); output in u's dtype.

    delta_q / b_q / c_q: OuroMamba fake quantization of Delta (before softplus) / B / C before the scan;
    h_quant: TGQ of the state inside the recurrence."""
    lib = _require_gpu()
    if u.dim() != 3:
        raise ValueError(f"u must be (B, L, D), got shape {tuple(u.shape)}")
    Bsz, L, D = u.shape
    if A.dim() != 2 or A.shape[0] != D:
        raise ValueError(f"A must be (D={D}, S), got shape {tuple(A.shape)}")
    S = A.shape[1]
    if S > MAX_STATE:
        raise ValueError(f"d_state S={S} exceeds the kernel's limit {MAX_STATE}")
    io = (u.dtype,)
    if u.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"u must be fp16 or fp32, got {u.dtype}")
    for t, n, shp in ((u, "u", (Bsz, L, D)), (delta, "delta", (Bsz, L, D)), (Bm, "Bm", (Bsz, L, S)),
                      (Cm, "Cm", (Bsz, L, S))):
        _check_tensor(t, n, shp, io, device=u.device)
    if z is not None:
        _check_tensor(z, "z", (Bsz, L, D), io, device=u.device)
    _check_tensor(A, "A", (D, S), (torch.float32,), device=u.device)
    if Dskip is not None:
        _check_tensor(Dskip, "Dskip", (D,), (torch.float32,), device=u.device)
    out = torch.empty_like(u)
    ws = torch.empty(max(1, int(lib.ouroSelectiveScanWorkspaceSize(Bsz, L, D, S, int(u.dtype == torch.float32)))),
                     dtype=torch.uint8, device=u.device)
    p = _ScanParamsC(
        B=Bsz, L=L, D=D, S=S, io_is_fp32=int(u.dtype == torch.float32), reverse=int(reverse),
        delta_softplus=int(delta_softplus), u=u.data_ptr(), delta=delta.data_ptr(), A=A.data_ptr(), Bm=Bm.data_ptr(),
        Cm=Cm.data_ptr(), Dskip=_ptr(Dskip), z=_ptr(z), out=out.data_ptr(),
        delta_q=delta_q.to_c(L, "delta_q", u.device) if delta_q else _NO_QUANT,
        b_q=b_q.to_c(L, "b_q", u.device) if b_q else _NO_QUANT,
        c_q=c_q.to_c(L, "c_q", u.device) if c_q else _NO_QUANT,
        workspace=ws.data_ptr(), workspace_size=ws.numel(),
    )
    if h_quant is not None:
        G = TemporalGroupQuant.num_groups(L, h_quant.group)
        hs = h_quant.scale.detach().float().contiguous()
        hz = h_quant.zero.detach().float().contiguous()
        _check_tensor(hs, "h_quant.scale", (G,), (torch.float32,), device=u.device)
        _check_tensor(hz, "h_quant.zero", (G,), (torch.float32,), device=u.device)
        p.h_bits, p.h_group, p.h_scale, p.h_zero = h_quant.bits, h_quant.group, hs.data_ptr(), hz.data_ptr()
    with _on_device(u):
        st = lib.ouroSelectiveScan(ctypes.byref(p), _stream())
    if st != Status.OK:
        _raise("ouroSelectiveScan", st, f"B={Bsz}, L={L}, D={D}, S={S}, dtype={u.dtype}")
    return out
