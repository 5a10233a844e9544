"""Quality benchmark: the paper's Table 1 question on the embedded MiniLM and real data.

Every method fine-tunes the embedded all-MiniLM-L6-v2 (``sparsetune.data.load_model``) on the
offline tasks of :mod:`sparsetune.data` under one protocol, and the script prints and writes a
table of test scores, mean +- std over seeds (F1 of the spam class for ``sms_spam``).

Protocol (the defaults; ``--quick`` shrinks every number for a smoke run):

* **Budget.** 200 optimizer steps of batch 16, texts truncated to 64 tokens, peak lr with a
  linear warmup over the first 10% of the steps then a linear decay to 0 (the real demo's
  schedule), AdamW betas (0.9, 0.999), no weight decay, dropout on while training. The same
  steps, batches and dropout draws for every method at a seed.
* **Sparsity.** Every sparse method trains p = 0.5% of the model's entries (global top-k) plus
  the task head (``classifier.*``, always trained, outside the budget). One more row,
  ``sam_per_tensor``, is SAM with p of every tensor (the authors' code) instead of global
  top-k: global SAM spends 62% of its budget on the pooler (``benchmarks/mask_anatomy.py``);
  ``sam_fisher``, SAM's g^2 / h with h the empirical Fisher diagonal (Adam's v); and
  ``sam_probe``, SAM's g^2 taken after the head alone is trained on the selection batches
  (training itself starts from the same theta0 and head as every method).
  Per-step random methods (Child-Tuning-F, Mixout) keep a fraction p of the entries per step;
  LoRA's rank is the one whose added entries come nearest p m; BitFit trains what its rule
  gives (all biases, 0.12%).
* **Selection data.** Data-driven selections see the same 40 training batches (a seeded
  shuffle of their own): SAM, SAM with curvature and ChildPruning score them; LT-SFT and
  DiffPruning train on them for 40 steps before choosing. Not counted in the 200 steps.
* **Learning rates.** One rule for every method: each method has a default peak lr (its
  family's; :data:`DEFAULT_LRS`), is trained at default x (1/3, 1, 3) on the lr-selection task
  (Rotten Tomatoes) with seed 0, and keeps the lr with the best validation score; that lr is
  then fixed for every task and seed. The test split is never read to choose. When the winner
  is at an edge of the grid and strictly beats its neighbour, the grid grows one more factor of
  3 past that edge, at most twice (:func:`pick_lr`); a choice still at an edge is flagged.
* **Data.** Splits are ``load_task(task, seed=0)`` for every run (the seed varies the model's
  head, batch order, dropout, random masks and selection batches, not the test set): the whole
  training split, the first 500 validation and the first 1,000 test examples.
* **Seeds.** 0, 1, 2 (seed 0 is also the lr-selection run).

Density sweep (``--sweep``): SAM against a random mask on Rotten Tomatoes at
p in {0.1%, 0.5%, 2%, 5%, 20%}, with the training split capped at 1,600 examples (two passes in
200 steps) so that the empirical risk is measured on the whole training sample. Each (method, p)
chooses its lr by the same rule around default x sqrt(0.5% / p) (a larger mask wants a smaller
lr). It reports train and test loss and score, the generalisation gap (test minus train loss),
and the pointwise-stability bound of theory/ E3, 2 rho^2 / ((Lambda_min + 2 lambda (1 - p)) n),
with constants estimated by ``sparsetune.bounds`` when that module is present; the plot
``density_sweep.png`` draws both.

Resumable: each run (task, method, density, seed, lr) writes its own JSON under
``<output-dir>/runs/``; a run whose file exists is skipped, so the script can be stopped and
re-invoked to fill the table over several sittings. Several workers may share one output
folder (one per core): each run is claimed with a ``<key>.claim`` file first, so no run is
trained twice, and a worker whose next step needs another worker's run waits for it. After
every run the summary ``quality.json`` and ``table.md`` are rewritten atomically. Methods whose
code is not in the package yet are listed as not available and run when invoked again later.

Usage::

    .venv/bin/python -m benchmarks.quality                       # everything, in this order:
        # lr selection on Rotten Tomatoes, its seeds, the density sweep, the other tasks
    .venv/bin/python -m benchmarks.quality --tasks rotten_tomatoes --no-sweep
    .venv/bin/python -m benchmarks.quality --quick --output-dir /tmp/q   # seconds, a smoke run
    .venv/bin/python -m benchmarks.quality --summary-only        # rebuild table from runs/
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import importlib.util
import itertools
import json
import math
import os
import shlex
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import sparsetune
from benchmarks._common import environment, write_json
from sparsetune import Mask, SparseAdamW, data, optimizer_state_nbytes, select
from sparsetune._loss import cycle
from sparsetune.bounds import effective_curvature, estimate_constants, stability_bound
from sparsetune.demo import first, warmup_then_decay
from sparsetune.errors import InvalidArgumentError, StateMismatchError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "quality"
FULL = "full"
REFERENCE_DENSITY = 0.005  # the paper's p; the lr defaults below are for it
SWEEP_METHODS = ("sam", "random")
EVAL_BATCH = 64

#: Default peak lr of each method at p = 0.5%: the grid is default x LR_SCALES. Fixed masks
#: trained by SparseAdamW use the real demo's validated rates (sam 1e-3, random 1e-2, full
#: 2e-4); every other chosen mask takes SAM's 1e-3 (same optimizer, a mask of the same size);
#: Child-Tuning-F's Adam update shrinks by about sqrt(p) (the first moment sees g, the second
#: g^2 / p), so it starts at full fine-tuning's rate / sqrt(p), rounded; Mixout trains every
#: entry, so it starts at full fine-tuning's; LoRA and adapters at 1e-3, their usual rate.
DEFAULT_LRS: dict[str, float] = {
    FULL: 2e-4,
    "random": 1e-2,
    "mixout": 2e-4,
    "child_tuning_f": 3e-3,
    "bitfit": 1e-3,
    "magnitude": 1e-3,
    "lora": 1e-3,
    "adapter": 1e-3,
    "diff_pruning": 1e-3,
    "child_pruning": 1e-3,
    "lt_sft": 1e-3,
    "sam": 1e-3,
    "sam_curvature": 1e-3,
    "sam_per_tensor": 1e-3,
    "sam_fisher": 1e-3,
    "sam_probe": 1e-3,
}
METHOD_ORDER: tuple[str, ...] = tuple(DEFAULT_LRS)
LR_SCALES = (1 / 3, 1.0, 3.0)
#: How many times the lr grid may grow past an edge that wins (see :func:`pick_lr`).
LR_EXTENSIONS = 2
#: How often a worker looks again at runs other workers hold (seconds).
CLAIM_POLL_SECONDS = 30.0


# =============================================================================================
# Configuration


@dataclass(frozen=True)
class Protocol:
    """Everything that makes two runs comparable; stored in every run file and checked."""

    steps: int = 200
    batch_size: int = 16
    max_length: int = 64
    density: float = REFERENCE_DENSITY
    select_batches: int = 40
    validation_examples: int = 500
    test_examples: int = 1000
    sweep_train_examples: int = 1600
    max_examples: int | None = None  # a seeded subset of each data set (quick runs only)
    warmup_fraction: float = 0.1  # sparsetune.demo's schedule


QUICK = Protocol(
    steps=4,
    batch_size=4,
    max_length=16,
    select_batches=2,
    validation_examples=16,
    test_examples=16,
    sweep_train_examples=16,
    max_examples=200,
)


@dataclass(frozen=True)
class RunSpec:
    """One training run; its file name is its identity."""

    task: str
    method: str
    density: float | None  # None: the method takes no density (full, bitfit)
    seed: int
    lr: float
    sweep: bool = False  # training split capped at Protocol.sweep_train_examples

    @property
    def key(self) -> str:
        p = "rule" if self.density is None else f"p{self.density:g}"
        kind = "sweep" if self.sweep else "table"
        return f"{kind}__{self.task}__{self.method}__{p}__seed{self.seed}__lr{self.lr:.3g}"


# =============================================================================================
# Methods: each one is a small recipe that builds the model to train and its optimizers


@dataclass
class Setup:
    """What a recipe builds: the model to train, its optimizers, and what may move."""

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    mask: Mask | None = None  # entries allowed to move; None: any entry may move
    details: dict[str, Any] = field(default_factory=dict)
    finish: Callable[[], None] | None = None  # after the last step, before measuring


@dataclass
class RunContext:
    """What a recipe may use: a fresh copy of the base model and the selection data."""

    model: nn.Module  # a fresh copy of the base (SDPA attention), to be trained
    density: float | None
    seed: int
    head: tuple[str, ...]
    select_data: data.Batches  # Protocol.select_batches batches are used
    select_batches: int
    eager_model: Callable[[], nn.Module]  # the same base with eager attention (curvature)
    cached_mask: Callable[[str, Callable[[], Mask]], tuple[Mask, float]]
    progress: bool = False


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str
    uses_density: bool
    build: Callable[[RunContext, float], Setup]
    missing: Callable[[], str | None] = lambda: None  # why it cannot run yet, or None


def _sparse_adamw(ctx: RunContext, mask: Mask, lr: float, **details: Any) -> Setup:
    opt = SparseAdamW(ctx.model, mask, lr=lr, weight_decay=0.0)
    return Setup(ctx.model, [opt], mask, details)


def _mask_recipe(method: str, data_option: str | None = None, eager: bool = False,
                 options_for: Callable[[RunContext], dict[str, Any]] | None = None,
                 name: str | None = None):
    """A fixed mask from ``select(base, method, ...)``, trained with SparseAdamW.

    ``name`` (default ``method``) keys the mask cache: recipes that call one method with
    different options need their own.
    """

    def build(ctx: RunContext, lr: float) -> Setup:
        def choose() -> Mask:
            options: dict[str, Any] = {} if options_for is None else options_for(ctx)
            if data_option is not None:
                options |= {data_option: ctx.select_batches, "progress": ctx.progress}
            model = ctx.eager_model() if eager else ctx.model
            return select(
                model, method, ctx.density, data=ctx.select_data if data_option else None,
                seed=ctx.seed, always_train=ctx.head, **options,
            )

        mask, seconds = ctx.cached_mask(name or method, choose)
        return _sparse_adamw(ctx, mask, lr, select_seconds=seconds, mask_density=mask.density)

    return build


def _full(ctx: RunContext, lr: float) -> Setup:
    opt = torch.optim.AdamW(ctx.model.parameters(), lr=lr, weight_decay=0.0)
    return Setup(ctx.model, [opt])


def _split_head(model: nn.Module, head: Sequence[str]) -> tuple[list, list]:
    body = [p for n, p in model.named_parameters() if n not in head and p.requires_grad]
    return body, [p for n, p in model.named_parameters() if n in head]


def _child_tuning_f(ctx: RunContext, lr: float) -> Setup:
    body, head = _split_head(ctx.model, ctx.head)
    inner = torch.optim.AdamW(body, lr=lr, weight_decay=0.0)
    body_opt = sparsetune.ChildTuningF(inner, reserve_p=ctx.density, seed=ctx.seed)
    head_opt = torch.optim.AdamW(head, lr=lr, weight_decay=0.0)
    return Setup(ctx.model, [body_opt, head_opt], details={"reserve_p": ctx.density})


def _mixout_missing() -> str | None:
    if not hasattr(sparsetune.optim, "Mixout"):
        return "sparsetune.optim.Mixout is not there yet (issue 5)"
    return None


def _mixout(ctx: RunContext, lr: float) -> Setup:
    body, head = _split_head(ctx.model, ctx.head)
    inner = torch.optim.AdamW(body, lr=lr, weight_decay=0.0)
    body_opt = sparsetune.optim.Mixout(inner, mix_p=1.0 - ctx.density, seed=ctx.seed)
    head_opt = torch.optim.AdamW(head, lr=lr, weight_decay=0.0)
    # The model holds the mixed Phi(w) between steps; finalize() writes the trained w.
    return Setup(ctx.model, [body_opt, head_opt], details={"mix_p": 1.0 - ctx.density},
                 finish=body_opt.finalize)


#: sam_curvature's h: the exact GGN diagonal (PSD, so the floor only guards flat entries) on the
#: first CURVATURE_BATCHES of the selection batches; g as sam's, on all of them.
CURVATURE_BATCHES = 8


def _curvature_options(ctx: RunContext) -> dict[str, Any]:
    fresh = copy.copy(ctx.select_data)  # its own pass counter: the same first batches as g
    count = min(CURVATURE_BATCHES, ctx.select_batches)
    return {"curvature_method": "ggn", "curvature_data": list(itertools.islice(fresh, count))}


def _fisher_options(ctx: RunContext) -> dict[str, Any]:
    """sam_fisher: h = the empirical Fisher diagonal (mean squared per-example gradient) on the
    same batches as sam_curvature's GGN. g^2 / h then ranks entries by how consistently their
    gradient points one way, which is what sets the size of an Adam step (m / sqrt(v))."""
    return _curvature_options(ctx) | {"curvature_method": "empirical_fisher"}


#: sam_probe's head warm-up: AdamW on the task head alone, one step per selection batch.
PROBE_LR = 1e-2


def _sam_probe(ctx: RunContext, lr: float) -> Setup:
    """SAM's g^2 scored after a linear probe (``select(..., head_warmup_steps=...)``): the head
    is first trained alone (body frozen) on the selection batches, so g is the gradient of a
    loss whose head means something rather than of a randomly initialised one. Training then
    starts from the same theta0 and head initialisation as every other method; only the mask
    differs from ``sam``'s. The warm-up and the scores read the same first batches (a list)."""

    def choose() -> Mask:
        read = list(itertools.islice(copy.copy(ctx.select_data), ctx.select_batches))
        return select(ctx.model, "sam", ctx.density, data=read, seed=ctx.seed,
                      always_train=ctx.head, head_warmup_steps=len(read),
                      head_warmup_lr=PROBE_LR, progress=ctx.progress)

    mask, seconds = ctx.cached_mask("sam_probe", choose)
    return _sparse_adamw(ctx, mask, lr, select_seconds=seconds, mask_density=mask.density,
                         probe_lr=PROBE_LR)


