"""``sparsetune delta extract|apply|merge``: sparse task deltas between model folders."""

from __future__ import annotations

import argparse

COMMANDS = ("delta",)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..delta import MERGE_POLICIES

    delta = sub.add_parser(
        "delta", help="extract, apply or merge sparse task deltas (theta - theta0 on a mask)",
        description="Sparse task deltas: the change of a fine-tuned model from its base on the "
        "entries of a mask, as a small .safetensors file that refuses any other base.",
    )
    actions = delta.add_subparsers(dest="action", required=True)
    extract = actions.add_parser(
        "extract", help="the delta between a base and a tuned model folder, on a mask",
        description="Write theta - theta0 on the mask's entries. The tuned model must equal "
        "the base outside the mask (use --masked-only to keep only the masked change).",
    )
    extract.add_argument("--base", metavar="PATH",
                         help="the base model folder (default: the embedded all-MiniLM-L6-v2)")
    extract.add_argument("--tuned", required=True, metavar="PATH",
                         help="the fine-tuned model folder (save_pretrained)")
    extract.add_argument("--mask", required=True, metavar="FILE", help="a sparsetune mask file")
    extract.add_argument("-o", "--output", required=True, help="the delta file to write")
    extract.add_argument("--seed", type=int, default=0,
                         help="seed of a head the base folder lacks (default: %(default)s)")
    extract.add_argument("--masked-only", action="store_true",
                         help="allow changes outside the mask and drop them")

    apply = actions.add_parser(
        "apply", help="apply a delta to its base and save the tuned model folder",
        description="Load the base, check it is the delta's base (fingerprint), write "
        "theta0 + scale * dtheta and save a transformers model folder.",
    )
    apply.add_argument("--base", metavar="PATH",
                       help="the base model folder (default: the embedded all-MiniLM-L6-v2)")
    apply.add_argument("--delta", required=True, metavar="FILE", help="a sparsetune delta file")
    apply.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                       help="a new folder for the tuned model")
    apply.add_argument("--scale", type=float, default=1.0,
                       help="theta0 + scale * dtheta (default: %(default)s)")

    merge = actions.add_parser(
        "merge", help="combine deltas of the same base into one",
        description="Unite the supports of deltas over the same base and combine their changes.",
    )
    merge.add_argument("deltas", nargs="+", metavar="FILE", help="sparsetune delta files")
    merge.add_argument("-o", "--output", required=True, help="the merged delta file to write")
    merge.add_argument("--policy", choices=MERGE_POLICIES, default="sum",
                       help="overlapping entries: add, average, refuse, or the sparse-aware "
                       "'ties' (trim, elect a sign, average) and 'dare' (random drop and "
                       "rescale) (default: %(default)s)")
    merge.add_argument("--density", type=float, metavar="P",
                       help="ties: the fraction of each delta's entries kept (default 0.2); "
                       "dare: the probability an entry survives (default 0.1); in (0, 1]")
    merge.add_argument("--seed", type=int,
                       help="dare: seed of the random drop (default 0)")


def run(args: argparse.Namespace) -> None:
    from ..workflows import apply_to_pretrained, extract_from_pretrained, merge_delta_files

    if args.action == "extract":
        delta = extract_from_pretrained(args.base, args.tuned, args.mask, seed=args.seed,
                                        strict=not args.masked_only, output=args.output)
        print(f"{args.output}: {delta!r}")
    elif args.action == "apply":
        print(f"{apply_to_pretrained(args.base, args.delta, args.output, scale=args.scale)}: "
              f"tuned model saved")
    else:
        path, merged = merge_delta_files(args.deltas, args.output, policy=args.policy,
                                         density=args.density, seed=args.seed)
        print(f"{path}: {merged!r}")
