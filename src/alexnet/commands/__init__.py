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
import re
import sys

import alexnet
from alexnet.commands import bench, demo, evaluate, experiments, prepare, summary, train
from alexnet.errors import UserError

MODULES = (summary, prepare, train, evaluate, demo, experiments, bench)

# A paragraph of a module docstring that is a note for the code's readers, not for a user
# (e.g. "Why one file of this length: ..."): left out of --help.
_DEVELOPER_NOTE = re.compile(r"\n\s*\n(?:Why |Design:|Implementation note)")


class Parser(argparse.ArgumentParser):
    """The parser of every command and sub-command (add_parser makes subparsers of the parent's
    class): no abbreviated flags (argparse would take `--model 2` for `--model-parallel 2`),
    and a description without the developer notes of the docstring it is often taken from."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        description = kwargs.get("description")
        if description:
            kwargs["description"] = _DEVELOPER_NOTE.split(description, maxsplit=1)[0].rstrip()
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="alexnet",
        description="AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012), faithfully, on PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"alexnet {alexnet.__version__}")
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
