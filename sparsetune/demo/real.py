"""The real-model demo (``sparsetune demo``): the embedded MiniLM on an offline text task.

:func:`run_real_demo` is the paper's experiment in a few minutes on a CPU: the embedded
all-MiniLM-L6-v2 gets a fresh classification head and is fine-tuned on one of the offline tasks
of :mod:`sparsetune.data` three ways, on the same steps, batches and dropout draws: with a
selected mask (SAM by default), with a random mask of the same density and head, and in full.
It measures the scores, the trained entries, the optimizer state and the wall time of each, and
saves the mask, the sparse delta and a plot.
"""

from __future__ import annotations

import copy
import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import data
from .._checks import check_density, check_int, check_positive
from ..delta import SparseDelta
from ..errors import CurvatureError, InvalidArgumentError
from ..mask import SCOPES, Mask
from ..select import METHODS, method_info, method_spec, select
from .results import (
    DEFAULT_LRS,
    FULL_FINE_TUNING,
    UNTUNED_LR,
    RealDemoResult,
    RealDemoRow,
    plot,
)
from .training import fine_tune, first

__all__ = ["REAL_DEMO_METHODS", "run_real_demo"]

#: Methods ``run_real_demo`` can select with: every registered method that gives one fixed mask
#: with no extra rules (``names`` needs regexes; ``child_tuning_f`` is an optimizer).
REAL_DEMO_METHODS: tuple[str, ...] = tuple(
    m for m in METHODS if method_info(m).family != "optimizer" and m != "names"
)
_EVAL_BATCH = 64


def _constant_score(labels: list[int], prediction: int, metric: str) -> float:
    """The metric of predicting ``prediction`` for every example."""
    hits = sum(label == prediction for label in labels)
    if metric == "accuracy":
        return hits / len(labels)
    positives = sum(label == 1 for label in labels)
    tp, fp = (positives, len(labels) - positives) if prediction == 1 else (0, 0)
    fn = positives - tp
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _evaluate(model: nn.Module, batches: data.Batches, metric: str, desc: str, progress: bool):
    return data.evaluate(
        model, tqdm(batches, desc=desc, disable=not progress, leave=False), metric
    )


_BOUND_EXAMPLES = 4  # training examples the E3/E4 constants are measured on
_BOUND_MAX_LENGTH = 32  # tokens per example there: every Lanczos step is a pass over them


def _stability_diagnostics(model: nn.Module, mask: Mask, train: data.Split, tokenizer: object,
                           max_length: int, progress: bool) -> object:
    """``bounds.diagnose`` of the tuned model on its first training examples (Lanczos to 1%),
    with n = the training split; eager attention for the Hessian-vector products, then SDPA
    again. A Lanczos failure is reported as text rather than ending the demo."""
    from .. import bounds

    sample = first(train, _BOUND_EXAMPLES)
    model.set_attn_implementation("eager")
    try:
        return bounds.diagnose(
            model, None, data.batches(sample, tokenizer, batch_size=len(sample),
                                      max_length=min(max_length, _BOUND_MAX_LENGTH)),
            mask, n=len(train), tol=1e-2, progress=progress,
        )
    except CurvatureError as e:
        return f"no diagnostics: {e}"
    finally:
        model.set_attn_implementation("sdpa")


