"""Where a command writes: checked before any work, so that a path it cannot write (a file
where a folder should be, a folder under a file, a read-only filesystem, no permission) is one
line at the start, not a traceback after minutes of work (alexnet.errors.CannotWrite)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from alexnet.data.store import FORMAT, MANIFEST, WORK_DIR
from alexnet.errors import BadInput, CannotWrite


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(".")


def _why_not_writable(folder: Path) -> str:
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "a read-only filesystem"
    except OSError:
        pass
    return "no permission to write there"


def check_output(path: str | os.PathLike, flag: str, folder: bool = True) -> Path:
    """`path` if the command can create it (or write into it, when it exists): a folder when
    `folder`, else a file. CannotWrite naming `flag` and the reason otherwise. Creates
    nothing."""
    path = Path(path)
    where = _nearest_existing(path)
    if where == path:
        if folder and not path.is_dir():
            raise CannotWrite(f"{flag} {path} is a file, not a folder")
        if not folder and path.is_dir():
            raise CannotWrite(f"{flag} {path} is a folder, not a file")
        target = path if folder else path.parent
    else:
        if not where.is_dir():
            raise CannotWrite(f"{flag} {path}: {where} is a file, not a folder")
        target = where
    if not os.access(target, os.W_OK | os.X_OK):
        raise CannotWrite(f"{flag} {path}: cannot write in {target}: {_why_not_writable(target)}")
    return path


def make_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """check_output, then the folder made (with its parents); an OSError is CannotWrite."""
    path = check_output(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CannotWrite(f"{flag} {path}: cannot create it: {e.strerror or e}") from None
    return path


def inside_store(path: str | os.PathLike) -> Path | None:
    """The prepared store (alexnet prepare) that `path` is or lies in, if any: its manifest,
    or the work folder of a prepare not yet finished."""
    path = Path(os.path.abspath(path))
    for p in (path, *path.parents):
        if (p / WORK_DIR).is_dir():
            return p
        try:
            if json.loads((p / MANIFEST).read_text()).get("format") == FORMAT:
                return p
        except (OSError, ValueError, AttributeError):
            continue
    return None


def refuse_store(path: str | os.PathLike, flag: str) -> None:
    """BadInput if `path` is, or lies in, a prepared store: a run written there would mix with
    the store's files (and a re-prepare would remove it)."""
    store = inside_store(path)
    if store is not None:
        where = "is" if store == Path(os.path.abspath(path)) else f"lies in {store},"
        raise BadInput(f"{flag} {path} {where} a prepared store: choose a folder outside it")
