"""Files that survive crashes: atomic writes, JSON and text, checksums.

Every write is atomic (`atomic_write`): a temporary file in the same folder, flushed and
fsynced, renamed over the target with os.replace, then the folder fsynced. A crash at any moment
leaves either the old file or the new one, never a torn file. Written files get the usual
permissions (0666 minus the umask), like any file the user creates. A write that fails (the disk
full, a quota) raises CannotWrite naming the file: one line for the user, the old file kept.
A writer killed mid-write (SIGKILL, a power loss) leaves its temporary file (.NAME.PID-XXXXXXXX.tmp,
up to a checkpoint's size); the next writer of that folder removes such files whose process is
gone (`remove_stale_temporaries`).

`exclusive_lock` keeps two commands from writing one folder (a run, a store) at once.
`read_regular_file` reads a whole file only if it is a regular file of bounded size: a FIFO or a
device would block or never end, a huge file would fill the memory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from alexnet.errors import CannotWrite, InUse


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk (POSIX; not on Windows).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Recording:
    """A file object that remembers the first OSError of its writes: torch's zip writer turns
    one (ENOSPC, EDQUOT, EFBIG) into a RuntimeError whose message has lost the reason."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


# atomic_write's temporary files: ".NAME.PID-XXXXXXXX.tmp" (mkstemp's eight random characters),
# and ".NAME.XXXXXXXX.tmp" as written before the process id was part of the name.
_TEMP = re.compile(r"\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[a-z0-9_]{8}\.tmp")
_STARTED = time.time()  # this process's start (near enough: its first write comes later)
_SWEPT: set[str] = set()  # folders whose stale temporary files this process removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove atomic_write's temporary files in `folder` that no writer will finish: those of a
    process that is gone (the process id in the name; the folder lock keeps writers of one
    folder on one machine), and those written before process ids were in the names whose file
    exists and that are older than this process. Nothing else (another name, a live writer's
    file, a file of another kind) is touched. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP.fullmatch(e.name)
        if m is None:
            continue
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            if m["pid"] is not None:
                pid = int(m["pid"])
                if pid == os.getpid() or _alive(pid):
                    continue
            elif not (
                os.path.exists(os.path.join(folder, m["name"]))
                and e.stat(follow_symlinks=False).st_mtime < _STARTED
            ):
                continue
            os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO[bytes]], Any]) -> Path:
    """Write `path` atomically: `write_fn(f)` writes to a binary temporary file in the same
    folder, which is flushed, fsynced and renamed over `path`. On any error (or Ctrl-C) the
    temporary file is removed and the previous `path`, if any, is left untouched; an OSError
    (the disk full, a quota, no permission) becomes CannotWrite, one line naming `path`."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    key = os.path.realpath(folder)
    if key not in _SWEPT:  # a killed writer's leftovers, once per folder and process
        remove_stale_temporaries(folder)
        _SWEPT.add(key)
    tmp, rec = None, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            rec = _Recording(f)
            write_fn(rec)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        cause = e if isinstance(e, OSError) else (rec.error if rec is not None else None)
        if cause is None or isinstance(e, CannotWrite | KeyboardInterrupt):
            raise
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise CannotWrite(f"cannot write {path}: {cause.strerror or cause}{kept}") from None
    _fsync_dir(folder)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """JSON written atomically (a reader, or a resumed run, never sees half a file)."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in `path`, or None when it is missing or unreadable (then the work is redone)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- reading whole files -----------------------------------------------------------------------

# The largest file read whole into memory as one image (`alexnet prepare --max-file-mb`): the
# biggest photographs are tens of MB; a multi-GB file in a class folder is not an image.
MAX_FILE_BYTES = 256 * 2**20

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = MAX_FILE_BYTES) -> bytes:
    """The bytes of `path` if it is a regular file of at most `max_bytes`; OSError otherwise,
    without blocking: a FIFO is opened non-blocking and refused, a device or a socket refused,
    a larger file refused before any of it is read."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise OSError(errno.EINVAL, f"not a regular file ({kind})", str(path))
        if max_bytes is not None and st.st_size > max_bytes:
            raise OSError(errno.EFBIG, _too_big(st.st_size, max_bytes), str(path))
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)  # a file still growing
    if max_bytes is not None and len(data) > max_bytes:
        raise OSError(errno.EFBIG, _too_big(len(data), max_bytes), str(path))
    return data


def _too_big(size: int, limit: int) -> str:
    return f"{size / 2**20:.1f} MiB, over the {limit / 2**20:g} MiB limit for one image file"


# --- one writer per folder ---------------------------------------------------------------------

LOCK_NAME = ".lock"
_HELD: dict[str, list] = {}  # real path of a locked folder -> [descriptor, depth], this process


def _forget_locks_in_child() -> None:
    # A forked child (a prepare or loader worker) gets a copy of the descriptor, and with it a
    # share of the flock: were it to outlive its parent, the folder would stay locked. Closing
    # the copy leaves the parent's lock as it is.
    for fd, _depth in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold `folder` exclusively for as long as the block runs: fcntl.flock on folder/.lock,
    which holds the holder's process id. Re-entrant in one process (a command and the library
    call inside it both take it). Another process holding it: InUse("FOLDER is in use by
    process N") at once, without waiting. The kernel drops the lock when the holder exits, even
    killed, so a stale lock file never blocks a rerun."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    held = _HELD.get(key)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise CannotWrite(f"cannot lock {folder}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        by = f"process {holder}" if holder.isdigit() else "another process"
        raise InUse(
            f"{folder} is in use by {by} (another alexnet command is writing it); wait for it "
            "to end, or stop it"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        os.close(fd)  # releases the lock
