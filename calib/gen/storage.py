"""The output folder of `ouro-export gen`: written as it goes, resumable, never half-written.

Layout of a folder (every file is written through ouro.calib.files.atomic_write, the one atomic
writer: to a temporary name beside it, then moved into place, so an interrupt leaves either the
whole file or none of it; gen.json and images.npz no-clobber, so a concurrent run loses cleanly):

    gen.json            the run's identity: model fingerprint, n, seed, mini-batch size, GenConfig
    batch_00000.npz     one finished mini-batch: global image indices, images (normalised), targets
    img_00000.png ...   8-bit images, written with their mini-batch
    images.npz          all n images, written when the last mini-batch is in (then the batch files go)

`GenFolder.open(path, identity, force=)` refuses a non-empty folder of another run (or of no run),
and returns the mini-batches a previous, interrupted run of the same identity already finished.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..files import OutputError, atomic_write, check_creatable_folder

__all__ = ["NPZ_NAME", "MANIFEST", "GenFolderError", "GenFolder", "check_output_folder", "model_fingerprint", "write_pngs",
           "load_synthetic_dir"]

NPZ_NAME = "images.npz"
MANIFEST = "gen.json"
FORMAT = "ouro-gen"
FORMAT_VERSION = 1


class GenFolderError(ValueError):
    """An output folder that cannot be used for this run; the message says what to do."""

    user_facing = True


def check_output_folder(path: str | os.PathLike, *, force: bool = False) -> Path:
    """The checks of a Gen output folder that need no model, run before any work (GenRequest): a name
    and path the file system holds, not a file, a folder this run may write (an existing writable
    folder, or a writable existing folder above it to create it in), and a non-empty folder only if
    it is an `ouro-export gen` run's (resumed, or another run refused once the model is known) or
    with --force. A one-line GenFolderError otherwise."""
    try:
        out = check_creatable_folder(path, "gen output folder")
    except OutputError as e:
        raise GenFolderError(str(e)) from None
    if out.is_dir() and not force and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise GenFolderError(_NOT_A_RUN.format(out=out))
    return out


_NOT_A_RUN = ("output folder {out} is not empty and holds no " + MANIFEST + " of an `ouro-export gen` run; "
              "pass --force to overwrite it or choose another -o")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's architecture and parameter values (first 16 hex digits)."""
    h = hashlib.sha256(json.dumps(getattr(model, "cfg").to_dict(), sort_keys=True).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _npz_writer(**arrays) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare path
            np.savez(f, **arrays)

    return write


def write_pngs(folder: Path, indices: list[int], images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """img_<index>.png, 8-bit RGB (or grey), denormalised with mean / std."""
    from PIL import Image

    x = images.detach().float().cpu()
    m = torch.tensor(mean, dtype=torch.float32, device="cpu").view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device="cpu").view(1, -1, 1, 1)
    pix = ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, a in zip(indices, pix):
        img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        # replace: a resumed run rewrites the PNGs of the mini-batch that was cut short
        atomic_write(folder / f"img_{i:05d}.png", lambda tmp, img=img: img.save(tmp, format="PNG"), force=True)


@dataclass
class GenFolder:
    """A resumable Gen output folder (module docstring)."""

    path: Path
    identity: dict
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def open(cls, path: str | Path, identity: dict, mean, std, *, force: bool = False) -> tuple["GenFolder", dict[int, tuple[Tensor, Tensor]]]:
        """The folder and the finished mini-batches {batch: (images, targets)} of an interrupted run of
        the same identity; a fresh folder when it is empty (or `force`)."""
        out = Path(path)
        if out.exists() and not out.is_dir():
            raise GenFolderError(f"output {out} exists and is not a folder")
        folder = cls(out, identity, tuple(mean), tuple(std))
        man = out / MANIFEST
        if force and out.is_dir():
            for f in out.iterdir():
                if f.is_file() and (f.name == MANIFEST or f.name == NPZ_NAME or f.name.startswith(("batch_", "img_", ".batch_", ".img_"))
                                  or (f.name.startswith(".ouro-") and f.name.endswith(".tmp"))):
                    f.unlink()
        if out.is_dir() and any(out.iterdir()) and not man.is_file():
            raise GenFolderError(_NOT_A_RUN.format(out=out))
        out.mkdir(parents=True, exist_ok=True)
        done: dict[int, tuple[Tensor, Tensor]] = {}
        if man.is_file():
            old = json.loads(man.read_text())
            if old.get("identity") != identity:
                diff = sorted(k for k in set(identity) | set(old.get("identity", {})) if identity.get(k) != old.get("identity", {}).get(k))
                raise GenFolderError(f"output folder {out} holds another generation run (differs in {', '.join(diff)}); "
                                     "rerun the same command to resume it, or pass --force to start over")
            done = folder._finished()
        else:
            # no-clobber: of two runs started on one empty folder, the second stops here
            try:
                atomic_write(man, json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "identity": identity},
                                             indent=1).encode(), force=False)
            except OutputError as e:
                raise GenFolderError(f"output folder {out}: {e}") from None
        return folder, done

    def _finished(self) -> dict[int, tuple[Tensor, Tensor]]:
        done = {}
        if (self.path / NPZ_NAME).is_file():
            with np.load(self.path / NPZ_NAME) as z:
                x, t = torch.from_numpy(z["images"].copy()), torch.from_numpy(z["targets"].copy())
            bs = self.identity["batch_size"]
            return {b: (x[i:i + bs], t[i:i + bs]) for b, i in enumerate(range(0, x.shape[0], bs))}
        for f in sorted(self.path.glob("batch_*.npz")):
            with np.load(f) as z:
                done[int(f.stem.split("_")[1])] = (torch.from_numpy(z["images"].copy()), torch.from_numpy(z["targets"].copy()))
        return done

    def complete(self) -> bool:
        return (self.path / NPZ_NAME).is_file()

    def write_batch(self, b: int, indices: list[int], images: Tensor, targets: Tensor) -> None:
        """A finished mini-batch: its PNGs, then batch_<b>.npz (whose presence marks it finished)."""
        write_pngs(self.path, indices, images, self.mean, self.std)
        atomic_write(self.path / f"batch_{b:05d}.npz", force=True, content=_npz_writer(
            indices=np.asarray(indices, dtype=np.int64), images=images.detach().float().cpu().numpy(),
            targets=targets.detach().cpu().numpy()))

    def finish(self, images: Tensor, targets: Tensor) -> Path:
        """images.npz with all images; then the per-batch files are removed."""
        atomic_write(self.path / NPZ_NAME, force=False, content=_npz_writer(
            images=images.detach().float().cpu().numpy(), targets=targets.detach().cpu().numpy(),
            mean=np.array(self.mean, dtype=np.float32), std=np.array(self.std, dtype=np.float32)))
        for f in self.path.glob("batch_*.npz"):
            f.unlink()
        return self.path


