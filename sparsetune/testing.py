"""Property checks of sparse fine-tuning for your own pytest suite (theory/ E1, E3).

Hypothesis strategies:

* :func:`densities`: densities p in (0, 1], small ones and exactly 1 included;
* :func:`masks`: masks over a model (or a ``name -> shape`` mapping) with exactly
  k = floor(m p) selected entries (theory/ E1);
* :func:`sparse_problems`: tiny seeded models with data, a loss and a mask.

Checks (plain functions that raise ``AssertionError`` with a readable message):

* :func:`assert_frozen`: every entry outside the mask is bit-identical to a reference;
* :func:`check_optimizer_respects_mask`: run your optimizer set-up for a few steps with non-zero
  gradients on every entry, frozen ones included, and check the frozen entries never move;
* :func:`empirical_stability`: the leave-one-out stability of a training function (E3), with
  its spread.

Hypothesis fails any example slower than its default deadline of 200 ms, and one step of a real
model takes longer: put ``@settings(deadline=None)`` on every ``@given`` test of a torch model.
Importing this module builds one throwaway optimizer, so that torch's one-time lazy import on
the first optimizer built (about a second) is not charged to the first example; small models
then meet the default deadline too.

Example (a user's test file)::

    from hypothesis import given, settings
    import sparsetune as st
    from sparsetune import testing as stt

    @settings(deadline=None)
    @given(mask=stt.masks(my_model()))
    def test_my_optimizer_keeps_frozen_entries(mask):
        stt.check_optimizer_respects_mask(
            lambda model, mask: st.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1),
            my_model(), mask, steps=3)
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from ._checks import check_density
from .errors import InvalidArgumentError
from .mask import Mask, budget_size

__all__ = [
    "SparseProblem",
    "StabilityEstimate",
    "assert_frozen",
    "check_optimizer_respects_mask",
    "densities",
    "empirical_stability",
    "masks",
    "sparse_problems",
]

Shapes = Mapping[str, Sequence[int] | torch.Size]


def _warm_up_torch() -> None:
    """Build and step a throwaway optimizer: torch imports ``torch._dynamo`` lazily when the
    first optimizer is built (about 1 s), which inside a hypothesis test would fall on the
    first example and exceed the default 200 ms deadline. Here it is paid at import."""
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([param], lr=0.0)
    param.grad = torch.zeros(1)
    optimizer.step()


_warm_up_torch()


# -- strategies ----------------------------------------------------------------------------------
def densities(min_value: float = 1e-3, max_value: float = 1.0) -> st.SearchStrategy[float]:
    """Densities p in [min_value, max_value] within (0, 1]; the ends are drawn often."""
    low = check_density(min_value, "min_value")
    high = check_density(max_value, "max_value")
    if low > high:
        raise InvalidArgumentError(
            f"min_value must be <= max_value, got min_value={min_value!r}, max_value={max_value!r}"
        )
    return st.one_of(
        st.sampled_from(sorted({low, high})),
        st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False),
    )


def _shapes(model_or_shapes: nn.Module | Shapes) -> dict[str, tuple[int, ...]]:
    if isinstance(model_or_shapes, nn.Module):
        shapes = {n: tuple(p.shape) for n, p in model_or_shapes.named_parameters()}
    elif isinstance(model_or_shapes, Mapping):
        shapes = {}
        for name, shape in model_or_shapes.items():
            if not isinstance(name, str):
                raise InvalidArgumentError(f"parameter names must be str, got {name!r}")
            try:
                dims = tuple(int(d) for d in shape)
            except (TypeError, ValueError):
                raise InvalidArgumentError(
                    f"shape of '{name}' must be a sequence of ints, got {shape!r}"
                ) from None
            if any(d < 0 for d in dims):
                raise InvalidArgumentError(f"shape of '{name}' has a negative size: {shape!r}")
            shapes[name] = dims
    else:
        raise InvalidArgumentError(
            f"model_or_shapes must be an nn.Module or a mapping name -> shape, got "
            f"{type(model_or_shapes).__name__}"
        )
    if not shapes or sum(math.prod(s) for s in shapes.values()) == 0:
        raise InvalidArgumentError("model_or_shapes has no parameter entries to mask")
    return shapes


@st.composite
def _mask(draw: st.DrawFn, shapes: dict[str, tuple[int, ...]], density: Any,
          always_train: frozenset[str]) -> Mask:
    p = draw(density) if isinstance(density, st.SearchStrategy) else density
    p = check_density(p)
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    budgeted = [n for n in shapes if n not in always_train]
    total = sum(math.prod(shapes[n]) for n in budgeted)
    k = budget_size(total, p)
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:k]] = True
    tensors, start = {}, 0
    for name, shape in shapes.items():
        if name in always_train:
            tensors[name] = torch.ones(shape, dtype=torch.bool)
            continue
        size = math.prod(shape)
        tensors[name] = chosen[start : start + size].reshape(shape)
        start += size
    return Mask(tensors, always_train=always_train)


def masks(
    model_or_shapes: nn.Module | Shapes,
    density: float | st.SearchStrategy[float] | None = None,
    *,
    always_train: Sequence[str] = (),
) -> st.SearchStrategy[Mask]:
    """Masks over ``model_or_shapes`` with exactly floor(m p) selected entries (theory/ E1).

    Args:
        model_or_shapes: a model (its ``named_parameters()``) or a mapping ``name -> shape``.
        density: a fixed p in (0, 1], a strategy of densities, or None for :func:`densities`.
        always_train: names selected in full and kept out of the budget (a task head).

    The selected entries are a uniformly random k-subset of the budgeted entries (m of them),
    drawn from a seed hypothesis shrinks towards 0. Masks live on the CPU.
    """
    shapes = _shapes(model_or_shapes)
    always = frozenset([always_train] if isinstance(always_train, str) else always_train)
    unknown = sorted(always - set(shapes))
    if unknown:
        raise InvalidArgumentError(
            f"always_train names parameters that are not in model_or_shapes: {unknown}"
        )
    if density is None:
        density = densities()
    elif not isinstance(density, st.SearchStrategy):
        density = check_density(density)
    return _mask(shapes, density, always)


class _MLP(nn.Module):
    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


@dataclass
class SparseProblem:
    """A tiny sparse fine-tuning problem: a float64 model, batches, a loss, a mask."""

    model: nn.Module
    data: list[tuple[Tensor, Tensor]]
    loss: str  # "cross_entropy" or "mse"
    mask: Mask
    seed: int

    def loss_fn(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean loss of one batch: ``loss_fn(model, batch) -> scalar``."""
        x, y = batch
        out = model(x)
        if self.loss == "cross_entropy":
            return F.cross_entropy(out, y)
        return ((out - y) ** 2).mean()

    def fresh_model(self) -> nn.Module:
        """A copy of the model at its initial parameters (the problem keeps its own)."""
        return copy.deepcopy(self.model)