def _registry_missing(method: str, needs: str | None = None) -> Callable[[], str | None]:
    def missing() -> str | None:
        if needs is not None and importlib.util.find_spec(needs) is None:
            return f"{needs} is not installed (pip install 'sparsetune[{needs}]')"
        if method not in sparsetune.METHODS:
            return f"selection method {method!r} is not registered yet"
        return None

    return missing


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(FULL, "full", False, _full),
        Recipe("random", "random", True, _mask_recipe("random")),
        Recipe("mixout", "random (per step)", True, _mixout, _mixout_missing),
        Recipe("child_tuning_f", "random (per step)", True, _child_tuning_f),
        Recipe("bitfit", "rule", False, _mask_recipe("bitfit")),
        Recipe("magnitude", "rule", True, _mask_recipe("magnitude")),
        Recipe("lora", "rule (added modules)", True, lambda c, lr: _peft(c, lr, "lora"),
               _registry_missing("lora", "peft")),
        Recipe("adapter", "rule (added modules)", True, lambda c, lr: _peft(c, lr, "adapter"),
               _registry_missing("adapter", "peft")),
        Recipe("diff_pruning", "projection", True, _mask_recipe("diff_pruning", "steps")),
        Recipe("child_pruning", "projection", True, _mask_recipe("child_pruning", "num_batches")),
        Recipe("lt_sft", "projection", True, _mask_recipe("lt_sft", "steps")),
        Recipe("sam", "sam", True, _mask_recipe("sam", "num_batches")),
        Recipe("sam_curvature", "sam", True,
               _mask_recipe("sam_curvature", "num_batches", True, _curvature_options),
               _registry_missing("sam_curvature")),
        Recipe("sam_per_tensor", "sam", True,
               _mask_recipe("sam", "num_batches", options_for=lambda ctx: {"scope": "per_tensor"},
                            name="sam_per_tensor")),
        Recipe("sam_fisher", "sam", True,
               _mask_recipe("sam_curvature", "num_batches", True, _fisher_options,
                            name="sam_fisher"),
               _registry_missing("sam_curvature")),
        Recipe("sam_probe", "sam", True, _sam_probe),
    )
}
assert tuple(RECIPES) == METHOD_ORDER


