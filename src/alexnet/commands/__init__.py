"""The `alexnet` command: a thin layer over the library. Each module here adds its commands to
the parser (`register(subparsers)`), maps the flags onto the library's dataclasses, calls the
library, and prints; `main` runs one command and turns the project's user errors
(alexnet.errors.UserError), and the filesystem's refusals of a named path (a file where a
folder should be, a read-only or full disk, no permission), into one line and exit status 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys

from alexnet.commands import bench, demo, evaluate, experiments, prepare, summary, train
from alexnet.errors import UserError

MODULES = (summary, prepare, train, evaluate, demo, experiments, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alexnet",
        description="AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012), faithfully, on PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        # What the user gave is wrong (a flag, a file, a store): one line, not a traceback.
        print(f"alexnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A path the filesystem refused (a file where a folder should be, a read-only or full
        # disk, no permission) is the user's to fix, not a bug: one line naming it.
        if not filesystem_error(e):
            raise
        print(f"alexnet {args.command}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


# What the filesystem says about a path the user gave or the place it is on.
FILESYSTEM_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EACCES", "EPERM", "EEXIST", "ENOTDIR", "EISDIR", "EROFS", "ENOSPC", "EDQUOT",
                 "EFBIG", "ENAMETOOLONG", "ELOOP", "ENOENT", "EMLINK", "ETXTBSY")
    if hasattr(errno, name)
)  # fmt: skip


def filesystem_error(e: OSError) -> bool:
    """Whether `e` is the filesystem refusing a named path (not a bug of the program)."""
    return e.filename is not None and e.errno in FILESYSTEM_ERRNOS and bool(e.strerror)
