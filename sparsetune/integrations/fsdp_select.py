"""Selection on an FSDP2-sharded model: the mask one process would select, from local shards.

:func:`select_sharded` (what :func:`~sparsetune.integrations.distributed.select_distributed`
does for a model whose parameters are ``fully_shard``'s ``Shard(0)`` DTensors) never gathers a
full parameter:

* ``random``, ``bitfit``, ``names`` need shapes and names only, which every rank has: each rank
  draws the same mask from the seed (the hypergeometric split of the budget over tensors and
  the uniform entries inside them, as in one process), with no communication.
* ``magnitude``, ``sam`` and ``child_pruning`` score each rank's own shards (|theta|; the sum
  over batches of the clipped gradient, squared, or of its square). Under FSDP2 one backward on
  every rank's batch gives each rank its shard of the gradient of the mean loss over all ranks'
  batches, so a *batch* here is the global batch of one step (every rank's part of it): the
  mask equals one process selecting on those global batches, each clipped to its global norm
  (the norm all-reduced over the shards). Every rank must feed the same number of batches.
  Each rank keeps its exact top-k candidates (:class:`StreamingTopK`, k of the whole budget,
  or of each tensor for ``scope="per_tensor"``), with positions in the single-process order
  (parameter order, then global flat index); the candidates of all ranks are all-gathered
  (at most ``world * k`` of them) and merged in that order, ties going to the lowest position,
  exactly as one process breaks them.
* ``lt_sft`` and ``magnitude`` with ``burn_in_steps`` first fine-tune the sharded model on
  the global batches (:func:`~sparsetune.integrations.fsdp_burn_in.sharded_burned_in`: AdamW
  on each rank's shards, the one-process update of those entries; ``offload`` keeps theta0 and
  the moments of the local shards in host memory or a temporary file, as one process does),
  score each rank's shards (|theta_T - theta0| or |theta_T|) and merge the top-k as above;
  then the shards are put back bit for bit.
* ``sam`` with ``head_warmup_steps`` first trains the ``always_train`` head alone on the global
  batches (:func:`~sparsetune.integrations.fsdp_burn_in.sharded_head_warmed_up`: a plain
  backward while only the head requires grad, AdamW on the head's local shards), scores with
  the warmed-up head as above, then puts the head's shards back bit for bit.
* ``diff_pruning`` trains each rank's shards of the diffs and gate logits
  (:func:`~sparsetune.integrations.fsdp_diff_pruning.sharded_diff_pruning_scores`: the
  one-process gate draws, theta0 + z * w written into the shards, FSDP2's backward for the
  loss's gradient, the chain rule and Adam per local shard) and merges the top-k of the final
  gate logits as above; the shards are put back bit for bit.

The methods that train (burn-in, head warm-up, ``diff_pruning``) train on the gradient of the
mean of the ranks' mean losses: one process's mean loss on the global batch when every rank
feeds an equal part of it (with dropout, each rank draws for its own rows, so training sees
other draws than one process: the mask is then like one process's, not equal to it).

``sam_curvature`` scores g^2 / max(h, epsilon) with g as for ``sam`` and h from
``curvature_method="finite_difference"`` on the shards, or a precomputed ``curvature=``
(:mod:`.fsdp_curvature`); the other curvature methods need torch.func over the whole model
and are refused. Registered methods (``lora``, ``adapter``: their builders read the whole
  model) raise a clear error naming the reason, on every rank. Collective over the model's mesh.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._loss import LossFn, reiterable, restoring, transformers_loss
from .._topk import SLICE, StreamingTopK, budget_size, check_budget
from ..errors import InvalidArgumentError, InvalidScoresError
from ..mask import Mask
from ..optim.sharded import check_sharding, local, process_group
from ..select import check_select, method_spec
from ._ranks import checked_on_every_rank, global_batches, raise_on_every_rank
from .fsdp import shard_span
from .fsdp_burn_in import sharded_burned_in, sharded_head_warmed_up
from .fsdp_curvature import (
    SHARDED_CURVATURE,
    sharded_curvature,
    sharded_finite_difference_diagonal,
    sharded_floor,
)
from .fsdp_diff_pruning import sharded_diff_pruning_scores

__all__ = ["SHARDED_METHODS", "select_sharded"]

#: The methods :func:`select_sharded` supports.
SHARDED_METHODS = ("random", "bitfit", "names", "magnitude", "sam", "child_pruning", "lt_sft",
                   "diff_pruning", "sam_curvature")
_SHAPES_ONLY = ("random", "bitfit", "names")


def _device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _refuse_unsupported(method: str) -> None:
    spec = method_spec(method)  # an unknown name: the usual error listing the methods
    spec.refuse_if_per_step()
    if method not in SHARDED_METHODS:
        why = (f"{method!r} is a registered method, whose builder reads the whole model in one "
               f"process (its parameters would be this rank's shards)")
        raise InvalidArgumentError(
            f"select_distributed: method {method!r} is not supported on a sharded (FSDP2) model "
            f"yet: {why}; supported: {list(SHARDED_METHODS)}, or select on the unsharded model "
            f"and pass the mask on"
        )


def _check_curvature(config: Any, always: list[str], named: list[tuple[str, Tensor]]) -> None:
    """``sam_curvature``'s checks, before any collective: an h that a sharded model can give
    (:mod:`.fsdp_curvature`), a parameter to score."""
    if config.curvature is None and config.curvature_method not in SHARDED_CURVATURE:
        raise InvalidArgumentError(
            f"select_distributed: sam_curvature with curvature_method="
            f"{config.curvature_method!r} is not supported on a sharded (FSDP2) model: it needs "
            f"Hessian-vector products or per-example gradients through torch.func over the "
            f"whole model, which FSDP2's shards and its first-order backward cannot give; use "
            f"curvature_method='finite_difference' (the same probes, central gradient "
            f"differences) or pass a precomputed curvature=")
    if all(n in set(always) for n, _ in named):
        raise InvalidArgumentError("sam_curvature has no parameter to score (all excluded)")


def _check_head_warmup(always: list[str], data: Iterable[Any] | None) -> None:
    """after_head_warmup's checks, before any collective: a head to train, data read twice."""
    if not always:
        raise InvalidArgumentError(
            "head_warmup_steps trains the always_train parameters (the task head) alone before "
            "scoring, but always_train is empty: name the head, e.g. always_train="
            "['classifier.weight', 'classifier.bias']"
        )
    if data is not None and iter(data) is data:
        raise InvalidArgumentError(
            f"head_warmup_steps reads data twice (the head warm-up, then the scores), but data "
            f"is a one-shot iterator ({type(data).__name__}): pass a list or a DataLoader"
        )