#: peft targets: LoRA on the attention query and value (Hu et al.'s choice); "adapter" on the
#: FFN's output projection, a parallel bottleneck beside the FFN (He et al. 2022's parallel
#: adapter without its nonlinearity), since peft 0.21 has no Houlsby bottleneck adapter.
PEFT_TARGETS = {"lora": ("query", "value"), "adapter": ("output.dense",)}


def peft_rank(model: nn.Module, targets: Sequence[str], density: float) -> tuple[int, list[str]]:
    """The rank r whose added entries r (d_in + d_out) per target come nearest p m, and targets.

    ``output.dense`` also names the attention's output projection; only FFN ones (d_in > d_out)
    are kept for the adapter.
    """
    m = sum(p.numel() for p in model.parameters())
    modules = [
        (n, mod) for n, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(n.endswith(t) for t in targets)
        and (targets != PEFT_TARGETS["adapter"] or mod.in_features > mod.out_features)
    ]
    per_rank = sum(mod.in_features + mod.out_features for _, mod in modules)
    return max(1, round(density * m / per_rank)), [n for n, _ in modules]


def _peft(ctx: RunContext, lr: float, method: str) -> Setup:
    import peft

    rank, modules = peft_rank(ctx.model, PEFT_TARGETS[method], ctx.density)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=rank,
                             target_modules=modules, lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)  # lora_A's draw
        model = peft.get_peft_model(ctx.model, config)
    mask = select(model, method)  # the added entries; the head copy is always trained
    opt = SparseAdamW(model, mask, lr=lr, weight_decay=0.0)
    return Setup(model, [opt], mask, {"rank": rank, "targets": modules,
                                      "added_entries": mask.num_selected})


# =============================================================================================
# Training and measuring


def train(setup: Setup, batches: data.Batches, steps: int, seed: int, progress: bool = False,
          desc: str = "") -> tuple[list[float], bool]:
    """``steps`` steps of every optimizer in ``setup`` with warmup-then-decay of each peak lr.

    Returns the loss of every step and whether training stopped on a non-finite loss.
    """
    factor = warmup_then_decay(steps)
    peaks = [[g["lr"] for g in opt.param_groups] for opt in setup.optimizers]
    model, stream, losses = setup.model, cycle(batches), []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same dropout draws for every method
        model.train()
        for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            for opt, peak in zip(setup.optimizers, peaks):
                for group, lr in zip(opt.param_groups, peak):
                    group["lr"] = lr * factor(step)
            model.zero_grad(set_to_none=True)
            loss = model(**next(stream)).loss
            if not torch.isfinite(loss):
                break
            loss.backward()
            for opt in setup.optimizers:
                opt.step()
            losses.append(float(loss.detach()))
        model.eval()
    if setup.finish is not None:
        setup.finish()
    return losses, len(losses) < steps


