"""A run folder (`alexnet train --out RUN`): where a run writes, who holds it, and whether a
command starts, restarts or resumes the run in it. One object makes that decision for
`alexnet train`, `alexnet demo` and the studies (RunFolder.hold).

Where a command writes is checked before any work, so that a path it cannot write (a file
where a folder should be, a folder under a file, a read-only filesystem, no permission) is one
line at the start, not a traceback after minutes of work (alexnet.errors.CannotWrite).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

from alexnet.config import RunConfig, RunSpec, check_profile, check_run_config, profile_from_dict
from alexnet.data.store import FORMAT, MANIFEST, WORK_DIR
from alexnet.errors import AlreadyExists, BadInput, CannotWrite, NotFound
from alexnet.fileio import LOCK_NAME, exclusive_lock, read_json

RUN_FORMAT = "alexnet-run/1"
# The files of a run folder (alexnet.train's docstring): a path to one of them names its run.
RUN_FILES = ("config.json", "state.pt", "model.safetensors", "metrics.jsonl", "curves.png")


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


def _as_json(x):
    return json.loads(json.dumps(x, default=str))


class RunFolder:
    """The folder of one training run. `RunFolder(path)` accepts the folder or a file in it
    (`--resume runs/a/state.pt` is runs/a)."""

    def __init__(self, path: str | os.PathLike, flag: str = "--out"):
        path = Path(path)
        if path.name in RUN_FILES and not path.is_dir() and (path.parent / "config.json").exists():
            path = path.parent
        self.path, self.flag = path, flag

    def __str__(self) -> str:
        return str(self.path)

    def read_spec(self) -> RunSpec:
        """The configuration the folder's config.json records, checked (a store given as a
        relative path is the one recorded in full where the run started, whatever the working
        directory now)."""
        path = self.path / "config.json"
        if not path.exists():
            raise NotFound(f"{path}: not a run folder (no config.json)")
        try:
            saved = json.loads(path.read_text())
            if saved.get("format") != RUN_FORMAT:
                raise BadInput(f"{path}: not a run of this program")
            profile, run = profile_from_dict(saved["profile"]), RunConfig(**saved["run"])
            store = (saved.get("derived") or {}).get("store")
            if isinstance(run.data, str) and not Path(run.data).is_absolute() and store:
                run = dataclasses.replace(run, data=str(store))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
            raise BadInput(f"{path}: empty, incomplete or corrupt run configuration") from None
        try:
            return RunSpec(check_profile(profile), check_run_config(run))
        except BadInput as e:
            raise BadInput(f"{path}: {e}") from None

    def started_by(self, spec: RunSpec) -> bool:
        """Whether a new run `spec` may use this folder: False if it holds nothing of a run,
        True if it holds a run that never reached its first checkpoint and that the same
        configuration started (config.json, no state.pt: a run killed early, or a torchrun
        restart before the first checkpoint), which then starts over. AlreadyExists for
        anything else."""
        out = self.path
        if not (out / "state.pt").exists():
            if not (out / "config.json").exists():
                return False
            saved = read_json(out / "config.json")
            mine = spec.to_dict()
            if isinstance(saved, dict) and all(_as_json(mine[k]) == saved.get(k) for k in mine):
                return True
        raise AlreadyExists(
            f"{out} already holds a run; continue it with --resume {out}, or choose another "
            f"{self.flag}"
        )

    @contextlib.contextmanager
    def hold(self, spec: RunSpec, resume: bool) -> Iterator[bool]:
        """Take the folder for the block (InUse if another command has it) and yield whether
        the run resumes from it: `resume`, or a new run whose own start (same configuration,
        no checkpoint yet) is there. A new run's folder is checked and made first; if the block
        fails before the run wrote anything, a folder this call made is removed again (no empty
        run folder holding only its lock)."""
        out = self.path
        made: list[Path] = []  # the folders this call creates, the run folder first
        if not resume:
            refuse_store(out, self.flag)
            made = [p for p in (out, *out.parents) if not p.exists()]
            make_output_folder(out, self.flag)
        try:
            with exclusive_lock(out):
                yield resume or self.started_by(spec)
        except BaseException:
            if made:
                with contextlib.suppress(OSError):
                    if [p.name for p in out.iterdir()] in ([], [LOCK_NAME]):
                        (out / LOCK_NAME).unlink(missing_ok=True)
                        for folder in made:  # runs/x, then runs/ if this call made it
                            folder.rmdir()
            raise
