"""``torch.distributed.checkpoint`` (DCP) for SparseAdamW / SparseSGD on FSDP2: save on N ranks,
load on M.

A sharded optimizer's ``state_dict()`` is per rank: the moments (masters, ``theta0``, momentum)
of the selected entries of its shard, in the order of their flat indices. Since ``Shard(0)``
shards are consecutive rows, those per-rank arrays laid end to end in rank order are exactly
the single-process compact state: one 1-D array per parameter and state key, of length
``mask.count(name)``, sorted by global flat index. :func:`sharded_optimizer_state` hands DCP
that global view: each rank's array is its chunk ``[c_r, c_r + n_r)`` of a ``ShardedTensor``
(``c_r`` = selected entries before the shard's first entry), so no dense tensor and no index
is saved. On load the new ranks describe their own chunks (the same mask over the new
shards) and DCP reads the overlapping saved chunks: resharding 2 -> 4 ranks or back is DCP's
ordinary chunk matching. Per parameter ``step``, the param groups (hyperparameters) and the mask
digest travel as one small replicated object; :func:`load_sharded_optimizer_state` refuses a
checkpoint saved with another mask.

Usage (every rank)::

    dcp.save({"model": model.state_dict(), "optim": sharded_optimizer_state(opt)}, checkpoint_id=p)
    # later, on any number of ranks, the model sharded again and the optimizer built anew:
    state = {"model": model.state_dict()}; dcp.load(state, checkpoint_id=p)
    model.load_state_dict(state["model"]); load_sharded_optimizer_state(opt, p)

The ``ShardedTensor`` used for the chunks lives in ``torch.distributed._shard`` (the layout DCP
reshards by offsets); DTensor's own ``Shard(0)`` cannot express chunks of unequal length.
"""

from __future__ import annotations

import copy
import os
import pickle
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, init_from_local_shards

from ..errors import InvalidArgumentError, StateMismatchError
from ..optim.sharded import is_sharded
from ._ranks import raise_on_every_rank
from .fsdp import shard_span

__all__ = ["FORMAT_VERSION", "load_sharded_optimizer_state", "sharded_optimizer_state"]

FORMAT_VERSION = 1


def _named(optimizer: Any) -> dict[str, Tensor]:
    """``name -> parameter`` of a sharded compact optimizer (raise for anything else)."""
    group = getattr(optimizer, "_shard_group", None)
    if group is None or not hasattr(optimizer, "mask"):
        raise InvalidArgumentError(
            f"sharded optimizer state needs a SparseAdamW or SparseSGD over an FSDP2 "
            f"(fully_shard) model, got {type(optimizer).__name__} over unsharded parameters"
        )
    return {n: p for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"])}


def _chunk(optimizer: Any, name: str, param: Tensor) -> tuple[int, int]:
    """(first, count): this rank's share of ``name``'s selected entries in the global order."""
    if not is_sharded(param):
        raise InvalidArgumentError(f"parameter {name!r} is not sharded")
    mask = optimizer.mask
    if name not in mask:
        return 0, 0
    first, end = shard_span(param)
    index = mask.indices(name).to(torch.int64).cpu()
    lo, hi = (int(i) for i in torch.searchsorted(index, torch.tensor([first, end])))
    return lo, hi - lo


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidArgumentError(f"the checkpoint names an unknown dtype {name!r}")
    return dtype


def _sharded(local: Tensor | None, first: int, total: int, group: Any) -> ShardedTensor:
    """A 1-D ShardedTensor of ``total`` entries whose chunk on this rank is ``local``."""
    shards = []
    if local is not None and local.numel():
        rank = dist.get_global_rank(group, dist.get_rank(group))
        shards = [Shard.from_tensor_and_offsets(local.reshape(-1).contiguous(), [first], rank)]
    return init_from_local_shards(shards, total, process_group=group)


def sharded_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """The state of a sharded SparseAdamW / SparseSGD as DCP saves and reshards it (module
    docstring): ``{"meta": {...}, "state": {"<name>/<key>": ShardedTensor}}``. Collective."""
    named = _named(optimizer)
    group = optimizer._shard_group
    saved = optimizer.state_dict()
    ids = {pid: name for g in saved["param_groups"] for pid, name in zip(g["params"],
                                                                          g["param_names"])}
    mine: dict[str, dict[str, Any]] = {}
    for pid, entry in saved["state"].items():
        name = ids[pid]
        step = entry.get("step")  # absent before the first step
        keys = {k: str(v.dtype) if isinstance(v, Tensor) else None
                for k, v in entry.items() if k != "step"}
        mine[name] = {"step": None if step is None else int(step), "keys": keys,
                      "count": _chunk(optimizer, name, named[name])[1]}
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    meta: dict[str, dict[str, Any]] = {}
    error = None
    for found in every:
        for name, d in found.items():
            if d["count"] == 0:
                continue
            if name in meta and (meta[name]["step"], meta[name]["keys"]) != (d["step"], d["keys"]):
                error = InvalidArgumentError(
                    f"the ranks' optimizer states of {name!r} disagree (steps {meta[name]['step']}"
                    f" and {d['step']}, keys {meta[name]['keys']} and {d['keys']})"
                )
            meta.setdefault(name, {"step": d["step"], "keys": d["keys"]})
    raise_on_every_rank(error, group)
    pids = {name: pid for pid, name in ids.items()}
    state = {}
    for name in sorted(meta):
        first, count = _chunk(optimizer, name, named[name])
        entry = saved["state"].get(pids[name], {})
        for key, dtype in meta[name]["keys"].items():
            if dtype is None:  # e.g. SGD's momentum buffer before its first step
                continue
            local = entry.get(key) if count else None
            state[f"{name}/{key}"] = _sharded(local, first, optimizer.mask.count(name), group)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]]
    info = {"format_version": FORMAT_VERSION, "mask_digest": optimizer.mask.digest(),
            "world": dist.get_world_size(group), "param_groups": groups, "parameters": meta}
    return {"meta": pickle.dumps(info), "state": state}  # bytes: one object for DCP