def run_real_demo(
    task: str = "rotten_tomatoes",
    method: str = "sam",
    density: float = 0.005,
    steps: int = 150,
    batch_size: int = 16,
    max_length: int = 64,
    seed: int = 0,
    output_dir: str | Path = "demo_output",
    progress: bool = True,
    *,
    scope: str = "global",
    select_batches: int = 40,
    validation_examples: int = 500,
    test_examples: int = 1000,
    max_examples: int | None = None,
    lr_scales: Sequence[float] = (1.0,),
) -> RealDemoResult:
    """Fine-tune the embedded MiniLM on ``task`` with a ``method`` mask, a random mask and in full.

    1. ``data.load_task(task, seed=seed, max_examples=max_examples)``; the first
       ``validation_examples`` and ``test_examples`` of those splits are scored, and training
       batches are drawn from the whole training split (reshuffled at every pass).
    2. ``data.load_model(num_labels, seed=seed)`` (SDPA attention): the base, never modified.
    3. ``select(base, method, density, data=train batches, num_batches=select_batches,
       always_train=data.HEAD_PARAMETERS, scope=scope)`` with the default loss
       ``model(**batch).loss``; then a random mask with the same budget and head.
    4. Each method trains a fresh copy of the base for ``steps`` steps on the same batches and
       dropout draws, lr warmup (10%) then linear decay, no weight decay: the masks with
       :class:`SparseAdamW` and full fine-tuning with ``torch.optim.AdamW``, each at its peak
       lr in :data:`DEFAULT_LRS`. ``lr_scales`` (for example ``(0.5, 1, 2)``) trains
       each method once per scale of its default lr and keeps the run with the best validation
       score: the same rule for every method, and the test split is read only for that run.
    5. Writes ``mask.safetensors`` (the ``method`` mask), ``delta.safetensors`` (its fine-tuned
       model as a :class:`SparseDelta` of the base) and ``demo.png`` into ``output_dir``.

    With the defaults it takes under 3 minutes on 2 idle CPU cores (0.25 s per training step,
    0.33 s in full) and about 3 times as long when other work shares them.
    ``method`` is one of :data:`REAL_DEMO_METHODS`; ``bitfit`` ignores ``density`` (its density
    is what the rule gives). Deterministic for a ``seed`` on a given machine.
    """
    start = time.perf_counter()
    if task not in data.TASKS:
        raise InvalidArgumentError(f"unknown task={task!r}; valid tasks: {', '.join(data.TASKS)}")
    if method not in REAL_DEMO_METHODS:
        raise InvalidArgumentError(
            f"method must be one of {', '.join(REAL_DEMO_METHODS)} (a fixed mask), got "
            f"method={method!r}"
        )
    uses_density = method_info(method).uses_density
    if uses_density:
        check_density(density)
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {list(SCOPES)}, got scope={scope!r}")
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("max_length", max_length),
        ("select_batches", select_batches),
        ("validation_examples", validation_examples),
        ("test_examples", test_examples),
    ):
        check_int(name, value)
    check_int("seed", seed, minimum=0)
    scales = tuple(check_positive("lr_scales entry", s) for s in lr_scales)
    if not scales:
        raise InvalidArgumentError("lr_scales must hold at least one scale, got an empty one")
    if importlib.util.find_spec("matplotlib") is None:
        raise data.DataUnavailableError(
            "the demo plots with matplotlib, which is not installed; "
            "install it with `pip install 'sparsetune[plot]'`"
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    task_data = data.load_task(task, seed=seed, max_examples=max_examples)
    train = task_data.train
    validation = first(task_data.validation, validation_examples)
    test = first(task_data.test, test_examples)
    for name, split in (("training", train), ("validation", validation), ("test", test)):
        if not len(split):
            raise InvalidArgumentError(
                f"the {name} split of {task!r} is empty (max_examples={max_examples!r}); "
                "pass a larger max_examples"
            )
    base, tokenizer = data.load_model(task_data.num_labels, seed=seed, attn_implementation="sdpa")
    base_state = {n: p.detach().clone() for n, p in base.named_parameters()}

    def batches_of(split: data.Split, shuffle: bool, batch: int, batches_seed: int = seed):
        return data.batches(
            split, tokenizer, batch_size=batch, max_length=max_length, shuffle=shuffle,
            seed=batches_seed,
        )

    majority = max(range(task_data.num_labels), key=train.labels.count)
    head = data.HEAD_PARAMETERS
    result = RealDemoResult(
        task=task,
        metric=task_data.metric,
        method=method,
        density=0.0,
        scope=scope,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        n_train=len(train),
        n_validation=len(validation),
        n_test=len(test),
        select_batches=min(select_batches, len(batches_of(train, True, batch_size))),
        majority_score=_constant_score(test.labels, majority, task_data.metric),
        num_parameters=sum(p.numel() for p in base.parameters()),
        head_entries=sum(base_state[n].numel() for n in head),
        lr_scales=scales,
    )

    # Masks: the method's, then a random one with the same budget (and the head in both).
    masks: dict[str, tuple[str, Mask | None, float]] = {}  # label -> (method, mask, seconds)
    tick = time.perf_counter()
    select_data = batches_of(train, True, batch_size, seed + 1)
    options: dict[str, object] = {}
    if method_info(method).needs_data:
        options = {"progress": progress}
        options[method_spec(method).count_option] = select_batches
    mask = select(
        base, method, density if uses_density else None, data=select_data, scope=scope,
        seed=seed, always_train=head, **options,
    )
    result.density = mask.density
    label = f"{method} p={mask.density:.2g}"
    masks[label] = (method, mask, time.perf_counter() - tick)
    if method != "random":
        tick = time.perf_counter()
        p = density if uses_density else min(1.0, (mask.num_selected + 0.5) / mask.num_total)
        random_mask = select(base, "random", p, scope=scope, seed=seed, always_train=head)
        seconds = time.perf_counter() - tick
        masks[f"random p={random_mask.density:.2g}"] = ("random", random_mask, seconds)
    masks[FULL_FINE_TUNING] = (FULL_FINE_TUNING, None, 0.0)
    result.mask, result.mask_summary = mask, mask.summary(max_rows=8)

    val_batches = batches_of(validation, False, _EVAL_BATCH)
    test_batches = batches_of(test, False, _EVAL_BATCH)
    for row_label, (row_method, row_mask, select_seconds) in masks.items():
        default_lr = DEFAULT_LRS.get(row_method, UNTUNED_LR)
        best: tuple[float, float, nn.Module, list[float], int, float, float] | None = None
        by_lr: dict[float, float] = {}
        for scale in scales:
            lr = default_lr * scale
            model = copy.deepcopy(base)
            suffix = f" lr {lr:.0e}" if len(scales) > 1 else ""
            tick = time.perf_counter()
            losses, state_bytes = fine_tune(
                model, row_mask, batches_of(train, True, batch_size), steps, lr, seed,
                f"fine-tuning {row_label}{suffix}", progress,
            )
            train_seconds = time.perf_counter() - tick
            tick = time.perf_counter()
            score = _evaluate(
                model, val_batches, task_data.metric, f"validating {row_label}{suffix}", progress
            )
            by_lr[lr] = score
            if best is None or score > best[0]:
                best = (score, lr, model, losses, state_bytes, train_seconds,
                        time.perf_counter() - tick)
        score, lr, model, losses, state_bytes, train_seconds, eval_seconds = best
        tick = time.perf_counter()
        test_score = _evaluate(
            model, test_batches, task_data.metric, f"testing {row_label}", progress
        )
        eval_seconds += time.perf_counter() - tick
        frozen = None
        if row_mask is not None:
            frozen = all(
                torch.equal(p.detach()[~row_mask[n]], base_state[n][~row_mask[n]])
                for n, p in model.named_parameters()
            )
        result.rows.append(
            RealDemoRow(
                method=row_label,
                optimizer="torch.optim.AdamW" if row_mask is None else "SparseAdamW",
                lr=lr,
                trained_entries=(
                    result.num_parameters if row_mask is None else row_mask.num_trainable
                ),
                optimizer_state_bytes=state_bytes,
                validation_score=score,
                test_score=test_score,
                select_seconds=select_seconds,
                train_seconds=train_seconds,
                eval_seconds=eval_seconds,
                losses=losses,
                frozen_entries_unchanged=frozen,
                validation_by_lr=by_lr,
            )
        )
        if row_mask is mask:
            result.model = model
            result.files["mask"] = mask.save(out / "mask.safetensors", method=method)
            delta = SparseDelta.extract(model, base_state, mask, method=method)
            result.files["delta"] = delta.save(out / "delta.safetensors")
        del model, best

    if result.model is not None and result.mask is not None:
        result.stability = _stability_diagnostics(result.model, result.mask, train, tokenizer,
                                                  max_length, progress)
    result.files["plot"] = out / "demo.png"
    plot(result, result.files["plot"])
    result.seconds = time.perf_counter() - start
    return result
