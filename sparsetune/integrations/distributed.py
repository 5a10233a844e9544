"""The same mask on every rank under torch.distributed (DDP), and what FSDP2 does not support.

Every rank of a data-parallel run must train the same entries. Two ways to get there:

* **All-reduced statistics.** :func:`select_distributed` with ``"sam"`` or ``"child_pruning"``
  scores every rank's own batches and sums the statistic over ranks before the top-k: SAM's
  summed gradient g (theory/ E5: the score is g_i^2 of the *sum* over all batches, so the
  gradient is all-reduced, then squared) or Child-Tuning-D's sum of squared gradients. The
  result is the mask a single process would select on all ranks' batches together, computed in
  parallel; :meth:`Mask.top_k` is deterministic, so every rank gets the same mask.
* **Select once, broadcast.** Any other method runs on rank ``src`` with its data, and
  :func:`broadcast_mask` sends the mask to every rank.

Then train as usual: ``DistributedDataParallel`` averages gradients, and
``SparseAdamW(ddp_model.module, mask)`` (names of the unwrapped module, as in the mask) steps
identically on every rank, keeping its compact state (selected entries only) on each rank.

FSDP2 (``torch.distributed.fsdp.fully_shard``, parameters sharded on dim 0): ``SparseAdamW`` and
``SparseSGD`` take the sharded model and the global mask; each rank keeps state only for the
selected entries of its own shard, steps on ``to_local()`` shards, and ``clip_grad_norm_``
all-reduces the norm (:mod:`sparsetune.optim.sharded`: what is and is not supported yet). Select
the mask with :func:`select_distributed` on the sharded model (``random``, ``bitfit``,
``names``, ``magnitude`` with or without burn-in, ``sam`` with or without head warm-up,
``child_pruning``, ``lt_sft``, ``diff_pruning``, ``sam_curvature`` with finite-difference or
precomputed curvature: :mod:`.fsdp_select`), or before sharding
and check it with :func:`assert_same_mask`; :func:`sparsetune.integrations.fsdp.extract_delta`
gathers the sparse delta on one rank. ``prepare()`` and the delta modules are not supported on
a sharded model yet, and :class:`MaskedOptimizer` refuses DTensors
(:func:`reject_sharded_parameters`).

Collectives run on the CPU for gloo and on the current CUDA device for NCCL. Every function here
is collective: call it on every rank of ``group``, in the same order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._loss import LossFn, transformers_loss
from ..errors import InvalidArgumentError, ParameterMismatchError, StateMismatchError
from ..mask import Mask
from ..optim import reject_sharded_parameters as _reject_sharded
from ..optim.sharded import is_sharded, process_group
from ..select import METHODS, check_select, method_spec, select
from .fsdp_select import select_sharded

__all__ = [
    "ALL_REDUCED_METHODS",
    "all_reduce_scores",
    "assert_same_mask",
    "broadcast_mask",
    "reject_sharded_parameters",
    "select_distributed",
]

#: Methods whose statistic is a sum over batches, so it can be all-reduced over ranks
#: (``method_spec(name).all_reducible``).
ALL_REDUCED_METHODS = tuple(m for m in METHODS if method_spec(m).all_reducible)


def _check_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgumentError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group "
            "(backend 'gloo' on CPU, 'nccl' on CUDA) on every rank first"
        )


def _device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _layout_digest(items: Iterable[tuple[str, tuple[int, ...]]]) -> Tensor:
    h = hashlib.sha256()
    for name, shape in items:
        h.update(f"{name}\0{tuple(shape)}\0".encode())
    return torch.tensor(list(h.digest()), dtype=torch.int64)


def _agree(value: Tensor, group: Any) -> bool:
    """True on every rank when ``value`` (int64) is the same on every rank of ``group``."""
    low, high = value.clone(), value.clone()
    dist.all_reduce(low, dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(low, high))


def _check_same_layout(tensors: Mapping[str, Tensor], what: str, group: Any) -> None:
    layout = [(n, tuple(t.shape)) for n, t in tensors.items()]
    if not _agree(_layout_digest(layout).to(_device(group)), group):
        raise ParameterMismatchError(
            f"{what} differ in names or shapes between ranks (rank {dist.get_rank(group)} has "
            f"{len(layout)} tensors, e.g. {layout[:3]}): every rank must hold the same model"
        )


def all_reduce_scores(scores: Mapping[str, Tensor], *, group: Any = None) -> dict[str, Tensor]:
    """The sum over ranks of ``name -> tensor`` statistics (one flat all-reduce).

    Every rank must pass the same names and shapes (checked first, on every rank). The input is
    not modified; the result has the inputs' dtypes and devices.
    """
    _check_initialized()
    if not isinstance(scores, Mapping) or not scores:
        raise InvalidArgumentError("scores must be a non-empty mapping of names to tensors")
    _check_same_layout(scores, "scores", group)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in scores.values()) else (
        torch.float32
    )
    flat = torch.cat([t.detach().reshape(-1).to(_device(group), dtype) for t in scores.values()])
    dist.all_reduce(flat, dist.ReduceOp.SUM, group=group)
    parts = flat.split([t.numel() for t in scores.values()])
    return {
        n: part.reshape(t.shape).to(device=t.device, dtype=t.dtype)
        for (n, t), part in zip(scores.items(), parts)
    }


def broadcast_mask(mask: Mask | None, *, src: int = 0, group: Any = None) -> Mask:
    """Rank ``src``'s mask, on every rank of ``group``.

    On rank ``src`` (a global rank) pass the mask; on the others pass ``None`` to receive it,
    or a mask to have it checked (:class:`StateMismatchError` if it differs from ``src``'s).
    Names, shapes and always-trained names travel with the bits; received tensors are on the
    CPU, or on the devices of the mask a rank passed. If ``src`` passes ``None``, every rank
    raises (rather than wait for a mask that never comes).
    """
    _check_initialized()
    if mask is not None and not isinstance(mask, Mask):
        raise InvalidArgumentError(f"mask must be a sparsetune.Mask or None, got {type(mask)}")
    return _broadcast(mask, src, group, None)


def _broadcast(mask: Mask | None, src: int, group: Any, failure: str | None) -> Mask:
    rank = dist.get_rank()
    header: list[Any] = [None]
    if rank == src:
        if failure is not None or mask is None:
            header = [{"failure": failure or f"broadcast_mask: rank {src} (src) passed no mask"}]
        else:
            header = [[(n, tuple(t.shape), n in mask.always_train) for n, t in mask.items()]]
    dist.broadcast_object_list(header, src=src, group=group, device=_device(group))
    if isinstance(header[0], dict):
        raise InvalidArgumentError(header[0]["failure"])
    layout = header[0]
    sizes = [torch.Size(shape).numel() for _, shape, _ in layout]
    if rank == src:
        device = _device(group)
        bits = torch.cat([mask[n].reshape(-1).to(device, torch.uint8) for n, _, _ in layout])
    else:
        bits = torch.empty(sum(sizes), dtype=torch.uint8, device=_device(group))
    dist.broadcast(bits, src=src, group=group)
    tensors = {}
    for (name, shape, _), part in zip(layout, bits.split(sizes)):
        device = mask[name].device if mask is not None and name in mask else "cpu"
        tensors[name] = part.reshape(shape).to(device=device, dtype=torch.bool)
    received = Mask(tensors, always_train=[n for n, _, always in layout if always])
    if rank != src and mask is not None and mask != received:
        raise StateMismatchError(
            f"rank {rank}'s mask (digest {mask.digest()[:12]}...) differs from rank {src}'s "
            f"(digest {received.digest()[:12]}...)"
        )
    return received


def assert_same_mask(mask: Mask, *, group: Any = None) -> Mask:
    """Raise :class:`StateMismatchError` on every rank unless all ranks hold the same mask."""
    _check_initialized()
    digest = torch.tensor(list(bytes.fromhex(mask.digest())), dtype=torch.int64)
    if not _agree(digest.to(_device(group)), group):
        raise StateMismatchError(
            f"the ranks hold different masks (rank {dist.get_rank(group)} has digest "
            f"{mask.digest()[:12]}...): select on all-reduced statistics or broadcast_mask"
        )
    return mask


def select_distributed(
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
    src: int = 0,
    group: Any = None,
    **options: Any,
) -> Mask:
    """:func:`sparsetune.select` for a data-parallel run: the same mask on every rank.

    For ``"sam"`` and ``"child_pruning"`` (:data:`ALL_REDUCED_METHODS`) each rank scores its
    own ``data`` (its shard of the batches) and the statistic is summed over ranks before the
    top-k, which gives the mask of a single process scoring all ranks' batches (theory/ E5).
    Options: the method's ``statistic_options``: ``num_batches`` (per rank), ``max_grad_norm``,
    ``progress`` (default False). Any other method runs
    on rank ``src`` only (``data`` matters there) and the mask is broadcast. Either way the
    masks are checked to be identical on every rank. ``targets``: as in :func:`select`.

    On a model sharded with FSDP2 (``fully_shard``) each rank scores its own shards and the
    exact top-k is found across ranks (:mod:`sparsetune.integrations.fsdp_select`: the methods
    supported, and what a batch is there); ``group`` is then the model's mesh.
    """
    _check_initialized()
    if any(is_sharded(p) for p in model.parameters()):
        return assert_same_mask(select_sharded(
            model, method, density, data=data, loss_fn=loss_fn, scope=scope, seed=seed,
            always_train=always_train, targets=targets, **options,
        ), group=process_group(model.parameters()))
    checked = check_select(model, method, density, scope=scope, seed=seed,
                           always_train=always_train, targets=targets, options=options)
    model = checked.model
    spec = method_spec(method)
    if spec.all_reducible:
        extra = sorted(set(options) - spec.statistic_options)
        if extra:
            raise InvalidArgumentError(
                f"method {method!r} does not take options {extra}; it takes "
                f"{sorted(spec.statistic_options)}"
            )
        if data is None:
            raise InvalidArgumentError(f"method {method!r} needs data= (this rank's batches)")
        if density is None:
            raise InvalidArgumentError(f"method {method!r} needs a density in (0, 1]")
        config = spec.from_options({"progress": False, **options})
        stat = config.statistic(model, loss_fn or transformers_loss, data)
        total = all_reduce_scores(stat, group=group)
        mask = Mask.top_k(config.scores_from_statistic(total), density, scope,
                          always_train=always_train, targets=checked.targets)
    else:
        mask, failure = None, None
        if dist.get_rank() == src:
            try:
                mask = select(model, method, density, data=data, loss_fn=loss_fn, scope=scope,
                              seed=seed, always_train=always_train, targets=targets, **options)
            except Exception as exc:  # tell the other ranks, which wait for the mask
                failure = f"selection failed on rank {src}: {exc}"
                _broadcast(None, src, group, failure)
        mask = _broadcast(mask, src, group, failure)
    return assert_same_mask(mask, group=group)


def reject_sharded_parameters(model_or_named: Any, who: str = "sparsetune") -> None:
    """Raise if any parameter is a DTensor (FSDP2 ``fully_shard``, tensor parallelism).

    A mask indexes entries of full parameters and a DTensor holds one shard per rank, so what
    works on full parameters (MaskedOptimizer, selection) cannot use it; SparseAdamW and
    SparseSGD accept FSDP2's shards (:mod:`sparsetune.optim.sharded`).
    """
    named = (
        list(model_or_named.named_parameters())
        if isinstance(model_or_named, nn.Module)
        else list(model_or_named)
    )
    _reject_sharded(named, who)

