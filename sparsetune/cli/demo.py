"""``sparsetune demo`` and ``sparsetune demo-digits``: the end-to-end demos."""

from __future__ import annotations

import argparse

COMMANDS = ("demo", "demo-digits")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..data import TASKS
    from ..demo import REAL_DEMO_METHODS

    demo = sub.add_parser(
        "demo",
        help="fine-tune the embedded MiniLM on a real task: a selected mask vs a random mask "
        "vs full fine-tuning (about 3 minutes on 2 CPU cores)",
        description="Fine-tune the embedded all-MiniLM-L6-v2 on an offline text-classification "
        "task with a selected mask, a random mask of the same density, and in full, on the same "
        "steps; print scores, trained entries, optimizer state and wall time per method; save "
        "the mask, the sparse delta and a plot. No network access.",
    )
    demo.add_argument(
        "--task", default="rotten_tomatoes", metavar="TASK",
        help=f"one of {', '.join(TASKS)} (default: %(default)s)",
    )
    demo.add_argument(
        "--method", default="sam", metavar="METHOD",
        help=f"mask selection method, one of {', '.join(REAL_DEMO_METHODS)} (default: "
        "%(default)s)",
    )
    demo.add_argument(
        "--density", type=float, default=0.005, help="mask density p in (0, 1] (default: "
        "%(default)s)",
    )
    demo.add_argument(
        "--steps", type=int, default=150, help="fine-tuning steps per method (default: "
        "%(default)s)",
    )
    demo.add_argument(
        "--scope", choices=["global", "per_tensor"], default="global",
        help="top-k over all parameters (the paper's theorem) or per tensor (default: "
        "%(default)s)",
    )
    demo.add_argument(
        "--lr-scales", type=float, nargs="+", default=[1.0], metavar="SCALE",
        help="train each method once per scale of its default learning rate and keep the best "
        "on the validation split, e.g. --lr-scales 0.5 1 2 (slower: one run per scale)",
    )
    demo.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    demo.add_argument(
        "--output-dir", default="demo_output",
        help="where the mask, delta and plot are written (default: %(default)s)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    digits = sub.add_parser(
        "demo-digits",
        help="the same story in seconds: a small MLP on scikit-learn's digits",
    )
    digits.add_argument("--density", type=float, default=0.02, help="mask density p in (0, 1]")
    digits.add_argument("--scope", choices=["per_tensor", "global"], default="per_tensor")
    digits.add_argument("--steps", type=int, default=300, help="fine-tuning steps per method")
    digits.add_argument("--n-train", type=int, default=100, help="labelled fine-tuning examples")
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--lr", type=float, default=1e-2)


def run(args: argparse.Namespace) -> None:
    if args.command == "demo":
        from ..demo import run_real_demo
        from ..files import check_writable

        check_writable(args.output_dir, folder=True)  # before minutes of training
        result = run_real_demo(
            task=args.task, method=args.method, density=args.density, steps=args.steps,
            seed=args.seed, output_dir=args.output_dir, progress=not args.no_progress,
            scope=args.scope, lr_scales=args.lr_scales,
        )
    else:
        from ..demo import run_digits_demo

        result = run_digits_demo(
            density=args.density, steps=args.steps, n_train=args.n_train, seed=args.seed,
            lr=args.lr, scope=args.scope,
        )
    print(result.report())
