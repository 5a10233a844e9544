"""``sparsetune info FILE``: describe a mask or delta file."""

from __future__ import annotations

import argparse

COMMANDS = ("info",)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="describe a mask or delta file (kind, density, per layer)")
    info.add_argument("file", help="a .safetensors file written by sparsetune")


def run(args: argparse.Namespace) -> None:
    from ..files import describe_file

    print(describe_file(args.file))