def load_synthetic_dir(path: str | Path, *, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> Tensor:
    """Images (n, C, H, W) in normalised model-input space from a folder written by `ouro-export gen`:
    images.npz when present (exact floats), else the PNGs normalised with the given mean/std."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"synthetic image folder {p} does not exist")
    npz = p / NPZ_NAME
    if npz.is_file():
        with np.load(npz) as z:
            return torch.from_numpy(z["images"].copy()).float()
    if (p / MANIFEST).is_file():
        raise FileNotFoundError(f"{p} holds an unfinished `ouro-export gen` run ({len(list(p.glob('batch_*.npz')))} mini-batches); "
                                "rerun the same gen command to finish it")
    pngs = sorted(p.glob("*.png"))
    if not pngs:
        raise FileNotFoundError(f"{p} holds neither {NPZ_NAME} nor PNG images")
    if mean is None or std is None:
        raise ValueError(f"{p} has PNGs but no {NPZ_NAME}: give mean and std of the model's input transform")
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(f)) for f in pngs]).astype(np.float32) / 255.0
    x = torch.from_numpy(arr)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != len(mean):
        raise ValueError(f"PNGs in {p} have {x.shape[1]} channels, normalisation has {len(mean)}")
    cpu = torch.device("cpu")
    return (x - torch.tensor(mean, device=cpu).view(1, -1, 1, 1)) / torch.tensor(std, device=cpu).view(1, -1, 1, 1)
