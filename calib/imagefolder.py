"""Image folders (ImageNet eval transform) and the `--calib` / `--calib-dir` data sources.

Eval transform (the standard ImageNet one, crop ratio 0.875):
    resize the shorter side to round(img_size / 0.875) (256 for 224), bicubic
    centre crop img_size x img_size, RGB, [0, 1], normalise with the ImageNet mean / std.
Library decision: torchvision's transforms would be the well-kept form of this, but PyPI's
torchvision wheel fails to import beside the CPU torch wheel this project installs, so the transform
is these few lines of PIL (IMAGENET_MEAN / IMAGENET_STD are defined here once).
Image modes: 16-bit greyscale (I;16, I) is scaled from its 0..65535 range (not clipped at 255),
float images (F) are taken as [0, 1], CMYK and YCbCr are converted, palette images and images with
alpha (RGBA, LA, PA, P with transparency) are composited over white.
Folder layouts:
    flat        DIR/*.jpg ...                      (calibration; labels unused)
    classes     DIR/<class>/*.jpg ...              (evaluation; label = index of the sorted class name)
Subfolders without any file do not count. For calibration (labels unused) every file of a mixed
folder is used: DIR/*.jpg and DIR/<sub>/**. For evaluation a mixed folder (files beside non-empty
class folders) is an error: the top-level files would have no label.
Files that are not readable images, or that would decode to more than MAX_IMAGE_PIXELS pixels, are
skipped and counted in one warning line (logger `ouro.calib.imagefolder`); a folder with no
readable image is an error.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CROP_RATIO",
    "ImageFolderError",
    "eval_transform",
    "load_image_folder",
    "CalibSpec",
    "parse_calib_spec",
    "calibration_images",
    "make_forward_loop",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = 0.875
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_IMAGE_PIXELS = 8192 * 8192
"""Images larger than this (width x height) are skipped before decoding (a decompression bomb, or
far beyond what a 224-pixel eval transform needs)."""
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over

log = logging.getLogger(__name__)


class ImageFolderError(ValueError):
    """A data folder or a --calib spec that cannot be used; the message says what to change."""


def to_rgb(img):
    """Any PIL image -> 8-bit RGB with the intensities it means (module docstring: modes)."""
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        a = a if mode == "F" else a / 65535.0
        a = np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0)
        return Image.fromarray(np.round(a * 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def eval_transform(img, img_size: int = 224) -> Tensor:
    """PIL image -> normalised (3, img_size, img_size) fp32 tensor (module docstring)."""
    from PIL import Image

    img = to_rgb(img)
    short = round(img_size / CROP_RATIO)
    w, h = img.size
    if w <= h:
        nw, nh = short, max(short, round(h * short / w))
    else:
        nw, nh = max(short, round(w * short / h)), short
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - img_size) // 2, (nh - img_size) // 2
    img = img.crop((left, top, left + img_size, top + img_size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img_size, img_size, 3)
    x = x.permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def _list_files(root: Path, labels: bool | None = None) -> tuple[list[Path], list[int] | None, list[str]]:
    """(files, labels or None, class names). labels: True class layout required, False flat (every
    file, subfolders included), None whichever the folder is (a mixed one is an error)."""
    top = sorted(p for p in root.iterdir() if p.is_file())
    classes = [(d, sorted(p for p in d.rglob("*") if p.is_file())) for d in sorted(p for p in root.iterdir() if p.is_dir())]
    classes = [(d, fs) for d, fs in classes if fs]  # an empty subfolder is not a class
    if labels is False or (labels is None and not classes):
        return top + [f for _, fs in classes for f in fs], None, []
    if top or not classes:
        raise ImageFolderError(
            f"image folder {str(root)!r} mixes {len(top)} file(s) at its top level with {len(classes)} class subfolder(s): "
            "an evaluation folder needs every image inside a class subfolder (the label); move the top-level files")
    files, labs = [], []
    for ci, (_, fs) in enumerate(classes):
        files += fs
        labs += [ci] * len(fs)
    return files, labs, [d.name for d, _ in classes]


def count_image_files(path: str | Path, labels: bool | None = None) -> int:
    """How many files `load_image_folder` would consider (readable or not), in its order."""
    root = Path(path)
    if not root.is_dir():
        raise ImageFolderError(f"image folder {str(root)!r} does not exist or is not a directory")
    return len(_list_files(root, labels)[0])


def _read(f: Path, img_size: int) -> Tensor | str:
    """The transformed image, or why it was skipped ("unreadable" / "too large")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    return "too large"
                return eval_transform(im, img_size)
    except Image.DecompressionBombError:
        return "too large"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return "unreadable"


def _report_skips(root: Path, skipped: dict[str, list[str]]) -> None:
    if not any(skipped.values()):
        return
    what = {"unreadable": "not readable images", "too large": f"larger than {MAX_IMAGE_PIXELS} pixels"}
    n = sum(len(v) for v in skipped.values())
    parts = [f"{len(v)} {what[k]} (e.g. {', '.join(v[:3])})" for k, v in skipped.items() if v]
    log.warning("%s: skipped %d file(s): %s", root, n, "; ".join(parts))


