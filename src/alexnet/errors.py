"""The project's error types for users.

A `UserError` is a problem with what the user gave: a flag, a file, a store, a run folder. The
commands print its message as one line (`alexnet CMD: error: ...`) and exit with status 2; any
other exception is a bug and keeps its traceback. Each subclass is also the built-in exception
a Python caller would expect, so `except ValueError` / `except FileNotFoundError` still work.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave is wrong; the message names it and says what to do."""


class BadInput(UserError, ValueError):
    """A bad value: a flag, a config field, the content of a file or a store."""


class NotFound(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class AlreadyExists(UserError, FileExistsError):
    """The output the user named already holds something that must not be overwritten."""


class InUse(UserError, BlockingIOError):
    """A run folder or store that another process is writing (see fileio.exclusive_lock)."""


class CannotWrite(UserError, OSError):
    """A file could not be written (the disk full, a quota, a file-size limit, a read-only
    folder); the previous version of the file, if any, is kept (fileio.atomic_write)."""


class WorkerDied(UserError, RuntimeError):
    """A worker process died (killed by the OOM killer, a crash in an image decoder): the work
    already done is kept, and the same command resumes it."""