@torch.no_grad()
def measure(model: nn.Module, batches: data.Batches, metric: str) -> dict[str, float]:
    """Mean cross-entropy and ``metric`` (accuracy, or F1 of class 1) of ``model`` in eval mode."""
    from sklearn.metrics import accuracy_score, f1_score

    model.eval()
    logits, labels = [], []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits.append(model(**inputs).logits.float())
        labels.append(batch["labels"])
    logit, label = torch.cat(logits), torch.cat(labels)
    loss = float(nn.functional.cross_entropy(logit, label))
    pred = logit.argmax(-1).numpy()
    if metric == "accuracy":
        score = float(accuracy_score(label.numpy(), pred))
    else:
        score = float(f1_score(label.numpy(), pred, pos_label=1, zero_division=0.0))
    return {"loss": loss, "score": score}


# =============================================================================================
# The runner: loads tasks and models once, runs what is missing, writes one JSON per run


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Runner:
    def __init__(self, protocol: Protocol, output_dir: Path, progress: bool = False,
                 bound_examples: int = 0) -> None:
        self.protocol, self.output_dir, self.progress = protocol, output_dir, progress
        self.bound_examples = bound_examples  # examples for E3's constants (0: none)
        self.runs_dir = output_dir / "runs"
        self._tasks: dict[str, data.TaskData] = {}
        self._bases: dict[tuple[int, int, str], tuple[nn.Module, Any]] = {}
        self._masks: dict[tuple, tuple[Mask, float]] = {}
        self.failures: dict[str, str] = {}
        self.new_runs = 0
        self.claimed_elsewhere: set[str] = set()  # runs another worker was training when asked

    def task(self, name: str) -> data.TaskData:
        if name not in self._tasks:
            self._tasks[name] = data.load_task(
                name, seed=0, max_examples=self.protocol.max_examples
            )
        return self._tasks[name]

    def base(self, num_labels: int, seed: int, attention: str = "sdpa") -> tuple[nn.Module, Any]:
        key = (num_labels, seed, attention)
        if key not in self._bases:
            self._bases[key] = data.load_model(num_labels, seed=seed, attn_implementation=attention)
        return self._bases[key]

    def path(self, spec: RunSpec) -> Path:
        return self.runs_dir / f"{spec.key}.json"

    def claim_path(self, spec: RunSpec) -> Path:
        return self.runs_dir / f"{spec.key}.claim"

    def claim(self, spec: RunSpec) -> bool:
        """Take the run for this process; False while a live process holds it.

        Several workers (one per core) can share one output folder: a run is claimed by
        creating ``<key>.claim`` (holding the owner's pid) exclusively; a claim whose process
        has died is stale and taken over.
        """
        path = self.claim_path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = int(path.read_text().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner == os.getpid() or (owner and _alive(owner)):
                    return False
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def load(self, spec: RunSpec) -> dict[str, Any] | None:
        """The finished run's record, or None; a record of another protocol is an error."""
        path = self.path(spec)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record.get("protocol") != dataclasses.asdict(self.protocol):
            raise StateMismatchError(
                f"{path} was written under protocol {record.get('protocol')}, this run uses "
                f"{dataclasses.asdict(self.protocol)}; pass another --output-dir"
            )
        return record

    def train_split(self, spec: RunSpec) -> data.Split:
        split = self.task(spec.task).train
        return first(split, self.protocol.sweep_train_examples) if spec.sweep else split

    def run(self, spec: RunSpec) -> dict[str, Any] | None:
        """The run's record: read from its file, or trained now (None if it failed)."""
        done = self.load(spec)
        if done is not None:
            return done
        if spec.key in self.failures:  # failed once in this process: not tried again
            return None
        if not self.claim(spec):  # another worker is training it right now
            self.claimed_elsewhere.add(spec.key)
            return None
        try:
            try:
                record = self._run(spec)
            except Exception as exc:  # one broken method must not stop a night's run
                self.failures[spec.key] = f"{type(exc).__name__}: {exc}"
                print(f"  FAILED {spec.key}: {self.failures[spec.key]}", flush=True)
                traceback.print_exc()
                return None
            write_json(self.path(spec), record)
        finally:
            self.claim_path(spec).unlink(missing_ok=True)
        self.claimed_elsewhere.discard(spec.key)
        self.new_runs += 1
        print(f"  {spec.key}: validation {record['validation']['score']:.4f} test "
              f"{record['test']['score']:.4f} ({record['seconds']['total']:.0f} s)", flush=True)
        return record

    def context(self, spec: RunSpec) -> RunContext:
        task = self.task(spec.task)
        base, tokenizer = self.base(task.num_labels, spec.seed)

        def cached_mask(method: str, choose: Callable[[], Mask]) -> tuple[Mask, float]:
            key = (spec.task, method, spec.density, spec.seed, spec.sweep)
            if key not in self._masks:
                tick = time.perf_counter()
                self._masks[key] = (choose(), time.perf_counter() - tick)
                while len(self._masks) > 2:  # a grid's runs come together; keep memory flat
                    del self._masks[next(iter(self._masks))]
            return self._masks[key]

        return RunContext(
            model=copy.deepcopy(base),
            density=spec.density,
            seed=spec.seed,
            head=data.HEAD_PARAMETERS,
            select_data=data.batches(
                self.train_split(spec), tokenizer, batch_size=self.protocol.batch_size,
                max_length=self.protocol.max_length, shuffle=True, seed=10_000 + spec.seed,
            ),
            select_batches=self.protocol.select_batches,
            eager_model=lambda: self.base(task.num_labels, spec.seed, "eager")[0],
            cached_mask=cached_mask,
            progress=self.progress,
        )

    def bound_constants(self, spec: RunSpec) -> dict[str, Any] | None:
        """E3's constants for the mask of ``spec``'s method at p, measured at theta0; cached.

        rho (max per-example gradient norm on the mask) and Lambda_min (Lanczos on H_MM) come
        from ``sparsetune.bounds.estimate_constants`` on the first ``bound_examples`` of the
        training sample, at the pretrained weights (the mask, not the lr, decides them; at the
        trained weights they were within 10% in a smoke run). Written to ``bounds/``.
        """
        if not self.bound_examples:
            return None
        path = self.output_dir / "bounds" / f"{spec.key.split('__seed')[0]}__seed{spec.seed}.json"
        if path.exists():
            return json.loads(path.read_text())
        try:
            tick = time.perf_counter()
            setup = RECIPES[spec.method].build(self.context(spec), spec.lr)
            task = self.task(spec.task)
            eager, tokenizer = self.base(task.num_labels, spec.seed, "eager")
            sample = data.batches(
                first(self.train_split(spec), self.bound_examples), tokenizer,
                batch_size=self.protocol.batch_size, max_length=self.protocol.max_length,
            )
            constants = estimate_constants(eager, None, sample, setup.mask, tol=1e-2,
                                           seed=spec.seed)
        except Exception as exc:
            self.failures[path.name] = f"{type(exc).__name__}: {exc}"
            print(f"  FAILED {path.name}: {self.failures[path.name]}", flush=True)
            return None
        record = {**constants.to_dict(), "method": spec.method, "density": spec.density,
                  "seed": spec.seed, "seconds": time.perf_counter() - tick,
                  "protocol": dataclasses.asdict(self.protocol)}
        write_json(path, record)
        print(f"  bound constants {path.name}: rho {constants.rho:.3g}, Lambda_min "
              f"{constants.lambda_min:.3g} ({record['seconds']:.0f} s)", flush=True)
        return record

    def _run(self, spec: RunSpec) -> dict[str, Any]:
        proto, start = self.protocol, time.perf_counter()
        task = self.task(spec.task)
        base, tokenizer = self.base(task.num_labels, spec.seed)
        train_split = self.train_split(spec)

        def batches(split: data.Split, shuffle: bool = False, seed: int = 0,
                    size: int = EVAL_BATCH) -> data.Batches:
            return data.batches(split, tokenizer, batch_size=size, max_length=proto.max_length,
                                shuffle=shuffle, seed=seed)

        ctx = self.context(spec)
        # By identity: a recipe may wrap the model (peft renames) or write into it (Mixout).
        initial = {id(p): p.detach().clone() for p in ctx.model.parameters()}
        setup = RECIPES[spec.method].build(ctx, spec.lr)
        before = {n: initial.pop(id(p), None) for n, p in setup.model.named_parameters()}
        before = {n: p.detach().clone() if before[n] is None else before[n]
                  for n, p in setup.model.named_parameters()}
        del initial
        tick = time.perf_counter()
        losses, diverged = train(
            setup, batches(train_split, True, spec.seed, proto.batch_size), proto.steps,
            spec.seed, self.progress, spec.key,
        )
        train_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        evaluated = {
            "validation": measure(setup.model, batches(first(task.validation,
                                  proto.validation_examples)), task.metric),
            "test": measure(setup.model, batches(first(task.test, proto.test_examples)),
                            task.metric),
        }
        if spec.sweep:  # the whole (capped) training sample: the empirical risk of E4
            evaluated["train"] = measure(setup.model, batches(train_split), task.metric)
        eval_seconds = time.perf_counter() - tick
        changed = frozen_moved = 0
        for name, param in setup.model.named_parameters():
            moved = param.detach() != before[name]
            changed += int(moved.sum())
            if setup.mask is not None and name in setup.mask:
                frozen_moved += int((moved & ~setup.mask[name]).sum())
        num_parameters = sum(p.numel() for p in base.parameters())
        return {
            "spec": dataclasses.asdict(spec),
            "key": spec.key,
            "protocol": dataclasses.asdict(proto),
            "metric": task.metric,
            "n_train": len(train_split),
            "num_parameters": num_parameters,
            "trainable_entries": None if setup.mask is None else setup.mask.num_trainable,
            "changed_entries": changed,
            "frozen_entries_moved": None if setup.mask is None else frozen_moved,
            "optimizer_state_bytes": sum(optimizer_state_nbytes(o) for o in setup.optimizers),
            "details": setup.details,
            "diverged": diverged,
            "validation": evaluated["validation"],
            "test": evaluated["test"],
            "train": evaluated.get("train"),
            "losses": losses,
            "seconds": {"train": train_seconds, "eval": eval_seconds,
                        "total": time.perf_counter() - start},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
        }


# =============================================================================================
# The plan: lr selection, then seeds; the sweep; the other tasks


def density_for(method: str, density: float) -> float | None:
    return density if RECIPES[method].uses_density else None


def lr_grid(method: str, density: float | None, scales: Sequence[float]) -> list[float]:
    """default x sqrt(p_ref / p) x scales (the sqrt factor is 1 at the reference density)."""
    centre = DEFAULT_LRS[method]
    if density is not None:
        centre *= math.sqrt(REFERENCE_DENSITY / density)
    return [float(f"{centre * s:.3g}") for s in scales]


def pick_lr(grid: Sequence[float], score_of: Callable[[float], float | None],
            extensions: int = 0) -> dict[str, Any] | None:
    """The lr rule: the best validation score on ``grid`` wins (ties: the smaller lr).

    While the winner sits at an edge of the grid and scores strictly above its inner neighbour,
    the grid is extended by one more point beyond that edge (the same ratio as the grid's outer
    step), at most ``extensions`` times. ``score_of(lr)`` gives a run's validation score (None:
    not run yet; then the choice is None too).
    """
    grid = list(grid)
    asked = {lr: score_of(lr) for lr in grid}  # every point, so that all can run in one pass
    if any(score is None for score in asked.values()):
        return None
    scores: dict[float, float] = {lr: score for lr, score in asked.items() if score is not None}
    added = 0
    while True:
        best = max(grid, key=lambda lr: (scores[lr], -lr))
        edge = len(grid) > 1 and best in (grid[0], grid[-1])
        if not edge or added >= extensions:
            break
        low = best == grid[0]
        inner = grid[1] if low else grid[-2]
        if scores[best] <= scores[inner]:
            break  # a flat edge (e.g. nothing learns): extending would not change the choice
        ratio = grid[0] / grid[1] if low else grid[-1] / grid[-2]
        lr = float(f"{best * ratio:.3g}")
        score = score_of(lr)
        if score is None:
            return None
        scores[lr] = score
        grid = [lr, *grid] if low else [*grid, lr]
        added += 1
    return {"grid": grid, "validation": scores, "chosen": best, "at_grid_edge": edge,
            "extensions": added}


def choose_lr(runner: Runner, task: str, method: str, density: float | None, seed: int,
              scales: Sequence[float], sweep: bool = False,
              extensions: int = 0) -> dict[str, Any] | None:
    """Train at every lr the rule (:func:`pick_lr`) needs; returns its choice."""

    def score_of(lr: float) -> float | None:
        record = runner.run(RunSpec(task, method, density, seed, lr, sweep))
        return None if record is None else record["validation"]["score"]

    return pick_lr(lr_grid(method, density, scales), score_of, extensions)


@dataclass
class Plan:
    tasks: list[str]
    methods: list[str]
    seeds: list[int]
    lr_task: str = "rotten_tomatoes"
    lr_seed: int = 0
    lr_scales: tuple[float, ...] = LR_SCALES
    lr_extensions: int = LR_EXTENSIONS
    sweep: bool = True
    sweep_densities: tuple[float, ...] = (0.001, 0.005, 0.02, 0.05, 0.2)
    sweep_methods: tuple[str, ...] = SWEEP_METHODS


def available(methods: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    ready, missing = [], {}
    for m in methods:
        reason = RECIPES[m].missing()
        if reason is None:
            ready.append(m)
        else:
            missing[m] = reason
    return ready, missing


def execute(plan: Plan, runner: Runner, on_progress: Callable[[], None]) -> dict[str, Any]:
    """Run what the plan needs and is not on disk yet, calling ``on_progress`` after each step."""
    density = runner.protocol.density
    ready, _ = available(plan.methods)
    chosen: dict[str, dict[str, Any]] = {}

    def choose_missing() -> None:
        for method in [m for m in ready if m not in chosen]:
            choice = choose_lr(runner, plan.lr_task, method, density_for(method, density),
                               plan.lr_seed, plan.lr_scales, extensions=plan.lr_extensions)
            if choice is not None:
                chosen[method] = choice
            on_progress()

    choose_missing()  # lr selection first, for every method
    tasks = [plan.lr_task, *[t for t in plan.tasks if t != plan.lr_task]]
    for i, task in enumerate(tasks):
        choose_missing()  # a choice that waited on another worker's runs may be ready now
        if task in plan.tasks:
            for seed in plan.seeds:
                for method in [m for m in ready if m in chosen]:
                    lr = chosen[method]["chosen"]
                    runner.run(RunSpec(task, method, density_for(method, density), seed, lr))
                    on_progress()
        if i == 0 and plan.sweep:
            run_sweep(plan, runner, on_progress)
    return chosen


def run_sweep(plan: Plan, runner: Runner, on_progress: Callable[[], None]) -> None:
    ready, _ = available(plan.sweep_methods)
    for p in plan.sweep_densities:
        for method in ready:
            choice = choose_lr(runner, plan.lr_task, method, p, plan.lr_seed, plan.lr_scales,
                               sweep=True, extensions=plan.lr_extensions)
            on_progress()
            if choice is None:
                continue
            for seed in plan.seeds:
                runner.run(RunSpec(plan.lr_task, method, p, seed, choice["chosen"], sweep=True))
                on_progress()
            runner.bound_constants(RunSpec(plan.lr_task, method, p, plan.lr_seed,
                                           choice["chosen"], sweep=True))
            on_progress()


# =============================================================================================
# Summaries: table, JSON, plot — rebuilt from the run files alone


def _records(runs_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]


def _mean_std(values: list[float]) -> dict[str, Any]:
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def _lr_choices(records: list[dict[str, Any]], plan: Plan, density: float,
                sweep: bool = False) -> dict[tuple[str, float | None], dict[str, Any]]:
    """(method, density) -> grid, validation scores, chosen lr: the lr-selection runs on disk."""
    out: dict[tuple[str, float | None], dict[str, Any]] = {}
    methods = plan.sweep_methods if sweep else plan.methods
    densities = plan.sweep_densities if sweep else (density,)
    for method in methods:
        for p in densities:
            d = density_for(method, p)
            scores = {
                r["spec"]["lr"]: r["validation"]["score"] for r in records
                if r["spec"]["task"] == plan.lr_task and r["spec"]["method"] == method
                and r["spec"]["density"] == d and r["spec"]["seed"] == plan.lr_seed
                and r["spec"]["sweep"] == sweep
            }
            choice = pick_lr(lr_grid(method, d, plan.lr_scales), scores.get, plan.lr_extensions)
            if choice is not None:
                out[(method, d)] = choice
    return out


def summarise(records: list[dict[str, Any]], plan: Plan, protocol: Protocol,
              missing: dict[str, str], failures: dict[str, str],
              bounds: dict[tuple[str, float], dict[str, Any]] | None = None) -> dict[str, Any]:
    density = protocol.density
    bounds = bounds or {}
    choices = _lr_choices(records, plan, density)
    table: dict[str, dict[str, Any]] = {}
    for method in plan.methods:
        d = density_for(method, density)
        row: dict[str, Any] = {"lr": None, "tasks": {}}
        table[method] = row
        if method in missing:
            row["status"] = f"not available yet: {missing[method]}"
            continue
        choice = choices.get((method, d))
        if choice is None:
            row["status"] = "lr selection not finished"
            continue
        row.update(status="ok", lr=choice["chosen"], lr_at_grid_edge=choice["at_grid_edge"])
        runs = [r for r in records if r["spec"]["method"] == method and not r["spec"]["sweep"]
                and r["spec"]["density"] == d and r["spec"]["lr"] == choice["chosen"]
                and r["spec"]["seed"] in plan.seeds]
        for task in plan.tasks:
            mine = sorted((r for r in runs if r["spec"]["task"] == task),
                          key=lambda r: r["spec"]["seed"])
            if mine:
                cell = _mean_std([100 * r["test"]["score"] for r in mine])
                cell["seeds"] = [r["spec"]["seed"] for r in mine]
                cell["metric"] = mine[0]["metric"]
                cell["diverged"] = sum(r["diverged"] for r in mine)
                row["tasks"][task] = cell
        if runs:  # moved: entries that differ from the base after training, head included
            row["moved_entries_fraction"] = statistics.fmean(
                r["changed_entries"] / r["num_parameters"] for r in runs)
            masked = [r["frozen_entries_moved"] for r in runs
                      if r["frozen_entries_moved"] is not None]
            row["frozen_entries_moved"] = sum(masked) if masked else None
    return {
        "protocol": dataclasses.asdict(protocol),
        "plan": dataclasses.asdict(plan),
        "lr_selection": {m: c for (m, _), c in choices.items()},
        "table": table,
        "sweep": summarise_sweep(records, plan, bounds),
        "failed_runs": failures,
        "num_runs_on_disk": len(records),
    }


def summarise_sweep(records: list[dict[str, Any]], plan: Plan,
                    bounds: dict[tuple[str, float], dict[str, Any]]) -> dict[str, Any]:
    choices = _lr_choices(records, plan, REFERENCE_DENSITY, sweep=True)
    rows = []
    n_train = None
    for method in plan.sweep_methods:
        for p in plan.sweep_densities:
            choice = choices.get((method, p))
            if choice is None:
                continue
            runs = [r for r in records if r["spec"]["sweep"] and r["spec"]["method"] == method
                    and r["spec"]["density"] == p and r["spec"]["lr"] == choice["chosen"]
                    and r["spec"]["seed"] in plan.seeds]
            if not runs:
                continue
            n_train = runs[0]["n_train"]
            constants = bounds.get((method, p))
            bound = None
            if constants is not None:  # E3 with lam = 1 (theory/ E3; the paper's lambda)
                bound = float(stability_bound(constants["rho"], constants["lambda_min"], p,
                                              n_train))
            rows.append({
                "constants": constants, "bound": None if bound == math.inf else bound,
                "method": method, "density": p, "lr": choice["chosen"],
                "lr_at_grid_edge": choice["at_grid_edge"],
                "train_loss": _mean_std([r["train"]["loss"] for r in runs]),
                "test_loss": _mean_std([r["test"]["loss"] for r in runs]),
                "train_score": _mean_std([r["train"]["score"] for r in runs]),
                "test_score": _mean_std([r["test"]["score"] for r in runs]),
                "loss_gap": _mean_std([r["test"]["loss"] - r["train"]["loss"] for r in runs]),
                "score_gap": _mean_std([r["train"]["score"] - r["test"]["score"] for r in runs]),
            })
    return {"rows": rows, "n_train": n_train}


def _cell(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    std = "" if cell["std"] is None else f" ± {cell['std']:.1f}"
    return f"{cell['mean']:.1f}{std} ({cell['n']})"


def format_table(summary: dict[str, Any]) -> str:
    plan, table = summary["plan"], summary["table"]
    tasks = plan["tasks"]
    names = [t + (" (F1)" if t == "sms_spam" else "") for t in tasks]
    lines = [
        "| method | lr | entries moved | " + " | ".join(names) + " | average |",
        "|---|---:|---:|" + "---:|" * (len(tasks) + 1),
    ]
    for method, row in table.items():
        if row["status"] != "ok":
            lines.append(f"| {method} | {row['status']} |" + " |" * (len(tasks) + 2))
            continue
        cells = [row["tasks"].get(t) for t in tasks]
        full = all(c is not None and c["n"] == len(plan["seeds"]) for c in cells)
        average = f"{statistics.fmean(c['mean'] for c in cells):.1f}" if full else "-"
        edge = " (edge)" if row["lr_at_grid_edge"] else ""
        moved = row.get("moved_entries_fraction")
        moved_text = "-" if moved is None else f"{100 * moved:.2f}%"
        lines.append(f"| {method} | {row['lr']:.3g}{edge} | {moved_text} | "
                     + " | ".join(_cell(c) for c in cells) + f" | {average} |")
    return "\n".join(lines)


def format_sweep(summary: dict[str, Any]) -> str:
    sweep = summary["sweep"]
    lines = [
        "| method | p | lr | train loss | test loss | gap (test - train loss) | train score "
        "| test score | E3 bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(cell: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
        std = "" if cell["std"] is None else f" ± {scale * cell['std']:.{digits}f}"
        return f"{scale * cell['mean']:.{digits}f}{std}"

    for r in sweep["rows"]:
        bound = r["bound"]
        lines.append(
            f"| {r['method']} | {100 * r['density']:g}% | {r['lr']:.3g} | {ms(r['train_loss'])} "
            f"| {ms(r['test_loss'])} | {ms(r['loss_gap'])} | {ms(r['train_score'], 100, 1)} "
            f"| {ms(r['test_score'], 100, 1)} | {'-' if bound is None else f'{bound:.3g}'} |"
        )
    return "\n".join(lines)


def plot_sweep(summary: dict[str, Any], path: Path) -> Path | None:
    """Measured generalisation gap and test score against p, the E3 bound beside; a PNG.

    A third panel draws E3's denominator Lambda_min + 2 (1 - p) (lam = 1): where it is <= 0
    there is no bound, and the point is shown there rather than left out of the bound's curve.
    """
    rows = summary["sweep"]["rows"]
    if not rows or importlib.util.find_spec("matplotlib") is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    gap_ax, score_ax, curv_ax = fig.subplots(1, 3)
    twin = None
    for method, color in zip(summary["plan"]["sweep_methods"], ("tab:red", "tab:blue")):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["density"])
        if not mine:
            continue
        p = [100 * r["density"] for r in mine]
        for ax, key, scale in ((gap_ax, "loss_gap", 1.0), (score_ax, "test_score", 100.0)):
            ax.errorbar(p, [scale * r[key]["mean"] for r in mine],
                        yerr=[scale * (r[key]["std"] or 0.0) for r in mine],
                        color=color, marker="o", capsize=3, label=method)
        with_bound = [r for r in mine if r["bound"] is not None]
        if with_bound:
            twin = twin or gap_ax.twinx()
            twin.plot([100 * r["density"] for r in with_bound], [r["bound"] for r in with_bound],
                      color=color, linestyle="--", marker="x", label=f"{method}: E3 bound")
        measured = [r for r in mine if r["constants"] is not None]
        if measured:
            curv_ax.plot([100 * r["density"] for r in measured],
                         [effective_curvature(r["constants"]["lambda_min"], r["density"])
                          for r in measured], color=color, marker="o", label=method)
    if twin is not None:
        twin.set(yscale="log", ylabel="E3 stability bound, lam = 1 (dashed)")
        twin.legend(loc="upper right")
    n = summary["sweep"]["n_train"]
    gap_ax.set(xscale="log", xlabel="density p (%)", ylabel="test loss - train loss",
               title=f"generalisation gap (n = {n} training examples)")
    score_ax.set(xscale="log", xlabel="density p (%)", ylabel="test accuracy (%)",
                 title="rotten_tomatoes test accuracy")
    curv_ax.axhline(0.0, color="black", linewidth=0.8)
    curv_ax.set(xscale="log", xlabel="density p (%)", ylabel="Lambda_min(H_MM) + 2 (1 - p)",
                title="E3 denominator (<= 0: no bound)")
    gap_ax.legend(loc="upper left")
    score_ax.legend()
    if len(curv_ax.lines) > 1:  # a method's line beside the zero line
        curv_ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    return path


def write_summary(runner: Runner, plan: Plan, command: str, status: str,
                  plot: bool = True) -> dict[str, Any]:
    _, missing = available(plan.methods)
    bounds = {(r["method"], r["density"]): r for r in _records(runner.output_dir / "bounds")
              if r["seed"] == plan.lr_seed}
    summary = summarise(_records(runner.runs_dir), plan, runner.protocol, missing,
                        runner.failures, bounds)
    filled = all(row.get("status") == "ok" and all(
        row["tasks"].get(t, {}).get("n") == len(plan.seeds) for t in plan.tasks)
        for row in summary["table"].values())
    if status == "complete" and not filled:
        status = "partial"  # this invocation is done, the table is not (other methods' runs)
    summary.update(
        status=status,
        command=command,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        environment=environment(),
    )
    out = runner.output_dir
    write_json(out / "quality.json", summary)
    text = (f"# Quality benchmark ({status})\n\n`{command}`\n\n"
            f"Test score x 100, mean ± std (seeds); lr chosen on {plan.lr_task} validation, "
            f"seed {plan.lr_seed}: best of default x (1/3, 1, 3), the grid extended past a "
            f"winning edge up to {plan.lr_extensions} times.\n\n{format_table(summary)}\n\n"
            f"## Density sweep ({plan.lr_task})\n\n{format_sweep(summary)}\n")
    tmp = out / ".table.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "table.md")
    png = plot_sweep(summary, out / "density_sweep.png") if plot else None
    summary["files"] = {"json": str(out / "quality.json"), "table": str(out / "table.md"),
                        "plot": None if png is None else str(png)}
    return summary


# =============================================================================================
# Command line


def _density_arg(text: str) -> float:
    value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1] or (0%, 100%], got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=data.TASKS, default=list(data.TASKS))
    ap.add_argument("--methods", nargs="+", choices=METHOD_ORDER, default=None,
                    help="default: all (random and sam with --quick)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--lr-task", choices=data.TASKS, default="rotten_tomatoes")
    ap.add_argument("--lr-scales", nargs="+", type=float, default=list(LR_SCALES))
    ap.add_argument("--lr-extensions", type=int, default=LR_EXTENSIONS,
                    help="extra grid points allowed past a winning edge (default %(default)s)")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                    help="the density sweep of sam vs random on the lr task (default on)")
    ap.add_argument("--sweep-densities", nargs="+", type=_density_arg,
                    default=[0.001, 0.005, 0.02, 0.05, 0.2])
    ap.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: tiny protocol, random and sam, 1 seed, rotten_tomatoes")
    ap.add_argument("--summary-only", action="store_true",
                    help="train nothing: rebuild quality.json, table.md and the plot from runs/")
    ap.add_argument("--progress", action="store_true", help="progress bars for each run")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default torch's); 1 on a shared machine: with other "
                         "busy processes 2 threads ran a step 6x slower than 1")
    ap.add_argument("--bound-examples", type=int, default=None,
                    help="training examples for the E3 constants of the sweep (default 32, "
                         "0 with --quick; 0: no bound)")
    for f in dataclasses.fields(Protocol):
        if f.name not in ("max_examples", "density", "warmup_fraction"):
            ap.add_argument("--" + f.name.replace("_", "-"), type=int, default=None)
    ap.add_argument("--density", type=_density_arg, default=None)
    return ap


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    protocol = QUICK if args.quick else Protocol()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Protocol)
                 if getattr(args, f.name, None) is not None}
    protocol = dataclasses.replace(protocol, **overrides)
    if args.lr_task not in args.tasks:
        raise InvalidArgumentError(
            f"--lr-task {args.lr_task} must be one of --tasks {args.tasks}"
        )
    methods = args.methods or (["random", "sam"] if args.quick else list(METHOD_ORDER))
    plan = Plan(tasks=list(args.tasks), methods=methods, seeds=list(args.seeds),
                lr_task=args.lr_task, lr_scales=tuple(args.lr_scales),
                lr_extensions=args.lr_extensions, sweep=args.sweep,
                sweep_densities=tuple(args.sweep_densities))
    plan.lr_seed = plan.seeds[0]
    if args.quick:
        plan.tasks, plan.lr_task, plan.seeds, plan.lr_seed = ["rotten_tomatoes"], \
            "rotten_tomatoes", plan.seeds[:1], plan.seeds[0]
        plan.lr_scales = plan.lr_scales[:2]
        plan.lr_extensions = min(plan.lr_extensions, 1)
        plan.sweep_densities = (0.05,)
    command = shlex.join([Path(sys.executable).name, "-m", "benchmarks.quality",
                          *(argv if argv is not None else sys.argv[1:])])
    bound_examples = args.bound_examples
    if bound_examples is None:
        bound_examples = 0 if args.quick else 32
    runner = Runner(protocol, args.output_dir, progress=args.progress,
                    bound_examples=bound_examples)
    # The table always lists every method (what is on disk), so that several invocations, each
    # with its own --methods (e.g. one per core), share one table.md and quality.json.
    table_plan = plan if args.quick else dataclasses.replace(plan, methods=list(METHOD_ORDER))
    _, missing = available(plan.methods)
    print(f"quality benchmark -> {args.output_dir}\nprotocol: {dataclasses.asdict(protocol)}")
    for method, reason in missing.items():
        print(f"  {method}: not available yet ({reason})")
    if not args.summary_only:
        last_plot = [time.monotonic()]

        def on_progress() -> None:  # the plot at most every 5 minutes (it takes a second)
            plot = time.monotonic() - last_plot[0] > 300
            write_summary(runner, table_plan, command, "running", plot=plot)
            if plot:
                last_plot[0] = time.monotonic()

        started = time.perf_counter()
        execute(plan, runner, on_progress)
        while runner.claimed_elsewhere:  # runs other workers held: what depends on them waits
            before = runner.new_runs
            print(f"  waiting for {len(runner.claimed_elsewhere)} run(s) of other workers",
                  flush=True)
            runner.claimed_elsewhere.clear()
            execute(plan, runner, on_progress)
            if runner.new_runs == before and runner.claimed_elsewhere:
                time.sleep(CLAIM_POLL_SECONDS)
        print(f"{runner.new_runs} new runs in {time.perf_counter() - started:.0f} s, "
              f"{len(runner.failures)} failed")
    summary = write_summary(runner, table_plan, command, "complete" if not runner.failures
                            and not missing else "partial")
    summary["new_runs"] = runner.new_runs
    print(format_table(summary))
    print(format_sweep(summary))
    return summary


if __name__ == "__main__":
    # kill (SIGTERM) unwinds like Ctrl-C, so the run in progress gives its claim back
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()
