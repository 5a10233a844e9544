"""``sparsetune bound``: the stability and generalisation bounds (theory/ E3, E4) of a model and
mask on a task, with the constants measured on a slice of its training split."""

from __future__ import annotations

import argparse

COMMANDS = ("bound",)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..data import TASKS

    bound = sub.add_parser(
        "bound",
        help="stability and generalisation bounds (theory/ E3, E4) of a model and mask",
        description="Measure rho, C, Lambda_min and Lambda_max of a model for a mask on a slice "
        "of a task's training split, and print the stability (E3) and generalisation (E4) "
        "bounds at the mask's density and over a grid of densities. Needs eager attention "
        "(Hessian-vector products), which this command loads.",
    )
    bound.add_argument(
        "--model", default="embedded", metavar="PATH",
        help="a transformers sequence-classification folder, or 'embedded' for the embedded "
        "all-MiniLM-L6-v2 with a head seeded by --seed, as `sparsetune demo` builds it "
        "(default: %(default)s)",
    )
    bound.add_argument(
        "--delta", metavar="FILE", help="a sparse delta file to apply to the model first (e.g. "
        "demo_output/delta.safetensors: the fine-tuned model)",
    )
    bound.add_argument("--data", required=True, metavar="NAME|csv:FILE",
                       help=f"a task, one of {', '.join(TASKS)}, or csv:FILE with columns text "
                       "and label")
    bound.add_argument("--mask", required=True, metavar="FILE", help="a mask .safetensors file")
    bound.add_argument(
        "--num-examples", type=int, default=16,
        help="training examples the constants are measured on (default: %(default)s)",
    )
    bound.add_argument(
        "--n", type=int, default=None,
        help="training examples n in the bounds (default: the task's training split size)",
    )
    bound.add_argument("--lam", type=float, default=1.0,
                       help="the lambda of 2 lam (1 - p), theory/ E3 (default: %(default)s)")
    bound.add_argument("--failure-probability", type=float, default=0.05,
                       help="delta of E4 (default: %(default)s)")
    bound.add_argument("--tol", type=float, default=1e-2,
                       help="relative accuracy of Lanczos (default: %(default)s)")
    bound.add_argument("--max-length", type=int, default=64, help="tokens per text")
    bound.add_argument("--batch-size", type=int, default=8)
    bound.add_argument("--seed", type=int, default=0, help="data split and head seed")
    bound.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    bound.add_argument("--plot", metavar="FILE", help="also write a PNG of the bounds vs p")
    bound.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> None:
    from ..files import check_writable
    from ..workflows import diagnose_for_task

    check_writable(args.json, args.plot)  # before minutes of Hessian-vector products
    report = diagnose_for_task(
        args.data, args.mask, model=None if args.model == "embedded" else args.model,
        delta=args.delta, num_examples=args.num_examples, n=args.n, lam=args.lam,
        failure_probability=args.failure_probability, tol=args.tol,
        max_length=args.max_length, batch_size=args.batch_size, seed=args.seed,
        progress=not args.no_progress,
    )
    print(report)
    if args.json:
        print(f"wrote {report.write_json(args.json)}")
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")