def _gradient_sums(model: nn.Module, params: Mapping[str, Tensor], loss_fn: LossFn,
                   data: Iterable[Any], num_batches: int | None, max_grad_norm: float | None,
                   square_each: bool, group: Any) -> dict[str, Tensor]:
    """This rank's shard of the sum over global batches of the clipped gradient (or of its
    square); weights, ``.grad`` fields and train/eval modes left as found. Collective."""
    totals = {n: torch.zeros_like(local(p.detach())) for n, p in params.items()}
    seen, device = 0, _device(group)
    with restoring(model, parameters=False):  # modes, .grad fields (None meanwhile), buffers
        model.eval()
        for batch in global_batches(data, num_batches, device, group):
            loss_fn(model, batch).backward()
            grads = {n: None if p.grad is None else local(p.grad) for n, p in params.items()}
            scale = 1.0
            if max_grad_norm is not None:
                sq = sum((g.double().square().sum() for g in grads.values() if g is not None),
                         torch.zeros((), dtype=torch.float64)).to(device)
                dist.all_reduce(sq, group=group)
                scale = min(1.0, max_grad_norm / (float(sq.sqrt()) + 1e-6))
            for n, g in grads.items():
                if g is not None:
                    g = g * scale if scale < 1.0 else g
                    totals[n].add_(g.square() if square_each else g)
                params[n].grad = None
            seen += 1
    if seen == 0:
        raise InvalidArgumentError("data yielded no batch: these scores need at least one batch")
    return totals


