"""Writing files safely: the one atomic writer every module uses (ONNX, QuantState, engines, reports),
and the write plan that checks every file a run will write before the run starts.

    atomic_write(path, content, *, force=True) -> path
content: bytes, or a function that writes a given temporary path (e.g. `lambda tmp: onnx.save(m, tmp)`).
The data goes to a temporary file in the same folder, is flushed to disk, gets the permissions a
plain `open(path, "w")` would give it (0666 minus the umask: 0644 under the usual umask 022, the
same for every output), and is moved into place: a reader never sees a partial file, and an error
or Ctrl-C leaves nothing behind (nor a changed old file).
force=False is no-clobber, atomically: the temporary file is hard-linked to `path` (exclusive
create: fails when `path` exists), so of two concurrent writers exactly one wins and the other gets
an OutputError; the existence check and the move are one step.

    plan = WritePlan(force=args.force)
    plan.add("-o", "m.onnx"); plan.add("--report", "r.json", siblings=("r.sqnr.png",))
    plan.check()        # collisions, existing files (without force), writable folder, path length
"""
from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["OutputError", "WritePlan", "atomic_write", "check_path_length", "check_writable_parent", "check_creatable_folder",
           "check_new_file"]

_TMP_PREFIX, _TMP_SUFFIX = ".ouro-", ".tmp"  # short, so a temporary name fits wherever the final name fits


class OutputError(ValueError):
    """A bad output request (existing file without --force, unwritable folder, ...); the message says what to change."""

    user_facing = True


def _limit(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def _exists(p: Path) -> bool:
    try:
        return os.path.lexists(p)
    except OSError:  # e.g. a component longer than the file system allows
        return False


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute().parent
    while not _exists(p) and p != p.parent:
        p = p.parent
    return p


def check_path_length(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse a file name or path the file system cannot hold (instead of `OSError: File name too long`)."""
    path = Path(path)
    anchor = _existing_ancestor(path)
    name_max = _limit(anchor, "PC_NAME_MAX", 255)
    path_max = _limit(anchor, "PC_PATH_MAX", 4096)
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise OutputError(f"{what} name {part[:40]}... is too long ({len(os.fsencode(part))} bytes; this file system "
                              f"allows at most {name_max} per name): give a shorter name")
    if len(os.fsencode(str(path.absolute()))) >= path_max:
        raise OutputError(f"{what} path {str(path)[:40]}... is too long ({len(os.fsencode(str(path.absolute())))} bytes; "
                          f"at most {path_max - 1}): give a shorter path")
    return path


def check_writable_parent(path: str | os.PathLike, what: str = "output") -> Path:
    """The folder that will hold `path` exists and is writable; else an OutputError naming it."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {path}: folder {parent} is not writable")
    return path


def check_creatable_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """A folder that exists and is writable, or that can be created: its nearest existing ancestor is
    a writable folder; a name and path the file system holds. Else an OutputError naming it."""
    path = check_path_length(path, what)
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{what} {path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{what} {path} is not writable")
        return path
    above = _existing_ancestor(path / "x")
    if not above.is_dir():
        raise OutputError(f"cannot create {what} {path}: {above} is not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {what} {path}: folder {above} is not writable")
    return path


def check_new_file(path: str | os.PathLike, *, force: bool, what: str = "output") -> Path:
    """All checks of one output file before any work: name/path length, not a folder, existence
    (unless force), writable parent folder."""
    path = check_path_length(path, what)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; give a file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise OutputError(f"{path} already exists; pass --force to overwrite it")
    return check_writable_parent(path, what)


def _mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, content: bytes | Callable[[Path], object], *, force: bool = True) -> Path:
    """Write `content` to `path` atomically (module docstring). force=False: an existing file is an
    OutputError, decided at the moment the file appears (no window between check and move)."""
    path = Path(path)
    if not force and (path.exists() or path.is_symlink()):
        raise OutputError(f"{path} already exists; pass --force to overwrite it")
    check_path_length(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        if isinstance(content, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            content(Path(tmp))
        os.chmod(tmp, _mode())  # mkstemp creates 0600; give the file the usual permissions
        if force:
            os.replace(tmp, path)
        else:
            _link_new(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # after a rename: nothing; after a link: the extra name
    return path


def _link_new(tmp: Path, path: Path) -> None:
    """Give `tmp`'s file the name `path` only if `path` does not exist (atomic exclusive create)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputError(f"{path} already exists (another process wrote it while this one ran); "
                          "nothing was overwritten; pass --force to overwrite it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # a file system without hard links: reserve the name with an exclusive create, then move over it
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise OutputError(f"{path} already exists (another process wrote it while this one ran); "
                              "nothing was overwritten; pass --force to overwrite it") from None
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------- output plan
@dataclass(frozen=True)
class PlannedFile:
    path: Path
    what: str  # the flag or role that asks for it, for messages: "-o", "--save-calib", "--report plot"


@dataclass
class WritePlan:
    """Every file one run will write, declared and checked before the run does any work.

    check() refuses (OutputError, one line): two outputs on the same file, an existing file
    without force, a folder that does not exist or is not writable, a name or path too long.
    Writing goes through `write` (atomic_write with the plan's force: no-clobber without it)."""

    force: bool = False
    files: list[PlannedFile] = field(default_factory=list)

    def add(self, what: str, path: str | os.PathLike | None, siblings: Iterable[str | os.PathLike] = ()) -> None:
        """Declare `path` (skipped when None), and the files written beside it (e.g. plots)."""
        if path is None:
            return
        self.files.append(PlannedFile(Path(path), what))
        for s in siblings:
            self.files.append(PlannedFile(Path(s), f"{what} (beside it)"))

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(f.path for f in self.files)

    def check(self) -> WritePlan:
        seen: dict[str, PlannedFile] = {}
        for f in self.files:
            key = os.path.normcase(os.path.abspath(f.path))
            if key in seen:
                first = seen[key]
                raise OutputError(f"{first.what} and {f.what} would both write {f.path}; give them different file names")
            seen[key] = f
        for f in self.files:
            check_new_file(f.path, force=self.force, what=f.what)
        return self

    def write(self, path: str | os.PathLike, content: bytes | Callable[[Path], object]) -> Path:
        return atomic_write(path, content, force=self.force)
