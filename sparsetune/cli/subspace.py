"""``sparsetune subspace fit|train|landscape``: a unified optimisation subspace of deltas.

``fit`` reads delta files and writes a subspace file; ``train`` and ``landscape`` run the
embedded MiniLM (the base the deltas must come from: same task head seed) on an offline task.
"""

from __future__ import annotations

import argparse

COMMANDS = ("subspace",)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..data import TASKS
    from ..subspace import FIT_METHODS

    parser = sub.add_parser(
        "subspace",
        help="fit a low-dimensional subspace to fine-tuned deltas, train or map inside it",
        description="A unified optimisation subspace theta = theta0 + M U z (Yi et al., 2022) "
        "fitted to delta files of one base model.",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    fit = actions.add_parser("fit", help="fit a subspace to delta files and save it")
    fit.add_argument("deltas", nargs="+", metavar="DELTA", help="delta .safetensors files")
    fit.add_argument("--dim", type=int, required=True, help="subspace dimension d")
    fit.add_argument("--method", choices=FIT_METHODS, default="svd",
                     help="svd (zero-filled PCA) or joint (each delta seen on its support); "
                     "default: %(default)s")
    fit.add_argument("--labels", nargs="+", metavar="LABEL",
                     help="one label per delta (default: each delta's method)")
    fit.add_argument("--output", required=True, help="subspace .safetensors file to write")

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("subspace", help="a subspace .safetensors file")
        p.add_argument("--task", default="rotten_tomatoes", choices=TASKS,
                       help="offline task (default: %(default)s)")
        p.add_argument("--model-seed", type=int, default=0,
                       help="seed of the base model's task head, as when the deltas were made "
                       "(default: %(default)s)")
        p.add_argument("--max-examples", type=int, default=None,
                       help="use a seeded subset of the task")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--max-length", type=int, default=64)
        p.add_argument("--mask", metavar="FILE",
                       help="decode the subspace on this mask or delta's support (default: "
                       "every coordinate)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    train = actions.add_parser("train", help="train only the d coordinates z on a task")
    model_options(train)
    train.add_argument("--steps", type=int, default=100)
    train.add_argument("--lr", type=float, default=1e-2)
    train.add_argument("--output", help="write theta(z) as a delta file of the base")
    landscape = actions.add_parser("landscape", help="loss heat map of a 2-D plane, as a PNG")
    model_options(landscape)
    landscape.add_argument("--grid", type=int, default=11, help="points per axis")
    landscape.add_argument("--axes", type=int, nargs=2, default=[0, 1], metavar="I")
    landscape.add_argument("--examples", type=int, default=128,
                           help="validation examples per grid point (default: %(default)s)")
    landscape.add_argument("--output", required=True, help="PNG file to write")


def run(args: argparse.Namespace) -> None:
    from ..workflows import fit_subspace_files, subspace_landscape, train_in_subspace

    if args.action == "fit":
        space, path = fit_subspace_files(args.deltas, args.dim, args.output, method=args.method,
                                         labels=args.labels)
        print(space.summary())
        print(f"wrote {path}")
        return
    common = dict(task=args.task, model_seed=args.model_seed, max_examples=args.max_examples,
                  batch_size=args.batch_size, max_length=args.max_length, mask=args.mask,
                  progress=not args.no_progress)
    if args.action == "train":
        report = train_in_subspace(args.subspace, steps=args.steps, lr=args.lr,
                                   output=args.output, **common)
        print(report.summary())
        return
    result = subspace_landscape(args.subspace, args.output, grid=args.grid,
                                axes=tuple(args.axes), examples=args.examples, **common)
    print(f"loss on the {args.grid}x{args.grid} grid: min {float(result.values.min()):.4f}, "
          f"max {float(result.values.max()):.4f}")
    print(f"wrote {args.output}")