@st.composite
def sparse_problems(draw: st.DrawFn, density: float | st.SearchStrategy[float] | None = None,
                    max_width: int = 6, max_batches: int = 3) -> SparseProblem:
    """Tiny float64 MLPs (1 or 2 layers, widths 1..``max_width``) with seeded data (1 to
    ``max_batches`` batches of 1 to 6 examples), a cross-entropy or MSE loss and a mask from
    :func:`masks`."""
    seed = draw(st.integers(min_value=0, max_value=2**16))
    depth = draw(st.integers(min_value=1, max_value=2))
    sizes = [draw(st.integers(min_value=1, max_value=max_width)) for _ in range(depth + 1)]
    loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    if loss == "cross_entropy":
        sizes[-1] = max(sizes[-1], 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MLP(sizes).double()
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(draw(st.integers(min_value=1, max_value=max_batches))):
        size = draw(st.integers(min_value=1, max_value=6))
        x = torch.randn(size, sizes[0], generator=gen, dtype=torch.float64)
        if loss == "cross_entropy":
            y = torch.randint(0, sizes[-1], (size,), generator=gen)
        else:
            y = torch.randn(size, sizes[-1], generator=gen, dtype=torch.float64)
        data.append((x, y))
    mask = draw(masks(model, density))
    return SparseProblem(model=model, data=data, loss=loss, mask=mask, seed=seed)


# -- checks --------------------------------------------------------------------------------------
def _bits(t: Tensor) -> Tensor:
    """``t`` viewed as integers of its width: equal bits, equal integers (NaN and -0.0 too)."""
    if t.is_floating_point() or t.is_complex():
        width = t.element_size() * (2 if t.is_complex() else 1)
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        if t.is_complex():
            t = torch.view_as_real(t)
            width //= 2
        return t.contiguous().view(view[width])
    return t


def assert_frozen(model: nn.Module, reference_state: Mapping[str, Tensor], mask: Mask) -> None:
    """Assert every entry of ``model`` outside ``mask`` is bit-identical to ``reference_state``.

    ``reference_state`` maps parameter names to their values before training (a state_dict or
    ``{n: p.detach().clone() for n, p in model.named_parameters()}``). Names of the model that
    are not in the mask are frozen in full. Raises ``AssertionError`` listing each parameter
    with moved frozen entries: how many, the largest change and the first moved index.
    """
    if not isinstance(mask, Mapping):
        raise InvalidArgumentError(f"mask must be a Mask, got {type(mask).__name__}")
    named = dict(model.named_parameters())
    missing = sorted(set(named) - set(reference_state))
    if missing:
        raise InvalidArgumentError(
            f"reference_state lacks parameters of the model: {missing[:10]}"
        )
    unknown = sorted(set(mask) - set(named))
    if unknown:
        raise InvalidArgumentError(f"mask names parameters the model lacks: {unknown[:10]}")
    problems = []
    for name, param in named.items():
        ref = reference_state[name]
        if tuple(ref.shape) != tuple(param.shape) or ref.dtype != param.dtype:
            problems.append(f"{name}: shape/dtype changed from {tuple(ref.shape)} {ref.dtype} "
                            f"to {tuple(param.shape)} {param.dtype}")
            continue
        now = param.detach()
        ref = ref.detach().to(now.device)
        frozen = ~mask[name].to(now.device) if name in mask else torch.ones_like(
            now, dtype=torch.bool)
        moved = (_bits(now) != _bits(ref)) & frozen
        count = int(moved.sum())
        if count:
            first = tuple(int(i) for i in torch.nonzero(moved)[0])
            change = (now[moved].double() - ref[moved].double()).abs().max()
            problems.append(f"{name}: {count} of {int(frozen.sum())} frozen entries moved "
                            f"(largest change {float(change):.3g}, first at index {first})")
    if problems:
        raise AssertionError("frozen entries moved:\n  " + "\n  ".join(problems))


def check_optimizer_respects_mask(
    make_optimizer: Callable[[nn.Module, Mask], Any],
    model: nn.Module,
    mask: Mask,
    steps: int = 5,
    *,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    data: Sequence[Any] | None = None,
    seed: int = 0,
    require_progress: bool = True,
) -> None:
    """Run ``make_optimizer(model, mask)`` for ``steps`` steps and check frozen entries never
    move (theory/ E1), after every step.

    Works on a deep copy of ``model`` (yours is untouched). Each step sets non-zero gradients
    on every entry, frozen ones included, as a real backward pass does: by default seeded
    Gaussian gradients (scaled up to 1e3 so that clipping and Adam's normalisation are
    exercised), or ``loss_fn(model, batch)`` backpropagated over ``data`` (cycled).
    ``make_optimizer`` may return an optimizer or ``(optimizer, scheduler)``; the scheduler
    steps after the optimizer.

    With ``require_progress`` it also asserts that some selected entry moved (a set-up that
    trains nothing passes the frozen check trivially). Raises ``AssertionError`` naming the
    step and the moved entries.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps must be an integer >= 1, got steps={steps!r}")
    if (loss_fn is None) != (data is None):
        raise InvalidArgumentError("pass both loss_fn and data, or neither (random gradients)")
    if data is not None and len(data) == 0:
        raise InvalidArgumentError("data must hold at least one batch")
    model = copy.deepcopy(model)
    mask.check(model)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    made = make_optimizer(model, mask)
    optimizer, scheduler = made if isinstance(made, tuple) else (made, None)
    if not hasattr(optimizer, "step") or not hasattr(optimizer, "zero_grad"):
        raise InvalidArgumentError(
            f"make_optimizer(model, mask) must return an optimizer (or (optimizer, scheduler)), "
            f"got {type(made).__name__}"
        )
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        optimizer.zero_grad()
        if loss_fn is None:
            scale = 10.0 ** (3 * step / max(steps - 1, 1))
            for p in params:
                g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
                p.grad = g.to(device=p.device, dtype=p.dtype)
        else:
            assert data is not None
            loss_fn(model, data[step % len(data)]).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        try:
            assert_frozen(model, reference, mask)
        except AssertionError as e:
            raise AssertionError(f"after step {step + 1} of {steps}: {e}") from None
    if require_progress:
        moved = any(
            bool((_bits(p.detach()) != _bits(reference[n]))[mask[n]].any())
            for n, p in model.named_parameters() if n in mask
        )
        if not moved and mask.num_trainable > 0:
            raise AssertionError(
                f"no selected entry moved in {steps} steps: the optimizer trains nothing "
                f"(pass require_progress=False if that is intended)"
            )


@dataclass(frozen=True)
class StabilityEstimate:
    """Leave-one-out estimate of pointwise hypothesis stability (theory/ E3).

    ``mean`` = (1/|I|) sum_{i in I} |l(A(S minus z_i), z_i) - l(A(S), z_i)| over the removed
    examples I; ``stderr`` its standard error over I (0 for one removal).
    """

    mean: float
    stderr: float
    std: float
    maximum: float
    values: tuple[float, ...] = field(repr=False)
    indices: tuple[int, ...] = field(repr=False)
    n: int  # training examples in S

    def __str__(self) -> str:
        return (f"pointwise hypothesis stability {self.mean:.4g} +- {self.stderr:.2g} "
                f"(leave-one-out over {len(self.values)} of n = {self.n} examples; max "
                f"{self.maximum:.4g})")


def empirical_stability(
    train_fn: Callable[[Sequence[Any], Mask], nn.Module],
    dataset: Sequence[Any],
    mask: Mask,
    *,
    loss_fn: Callable[[nn.Module, Any], Tensor | float],
    num_removals: int | None = None,
    seed: int = 0,
) -> StabilityEstimate:
    """Leave-one-out estimate of E_{S,i} |l(A(S^i), z_i) - l(A(S), z_i)| (theory/ E3).

    Args:
        train_fn: ``train_fn(examples, mask) -> model``: A, trained on a list of examples with
            the given mask. It is called once on all of ``dataset`` and once per removal, on
            the other examples in their original order; it must be deterministic.
        dataset: the training set S (a sequence of examples; ``dataset[i]`` is z_i).
        mask: passed to ``train_fn``.
        loss_fn: ``loss_fn(model, example)``: the loss of one example.
        num_removals: examples to leave out, drawn without replacement with ``seed``
            (default: all n, the exact leave-one-out average).

    Returns the mean over the removals with its standard error and spread.
    """
    n = len(dataset)
    if n < 2:
        raise InvalidArgumentError(f"dataset needs at least 2 examples, got {n}")
    if num_removals is None:
        indices = list(range(n))
    else:
        if isinstance(num_removals, bool) or not isinstance(num_removals, int) or not (
                1 <= num_removals <= n):
            raise InvalidArgumentError(
                f"num_removals must be an integer in [1, {n}] (n = len(dataset)), got "
                f"num_removals={num_removals!r}"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        indices = sorted(int(i) for i in order[:num_removals])
    examples = [dataset[i] for i in range(n)]
    full = train_fn(examples, mask)

    def loss(model: nn.Module, example: Any) -> float:
        with torch.no_grad():
            value = loss_fn(model, example)
        return float(value)

    values = []
    for i in indices:
        reduced = train_fn(examples[:i] + examples[i + 1 :], mask)
        values.append(abs(loss(reduced, examples[i]) - loss(full, examples[i])))
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return StabilityEstimate(
        mean=statistics.fmean(values),
        stderr=std / math.sqrt(len(values)),
        std=std,
        maximum=max(values),
        values=tuple(values),
        indices=tuple(indices),
        n=n,
    )
