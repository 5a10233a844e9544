"""Command line ``sparsetune <command>``: parses arguments and calls the API, nothing more.

Each command lives in its own module of this package, with ``COMMANDS`` (the sub-command names
it handles), ``add_parsers(subparsers)`` and ``run(args)``. Bad input exits with status 2 and one
line on stderr, without a traceback; so does a file that cannot be read or written (any
``OSError``). When the reader of stdout goes away (``sparsetune info FILE | head -5``) the
command stops quietly with status 1, as Python's own documentation recommends for SIGPIPE.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from .. import __version__
from ..errors import SparsetuneError

# Order is the order of ``sparsetune --help``.
_MODULES = ("demo", "mask", "delta", "bound", "subspace", "info")


def _command_modules() -> list[ModuleType]:
    modules = []
    for name in _MODULES:
        try:
            modules.append(importlib.import_module(f"{__name__}.{name}"))
        except ModuleNotFoundError as exc:  # a command not written yet
            if exc.name != f"{__name__}.{name}":
                raise
    return modules


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    """The argument parser and which module runs each sub-command."""
    parser = _Parser(
        prog="sparsetune", description="Theory-driven sparse fine-tuning of PyTorch models."
    )
    parser.add_argument("--version", action="version", version=f"sparsetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    owners: dict[str, ModuleType] = {}
    for module in _command_modules():
        module.add_parsers(sub)
        owners.update(dict.fromkeys(module.COMMANDS, module))
    return parser, owners


def main(argv: Sequence[str] | None = None) -> int:
    parser, owners = build_parser()
    args = parser.parse_args(argv)
    try:
        owners[args.command].run(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except BrokenPipeError:
        return _stdout_closed()
    except (SparsetuneError, OSError) as exc:
        print(f"sparsetune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _stdout_closed() -> int:
    """Point stdout at devnull: Python flushes it again at exit, which would raise once more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 1