def load_image_folder(
    path: str | Path, *, n: int | None = None, img_size: int = 224, seed: int = 0, select: list[int] | None = None,
    labels: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Images of a folder through `eval_transform`: (N, 3, S, S) and labels (N,) or None (flat folder).

    n: take n files drawn with a seeded permutation (all when None).
    select: only these file positions (in the sorted listing; a shard of an evaluation set).
    labels: the layout (see `_list_files`; False for calibration data)."""
    root = Path(path)
    if not root.is_dir():
        raise ImageFolderError(f"image folder {str(root)!r} does not exist or is not a directory")
    want_labels = labels
    files, labels, _ = _list_files(root, want_labels)
    order = list(range(len(files))) if select is None else [i for i in select if 0 <= i < len(files)]
    if n is not None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        order = torch.randperm(len(files), generator=g, device="cpu").tolist()
    imgs, labs = [], []
    skipped: dict[str, list[str]] = {"unreadable": [], "too large": []}
    for i in order:
        f = files[i]
        x = _read(f, img_size)
        if isinstance(x, str):
            skipped[x].append(f.name)
        else:
            imgs.append(x)
            if labels is not None:
                labs.append(labels[i])
        if n is not None and len(imgs) == n:
            break
    _report_skips(root, skipped)
    if not imgs and select is not None and not order:
        return torch.empty(0, 3, img_size, img_size, device="cpu"), (torch.empty(0, dtype=torch.long, device="cpu") if labels is not None else None)
    if not imgs:
        raise ImageFolderError(f"image folder {str(root)!r} contains no readable image ({len(files)} file(s) found)")
    if n is not None and len(imgs) < n:
        raise ImageFolderError(f"image folder {str(root)!r} has {len(imgs)} readable image(s), {n} were asked for")
    x = torch.stack(imgs)
    return x, (torch.tensor(labs, dtype=torch.long, device="cpu") if labels is not None else None)


# ----------------------------------------------------------------------------- --calib specs
@dataclass(frozen=True)
class CalibSpec:
    kind: str  # "real" | "synthetic" | "dir"
    n: int | None


_SPEC = re.compile(r"^(real|synthetic)(?::(\d+))?$")
DEFAULT_CALIB_IMAGES = 128


def parse_calib_spec(spec: str | None, calib_dir: str | None = None) -> CalibSpec:
    """`real:N` | `synthetic:N` (N defaults to 128), or a folder given by --calib-dir. Neither:
    data-free, OuroMamba-Gen's 128 synthetic images (the paper's count)."""
    if spec is None:
        return CalibSpec("dir", None) if calib_dir else CalibSpec("synthetic", DEFAULT_CALIB_IMAGES)
    m = _SPEC.match(spec.strip().lower())
    if not m:
        raise ImageFolderError(f"--calib {spec!r} is not understood; use real:N or synthetic:N (e.g. real:128)")
    n = int(m.group(2)) if m.group(2) else DEFAULT_CALIB_IMAGES
    if n < 1:
        raise ImageFolderError(f"--calib {spec!r}: the number of images must be >= 1")
    kind = m.group(1)
    if calib_dir and kind == "real":
        return CalibSpec("dir", n)
    return CalibSpec(kind, n)


def calibration_images(model, spec: CalibSpec, *, calib_dir: str | None = None, demo: bool = False, seed: int = 0,
                       dist=None, progress: bool = True, gen=None) -> Tensor:
    """The calibration images a spec names, (N, C, H, W) normalised model input, on the CPU.
    Synthetic images are generated on the model's device (sharded over torchrun processes by `dist`)."""
    size = model.cfg.img_size
    if spec.kind == "dir":
        d = Path(calib_dir)
        if (d / "images.npz").is_file():  # a folder written by `ouro-export gen`
            from ouro.calib.gen import load_synthetic_dir

            x = load_synthetic_dir(d)
            return x if spec.n is None else x[: spec.n]
        return load_image_folder(d, n=spec.n, img_size=size, seed=seed, labels=False)[0]
    if spec.kind == "real":
        if not demo:
            raise ImageFolderError("--calib real:N draws from the demo model's calibration split; for a checkpoint give --calib-dir DIR (or --calib synthetic:N)")
        from ouro.calib.data import load_digits_split

        x, _ = load_digits_split("calib", size)
        if spec.n > x.shape[0]:
            raise ImageFolderError(f"--calib real:{spec.n}: the demo calibration split has only {x.shape[0]} images")
        g = torch.Generator(device="cpu").manual_seed(seed)
        return x[torch.randperm(x.shape[0], generator=g, device="cpu")[: spec.n]]
    if spec.kind == "synthetic":
        try:
            from ouro.calib.gen import generate_calibration
        except ImportError:
            raise NotImplementedError("--calib synthetic:N is not available yet (OuroMamba-Gen is not installed in this build)") from None
        from ouro.calib.distributed import SINGLE

        return generate_calibration(model, spec.n, seed, gen, dist=dist or SINGLE, progress=progress)
    raise ImageFolderError(f"unknown calibration source {spec.kind!r}")


def make_forward_loop(images: Tensor, batch_size: int = 64):
    """forward_loop(model) that runs `images` through the model in batches (for `calibrate`), each
    batch moved to the model's device."""

    def forward_loop(model) -> None:
        from ouro.calib.device import module_device

        dev = module_device(model)
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                model(images[i : i + batch_size].to(dev))

    return forward_loop
