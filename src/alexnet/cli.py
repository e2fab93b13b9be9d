"""The `alexnet` command: one subcommand per job, each defined next to the code it runs.

Every module listed in COMMAND_MODULES exposes `add_commands(subparsers)`, which adds its
subcommands with `parser.set_defaults(func=...)`; `func(args)` returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "alexnet.summary",
    "alexnet.data.prepare",
    "alexnet.bench",
    "alexnet.train",
    "alexnet.evaluate",
    "alexnet.demo",
    "alexnet.experiments.figure1",
    "alexnet.experiments.ablate",
    "alexnet.experiments.recipes",
    "alexnet.experiments.kernels",
    "alexnet.experiments.neighbors",
    "alexnet.experiments.report",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alexnet",
        description="AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012), faithfully, on PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        # User errors (bad profile, missing file, ...) are one clear line, not a traceback.
        print(f"alexnet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