def load_sharded_optimizer_state(
    optimizer: Any,
    checkpoint_id: str | os.PathLike | None = None,
    *,
    storage_reader: Any = None,
    key: str = "optim",
) -> None:
    """Load into ``optimizer`` (sharded over any number of ranks) the state that
    :func:`sharded_optimizer_state` gave to ``dcp.save`` under ``key``. Collective.

    ``checkpoint_id`` / ``storage_reader`` are passed to ``dcp.load``. The optimizer must have
    the mask the state was saved with (:class:`~sparsetune.StateMismatchError` otherwise) and
    the same parameter names and groups; its hyperparameters are replaced by the saved ones.
    """
    named = _named(optimizer)
    group = optimizer._shard_group
    holder: dict[str, Any] = {key: {"meta": b""}}
    try:
        dcp.load(holder, checkpoint_id=checkpoint_id, storage_reader=storage_reader,
                 process_group=group)
    except dcp.CheckpointException as exc:  # raised on every rank: a key absent, say
        raise InvalidArgumentError(
            f"checkpoint key {key!r} holds no sparsetune sharded optimizer state (format "
            f"{FORMAT_VERSION}): {str(exc).strip().splitlines()[-1]}"
        ) from exc
    raw = holder[key]["meta"]
    info = pickle.loads(raw) if isinstance(raw, bytes) and raw else None
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        raise InvalidArgumentError(
            f"checkpoint key {key!r} holds no sparsetune sharded optimizer state of format "
            f"{FORMAT_VERSION} (found {type(info).__name__})"
        )
    if info["mask_digest"] != optimizer.mask.digest():  # the same on every rank: no hang
        raise StateMismatchError(
            f"{type(optimizer).__name__}.load_state_dict: the state was saved with mask digest "
            f"{info['mask_digest'][:16]}..., but this optimizer's mask has digest "
            f"{optimizer.mask.digest()[:16]}...; build the optimizer with the saved mask"
        )
    groups = info["param_groups"]
    names = [g["param_names"] for g in optimizer.param_groups]
    if [g["param_names"] for g in groups] != names:
        raise InvalidArgumentError(
            "the checkpoint's optimizer has other parameters or groups than this one: "
            f"saved {[len(g['param_names']) for g in groups]} names per group, here "
            f"{[len(n) for n in names]}"
        )
    meta, chunks, template = info["parameters"], {}, {}
    for name in sorted(meta):
        first, count = chunks[name] = _chunk(optimizer, name, named[name])
        for k, dtype in meta[name]["keys"].items():
            if dtype is None:
                continue
            local = torch.empty(count, dtype=_dtype(dtype), device=named[name].to_local().device)
            template[f"{name}/{k}"] = _sharded(local, first, optimizer.mask.count(name), group)
    holder = {key: {"state": template}}
    dcp.load(holder, checkpoint_id=checkpoint_id, storage_reader=storage_reader,
             process_group=group)
    loaded = holder[key]["state"]
    state, pid = {}, 0
    for g in optimizer.param_groups:
        for name, p in zip(g["param_names"], g["params"]):
            # an empty shard counts as fully selected: it holds (empty) state too
            if name in meta and optimizer.selection(p).kind != "none":
                step = meta[name]["step"]
                entry: dict[str, Any] = {} if step is None else {"step": step}
                for k, dtype in meta[name]["keys"].items():
                    shards = [] if dtype is None else loaded[f"{name}/{k}"].local_shards()
                    entry[k] = None if dtype is None else shards[0].tensor if shards else (
                        torch.empty(0, dtype=_dtype(dtype), device=p.to_local().device))
                state[pid] = entry
            pid += 1
    first_ids, param_groups = 0, []
    for g, saved in zip(optimizer.param_groups, groups):
        param_groups.append({**copy.deepcopy(saved),
                             "params": list(range(first_ids, first_ids + len(g["params"])))})
        first_ids += len(g["params"])
    shard = [dist.get_rank(group), dist.get_world_size(group)]
    optimizer.load_state_dict({
        "state": state, "param_groups": param_groups,
        "sparsetune": {"mask_digest": info["mask_digest"], "format_version": 1, "shard": shard},
    })
