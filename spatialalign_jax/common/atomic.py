"""Atomic writes of files and folders: a process killed mid-write leaves the old output or the new one,
whole, never a torn one. Files are also synced before the rename; folders are not (a power loss is
the filesystem's to survive). Standard library only, so the scoring process can use it without JAX."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

_UMASK = os.umask(0)  # read once, at import (setting it back at once); os has no way to only read it
os.umask(_UMASK)
PLAIN_FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file: readable by others unless the umask says not


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The file at `path` or at one of its parents, which a folder there would need to replace; None
    when the path (or what exists of it) runs through folders only."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def is_empty_folder(path: str | os.PathLike) -> bool:
    """A real folder (not a link to one) with nothing in it, hidden files included."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def check_output(path: str | os.PathLike, *, overwrite: bool, flag: str = "--overwrite",
                 what: str = "destination") -> Path:
    """The one rule for an output path that may already exist, checked before any work:

    - nothing there, or an empty folder: it is written;
    - anything else (a folder with files, a file, a link): refused unless `overwrite` (the message
      names `flag`), and then replaced as a whole, atomically, by `atomic_output`;
    - a path that runs through a file is refused either way.

    Missing parent folders are fine: `atomic_output` creates them. Raises FileExistsError.
    """
    path = Path(path)
    blocking = file_in_the_way(path.parent)
    if blocking is not None:
        raise FileExistsError(f"{what} {str(path)!r} lies under {str(blocking)!r}, which is a file; "
                              f"choose another {what}")
    if (path.exists() or path.is_symlink()) and not (overwrite or is_empty_folder(path)):
        kind = "a folder with files in it" if path.is_dir() and not path.is_symlink() else \
            "a link" if path.is_symlink() else "a file"
        raise FileExistsError(f"{what} {str(path)!r} already exists ({kind}); pass {flag} to replace all of "
                              f"it, or choose a new or empty folder")
    return path


def give_plain_mode(path: str | os.PathLike) -> None:
    """Undoes an owner-only mode that a library writer chose (safetensors' `save_file` writes 0600), so
    that exports are readable by other users and services, as a file written with open() is."""
    os.chmod(path, PLAIN_FILE_MODE)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary file beside `path` for the body to write; when the body succeeds it is synced
    and renamed over `path`, when it fails it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, PLAIN_FILE_MODE)  # mkstemp makes it owner-only; the output gets a plain file's mode
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh path beside `path` for the body to create, as a file or a folder; when the body
    succeeds it replaces `path`, when it fails (an exception, Ctrl-C) it is removed and `path` is
    untouched.

    A folder cannot be renamed over a non-empty one (nor over a file), so the old output is moved aside
    first. For the instant between the two renames nothing is at `path`; an interruption there puts
    the old output back, and after a kill there the next `atomic_output` of `path` does.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.exists() or path.is_symlink()):  # a kill between the renames: the old output goes back
        aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.lstat().st_mtime)
        if aside:
            os.replace(aside[-1], path)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    old = path.with_name(f".{path.name}.old-{tag}")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        if (path.is_dir() and not path.is_symlink()) or (tmp.is_dir() and (path.exists() or path.is_symlink())):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        if old.exists() or old.is_symlink():
            if path.exists() or path.is_symlink():
                _remove(old)
            else:  # interrupted between the renames: the old output goes back
                os.replace(old, path)
        _remove(tmp)
