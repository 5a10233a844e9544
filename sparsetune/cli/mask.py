"""``sparsetune mask``: compute a mask for a model folder and a data set, save it to a file."""

from __future__ import annotations

import argparse
import json
from typing import Any

COMMANDS = ("mask",)


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, true/false, null, lists
    except json.JSONDecodeError:
        return key, value  # a plain string (a regex, a method name)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..data import TASKS

    mask = sub.add_parser(
        "mask",
        help="select the entries to fine-tune with any method and save the mask",
        description="Select a mask of a transformers model (a sequence classifier for the "
        "data's labels) with any selection method, and save it as a compact .safetensors "
        "file that records the model it fits. Methods: see `sparsetune.METHODS`.",
    )
    mask.add_argument("--method", required=True, help="a selection method, e.g. sam, random")
    mask.add_argument("--density", type=float, help="p in (0, 1] (methods with a budget)")
    mask.add_argument(
        "--model", metavar="PATH",
        help="a local transformers model folder (default: the embedded all-MiniLM-L6-v2)",
    )
    mask.add_argument(
        "--data", metavar="NAME|csv:FILE",
        help=f"a task ({', '.join(TASKS)}) or a CSV file with text,label columns; needed by "
        "data-driven methods",
    )
    mask.add_argument("-o", "--output", required=True, help="the mask file to write")
    mask.add_argument("--scope", choices=["global", "per_tensor"], default="global",
                      help="top-k over all parameters or per tensor (default: %(default)s)")
    mask.add_argument("--seed", type=int, default=0,
                      help="seed of the splits, batches, head and method (default: %(default)s)")
    mask.add_argument("--num-batches", type=int,
                      help="training batches the method reads (default: the method's own)")
    mask.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    mask.add_argument("--max-length", type=int, default=64,
                      help="tokens per text (default: %(default)s)")
    mask.add_argument("--max-examples", type=int,
                      help="use a seeded subset of the data set of this size")
    mask.add_argument("--num-labels", type=int,
                      help="labels of the head when no --data is given (default: 2)")
    mask.add_argument(
        "--always-train", nargs="*", metavar="NAME",
        help="parameters trained in full, outside the budget (default: the classifier head; "
        "give the flag with no names for none)",
    )
    mask.add_argument(
        "--targets", nargs="+", metavar="TARGET",
        help="only these parameters get entries (the budget stays p of the whole model): "
        "module names as peft's target_modules ('query value': their weights), 'all-linear', "
        "or regexes of parameter names, e.g. 'attention\\.self\\.(query|value)\\.weight$'",
    )
    mask.add_argument(
        "-O", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
        help="a method option, e.g. -O curvature_method=ggn -O floor_fraction=0.05 "
        "(values are read as JSON when they parse, else as text)",
    )
    mask.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> None:
    from ..workflows import save_mask_for_task

    path, mask = save_mask_for_task(
        args.output, args.method, args.density, model=args.model, data=args.data,
        scope=args.scope, seed=args.seed, num_batches=args.num_batches,
        batch_size=args.batch_size, max_length=args.max_length, max_examples=args.max_examples,
        num_labels=args.num_labels, always_train=args.always_train, targets=args.targets,
        progress=not args.no_progress, options=dict(args.option),
    )
    print(f"{path}: {mask!r}")