def _all_gather(values: Tensor, positions: Tensor, group: Any) -> tuple[Tensor, Tensor]:
    """Every rank's (values, positions), concatenated in rank order. Collective."""
    device, world = _device(group), dist.get_world_size(group)
    count = torch.tensor([values.numel()], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    most = max(sizes)
    out = []
    for t in (values.to(device), positions.to(device)):
        padded = torch.zeros(most, dtype=t.dtype, device=device)
        padded[:t.numel()] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out.append(torch.cat([part[:n] for part, n in zip(parts, sizes)]).cpu())
    return out[0], out[1]


def _top(values: Tensor, k: int) -> Tensor:
    """Positions (into ``values``, sorted) of the top ``k``, ties to the lowest position."""
    top = StreamingTopK(k)
    for start in range(0, values.numel(), SLICE):
        top.add(values[start:start + SLICE], start)
    return top.positions()


def sharded_top_k(params: Mapping[str, Tensor], scores: Mapping[str, Tensor], density: float,
                  scope: str, always_train: Iterable[str], targets: Iterable[str] | None,
                  group: Any) -> Mask:
    """:meth:`Mask.top_k` over sharded ``params`` from each rank's local ``scores`` (shaped
    like ``local(param)``): the same mask on every rank. Collective."""
    sizes = {n: p.numel() for n, p in params.items()}
    plan = check_budget(sizes, density, scope, always_train=always_train, targets=targets)
    offsets, offset = {}, 0
    for n in plan.candidates:
        offsets[n], offset = offset, offset + sizes[n]
    k = {n: math.floor(plan.share * sizes[n]) for n in plan.candidates}
    total_k = budget_size(plan.total, plan.density)
    values, positions = [], []
    top = StreamingTopK(total_k)
    for n in plan.candidates:
        first = offsets[n] + shard_span(params[n])[0]
        flat = scores[n].detach().reshape(-1)
        mine = StreamingTopK(k[n]) if scope == "per_tensor" else top
        for start in range(0, flat.numel(), SLICE):
            mine.add(flat[start:start + SLICE].to(torch.float64), first + start)
        if scope == "per_tensor":
            positions.append(mine.positions())
            values.append(flat[(positions[-1] - first).to(flat.device)].to(torch.float64))
    if scope == "global":
        pos = top.positions()
        starts = torch.tensor([offsets[n] + shard_span(params[n])[0] for n in plan.candidates],
                              dtype=torch.int64)
        owner = torch.searchsorted(starts, pos, right=True) - 1
        for i, n in enumerate(plan.candidates):
            at = pos[owner == i]
            flat = scores[n].detach().reshape(-1)
            positions.append(at)
            values.append(flat[(at - int(starts[i])).to(flat.device)].to(torch.float64))
    cat = (lambda ts, dtype: torch.cat([t.cpu() for t in ts]) if ts  # noqa: E731
           else torch.zeros(0, dtype=dtype))
    all_values, all_positions = _all_gather(cat(values, torch.float64),
                                            cat(positions, torch.int64), group)
    order = torch.argsort(all_positions)
    all_values, all_positions = all_values[order], all_positions[order]
    edges = torch.searchsorted(all_positions,
                               torch.tensor([*offsets.values(), offset], dtype=torch.int64))
    chosen: dict[str, Tensor] = {}
    if scope == "global":
        pos = all_positions[_top(all_values, total_k)]
        bounds = torch.searchsorted(pos, torch.tensor([*offsets.values(), offset]))
        for i, n in enumerate(plan.candidates):
            chosen[n] = pos[int(bounds[i]):int(bounds[i + 1])] - offsets[n]
    else:
        for i, n in enumerate(plan.candidates):
            lo, hi = int(edges[i]), int(edges[i + 1])
            chosen[n] = all_positions[lo:hi][_top(all_values[lo:hi], k[n])] - offsets[n]
    return Mask.from_indices({n: p.shape for n, p in params.items()},
                             {n: c.to(local(params[n]).device) for n, c in chosen.items()},
                             always_train=plan.always)


def select_sharded(
    model: nn.Module,
    method: str,
    density: float | None = None,
    *,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    scope: str = "global",
    seed: int = 0,
    always_train: Iterable[str] = (),
    targets: str | Iterable[str] | None = None,
    **options: Any,
) -> Mask:
    """The mask :func:`sparsetune.select` gives for the unsharded model on the global batches,
    on every rank of the mesh of an FSDP2-sharded ``model`` (module docstring). Collective.

    Options: the method's (``progress`` defaults to False and draws no bar); ``data`` is this
    rank's part of each global batch.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    group = process_group(p for _, p in named)
    if group is None:
        raise InvalidArgumentError("select_sharded takes a model sharded with fully_shard")
    options = {"progress": False, **options}

    def check():
        check_sharding(named, "select_distributed")
        _refuse_unsupported(method)
        checked = check_select(model, method, density, scope=scope, seed=seed,
                               always_train=always_train, targets=targets, options=options)
        if checked.config.needs_data and data is None:
            raise InvalidArgumentError(f"method {method!r} needs data= (this rank's batches)")
        if getattr(checked.config, "head_warmup_steps", None):
            _check_head_warmup(checked.always, data)
        if method == "sam_curvature":
            _check_curvature(checked.config, checked.always, named)
        return checked

    checked = checked_on_every_rank(check, group)
    config, always = checked.config, checked.always
    if method in _SHAPES_ONLY:  # no value read: every rank draws the same mask
        return checked_on_every_rank(lambda: config.build(
            checked.model, density, scope, always, data=None, loss_fn=None, seed=seed,
            targets=checked.targets), group)
    params = dict(named)
    steps = config.steps if method == "lt_sft" else getattr(config, "burn_in_steps", 0)
    if steps:
        with sharded_burned_in(model, params, loss_fn or transformers_loss, data, steps=steps,
                               lr=config.lr, seed=seed, device=_device(group), group=group,
                               offload=config.offload) as initial:
            if method == "lt_sft":
                scores = {n: (local(p.detach()) - initial[n]).abs() for n, p in params.items()}
            else:
                scores = {n: local(p.detach()).abs() for n, p in params.items()}
            return _top_k(method, params, scores, density, scope, always, checked.targets, group)
    if method == "magnitude":
        scores = {n: local(p.detach()).abs() for n, p in params.items()}
        return _top_k(method, params, scores, density, scope, always, checked.targets, group)
    loss_fn = loss_fn or transformers_loss
    if method == "diff_pruning":
        scores = sharded_diff_pruning_scores(
            model, params, loss_fn, data, steps=config.steps, lr=config.lr,
            l0_weight=config.l0_weight, init_log_alpha=config.init_log_alpha, seed=seed,
            device=_device(group), group=group)
        return _top_k(method, params, scores, density, scope, always, checked.targets, group)
    warmup = getattr(config, "head_warmup_steps", None)
    head = sharded_head_warmed_up(
        model, params, always, loss_fn, data, steps=warmup, lr=config.head_warmup_lr, seed=seed,
        device=_device(group), group=group) if warmup else contextlib.nullcontext()
    if method == "sam_curvature" and config.curvature is None and config.curvature_data is None:
        data = reiterable(data, config.num_batches)  # read twice: gradient, then curvature
    with head:  # sam: the scores after the head warm-up, the head then put back
        totals = _gradient_sums(model, params, loss_fn, data, config.num_batches,
                                config.max_grad_norm, config.square_each, group)
        if method == "sam_curvature":
            scores = _curvature_scores(model, params, always, loss_fn, data, totals, config,
                                       seed, group)
        else:
            scores = config.scores_from_statistic(totals)
    return _top_k(method, params, scores, density, scope, always, checked.targets, group)


def _curvature_scores(model: nn.Module, params: Mapping[str, Tensor], always: list[str],
                      loss_fn: LossFn, data: Iterable[Any], g: Mapping[str, Tensor],
                      config: Any, seed: int, group: Any) -> dict[str, Tensor]:
    """``sam_curvature``'s g^2 / max(h, epsilon) on this rank's shards, h from the sharded
    finite differences or the precomputed curvature (:mod:`.fsdp_curvature`); 0 for the
    always-trained parameters, as in one process. Collective."""
    names = [n for n in params if n not in set(always)]
    if config.curvature is not None:
        h = checked_on_every_rank(
            lambda: sharded_curvature({n: params[n] for n in names}, config.curvature), group)
    else:
        fresh = config.curvature_data is not None
        h = sharded_finite_difference_diagonal(
            model, params, names, loss_fn, config.curvature_data if fresh else data,
            num_batches=None if fresh else config.num_batches, num_samples=config.num_samples,
            seed=seed, device=_device(group), group=group)
    epsilon = sharded_floor(h, config.floor, config.floor_fraction, _device(group), group)
    return {n: t.square() / h[n].clamp(min=epsilon).to(t) if n in h else torch.zeros_like(t)
            for n, t in g.items()}


def _top_k(method: str, params: Mapping[str, Tensor], scores: Mapping[str, Tensor],
           density: float, scope: str, always: list[str], targets: list[str] | None,
           group: Any) -> Mask:
    """:func:`sharded_top_k` of finite ``scores`` (else the same error on every rank)."""
    bad = [n for n, t in scores.items() if not bool(torch.isfinite(t).all())]
    raise_on_every_rank(InvalidScoresError(
        f"the {method} scores of {bad} have NaN or infinite entries on this rank's shards"
    ) if bad else None, group)
    return sharded_top_k(params, scores, density, scope, always, targets, group)
