"""Where ouro's native libraries are: one finder for all of them.

    find_library(name, explicit=None) -> Path | None
    library_candidate(name, explicit=None) -> Path   where it is looked for (exists or not: for messages)
    expected_path(name) -> Path                      where the in-tree build puts it

name          file                      environment variable   built by
ouro_kernels      libouro_kernels.so       OURO_KERNELS_LIB       cmake -S trt_plugins -B build/trt (CUDA kernels, C ABI)
ouro_trt_plugins  libouro_trt_plugins.so   OURO_TRT_PLUGINS       the same build with the TensorRT headers
ouro_ort_ops      libouro_ort_ops.so       OURO_ORT_OPS_LIB       the same build with the onnxruntime headers

Order: `explicit` (a path the user gave, e.g. --plugin-lib), else the library's environment
variable, else the in-tree build folder build/trt/ of this source checkout. A path given explicitly
or through the variable must exist (NativeLibraryError names it); the in-tree build is optional
(None when absent). A new native library adds one line to LIBRARIES.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LIBRARIES", "IN_TREE_BUILD_DIR", "NativeLibrary", "NativeLibraryError", "find_library", "library_candidate",
           "expected_path", "repo_root"]

IN_TREE_BUILD_DIR = Path("build") / "trt"
"""The in-tree CMake build directory (README: cmake -S trt_plugins -B build/trt ...)."""


@dataclass(frozen=True)
class NativeLibrary:
    file: str
    env: str


LIBRARIES: dict[str, NativeLibrary] = {
    "ouro_kernels": NativeLibrary("libouro_kernels.so", "OURO_KERNELS_LIB"),
    "ouro_trt_plugins": NativeLibrary("libouro_trt_plugins.so", "OURO_TRT_PLUGINS"),
    "ouro_ort_ops": NativeLibrary("libouro_ort_ops.so", "OURO_ORT_OPS_LIB"),
}


class NativeLibraryError(ValueError):
    """A library path given explicitly or through its environment variable does not exist."""

    user_facing = True


def repo_root() -> Path:
    """The source checkout this module lives in (editable install); the in-tree build is under it."""
    return Path(__file__).resolve().parents[1]


def _lib(name: str) -> NativeLibrary:
    if name not in LIBRARIES:
        raise KeyError(f"unknown native library {name!r}; known: {', '.join(LIBRARIES)}")
    return LIBRARIES[name]


def expected_path(name: str) -> Path:
    """Where the in-tree build puts library `name`."""
    return repo_root() / IN_TREE_BUILD_DIR / _lib(name).file


def _candidate(name: str, explicit) -> tuple[Path, str]:
    lib = _lib(name)
    if explicit is not None:
        return Path(explicit), f"{lib.file} given as {explicit}"
    env = os.environ.get(lib.env)
    if env:
        return Path(env), f"${lib.env}={env}"
    return expected_path(name), ""


def library_candidate(name: str, explicit: str | os.PathLike | None = None) -> Path:
    """Where library `name` is looked for, by the order of the module docstring (it may not exist)."""
    return _candidate(name, explicit)[0]


def find_library(name: str, explicit: str | os.PathLike | None = None) -> Path | None:
    """The library file (module docstring), or None when it is nowhere to be found."""
    path, given = _candidate(name, explicit)
    if path.is_file():
        return path
    if given:
        raise NativeLibraryError(f"{given} does not exist")
    return None
