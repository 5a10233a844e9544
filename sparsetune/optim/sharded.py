"""The compact optimizers on FSDP2 (``torch.distributed.fsdp.fully_shard``): one shard per rank.

``fully_shard`` replaces each parameter of shape ``(n, ...)`` by a DTensor with placement
``Shard(0)`` on a 1-D device mesh of ``world`` ranks: rank ``r`` holds rows ``[start, end)``
with ``chunk = ceil(n / world)``, ``start = min(r * chunk, n)``, ``end = min(start + chunk, n)``
(``torch.chunk``; FSDP2 pads the storage to ``chunk`` rows on every rank, so later ranks of an
uneven split hold fewer rows, possibly none). A :class:`~sparsetune.Mask` is over full
parameter shapes; each rank slices rows ``[start, end)`` of it once, so its
:class:`~sparsetune.optim.Selection` (and so its compact state) covers only the selected
entries of its own shard, with flat indices local to the shard.

The step then works on ``p.to_local()`` and ``p.grad.to_local()`` (the reduce-scattered, i.e.
rank-averaged, gradient): no collective in ``step()``; frozen entries are never written.
``clip_grad_norm_`` all-reduces the local sums of ``|g|^p`` (max for ``p = inf``) over the
mesh, so every rank clips by the same global norm of the selected entries.

``state_dict()`` holds this rank's state (moments, masters, ... of its shard's selected
entries) and records ``[rank, world]``; ``load_state_dict`` refuses a state saved by another
rank or sharding. To save on N ranks and load on M, go through ``torch.distributed.checkpoint``
with :mod:`sparsetune.integrations.fsdp_checkpoint` (a global, resharded view of the state).
Building the optimizer checks (collectively) that every rank passed the same mask.

Not supported yet: placements other than ``(Shard(0),)`` on a 1-D mesh (HSDP, tensor
parallelism) and ``step_in_backward`` raise a clear error; the ``"flat"`` and ``"packed"``
steps fall back to ``"foreach"``; fp32 gradient accumulation of 16-bit parameters is off (use
FSDP2's ``MixedPrecisionPolicy(reduce_dtype=torch.float32)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import InvalidArgumentError, StateMismatchError

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed support has no DTensor
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def is_sharded(tensor: Any) -> bool:
    """True for a DTensor (a parameter or gradient under ``fully_shard``)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (its storage: in-place writes reach the parameter), or
    ``tensor`` itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def check_sharding(named: Iterable[tuple[str, Tensor]], who: str) -> None:
    """Raise unless every DTensor among ``named`` is ``Shard(0)`` on one 1-D mesh (FSDP2)."""
    meshes, bad, plain = [], [], []
    for name, p in named:
        if not is_sharded(p):
            plain.append(name)
            continue
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            bad.append(f"{name} (mesh of {p.device_mesh.ndim} dims, {tuple(p.placements)})")
        elif not any(p.device_mesh == m for m in meshes):
            meshes.append(p.device_mesh)
    if bad:
        raise InvalidArgumentError(
            f"{who} supports sharded parameters only as FSDP2's fully_shard lays them out "
            f"(placements (Shard(0),) on a 1-D device mesh); {len(bad)} parameters are not, "
            f"e.g. {bad[:3]}. HSDP and tensor parallelism are not supported yet"
        )
    if meshes and plain:
        raise InvalidArgumentError(
            f"{who}: some parameters are sharded (FSDP2) and some are not, e.g. {plain[:3]}; "
            f"shard the whole model (fully_shard on the root module too)"
        )
    if len(meshes) > 1:
        raise InvalidArgumentError(
            f"{who}: the sharded parameters live on {len(meshes)} different device meshes; "
            f"give one optimizer the parameters of one mesh"
        )


def shard_rows(param: Tensor) -> tuple[int, int]:
    """The rows ``[start, end)`` of the full parameter that this rank's shard holds."""
    rows = param.shape[0]
    mesh = param.device_mesh
    world, rank = mesh.size(0), mesh.get_local_rank(0)
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    end = min(start + chunk, rows)
    held = param.to_local().shape[0]
    if held != end - start:
        raise InvalidArgumentError(
            f"a shard of {rows} rows on rank {rank} of {world} should hold rows "
            f"[{start}, {end}) as torch.chunk splits them, but it holds {held} rows"
        )
    return start, end


def local_mask(param: Tensor, selected: Tensor) -> Tensor:
    """``selected`` (over the full parameter) restricted to this rank's shard of ``param``;
    ``selected`` itself for a plain tensor."""
    if not is_sharded(param):
        return selected
    start, end = shard_rows(param)
    return selected[start:end]


def process_group(params: Iterable[Tensor]) -> Any:
    """The process group of the mesh of the first DTensor in ``params``; None if there is none."""
    for p in params:
        if is_sharded(p):
            return p.device_mesh.get_group(0)
    return None


def joined_group(optimizer: Any, params: Iterable[Tensor], first: bool) -> Any:
    """The process group of a new param group's shards (None: unsharded); raise if it is
    sharded and the optimizer's earlier groups are not, or the other way round."""
    group = process_group(params)
    if group is not None:
        check_same_mask(optimizer.mask, group, type(optimizer).__name__)
    if not first and (group is None) != (optimizer._shard_group is None):
        kinds = ("sharded", "unsharded") if group is not None else ("unsharded", "sharded")
        raise InvalidArgumentError(
            f"{type(optimizer).__name__}: a param group of {kinds[0]} parameters cannot join "
            f"groups of {kinds[1]} ones"
        )
    return group


def check_same_mask(mask: Any, group: Any, who: str) -> None:
    """Raise :class:`StateMismatchError` on every rank of ``group`` unless all hold a mask of
    the same digest (each rank would train other entries of its shard). Collective."""
    device = torch.device("cuda", torch.cuda.current_device()) if (
        dist.get_backend(group) == "nccl") else torch.device("cpu")
    digest = torch.tensor(list(bytes.fromhex(mask.digest())), dtype=torch.int64, device=device)
    low, high = digest.clone(), digest.clone()
    dist.all_reduce(low, dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise StateMismatchError(
            f"{who}: the ranks hold different masks (rank {dist.get_rank(group)} has digest "
            f"{mask.digest()[:12]}...): every rank must pass the same global mask (select it "
            f"with select_distributed, or broadcast_mask)"
        )


def refuse_step_in_backward(optimizer: Any) -> None:
    if optimizer._shard_group is not None:
        raise InvalidArgumentError(
            f"{type(optimizer).__name__}.step_in_backward does not support sharded parameters "
            f"(FSDP2 fully_shard): their gradients are reduce-scattered after backward"
        )


def global_norm(local_norms: list[Tensor], norm_type: float, group: Any,
                device: torch.device) -> Tensor:
    """The ``norm_type`` norm over every rank's entries, from this rank's per-tensor norms.

    Collective: every rank of ``group`` must call it, with an empty list where it has no
    selected gradient.
    """
    dtype = local_norms[0].dtype if local_norms else torch.float32
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    norms = torch.stack(local_norms).to(device) if local_norms else torch.zeros(0, dtype=dtype,
                                                                                 device=device)
    if norm_type == float("inf"):
        total = norms.max() if norms.numel() else torch.zeros((), dtype=dtype, device=device)
        dist.all_reduce(total, dist.ReduceOp.MAX, group=group)
        return total
    if norm_type == 0:
        total = norms.sum()
        dist.all_reduce(total, dist.ReduceOp.SUM, group=group)
        return total
    total = norms.pow(norm_type).sum()
    dist.all_reduce(total, dist.ReduceOp.SUM, group=group)
    return total.pow(1.0 / norm_type)


def local_gradient(param: Tensor, index: Tensor | None,
                   dtype: torch.dtype | None = None) -> Tensor:
    """The selected entries of this rank's shard of a DTensor gradient, 1-D."""
    grad = param.grad
    if not is_sharded(grad):
        raise InvalidArgumentError(
            f"a sharded parameter needs a DTensor gradient (as FSDP2 gives), got a "
            f"{type(grad).__name__} of shape {tuple(grad.shape)}"
        )
    flat = grad.to_local().reshape(-1)
    values = flat if index is None else flat.index_select(0, index)
    return values if dtype is None else values.to(dtype)


def _shard_of(optimizer: Any) -> list[int] | None:
    group = optimizer._shard_group
    return None if group is None else [dist.get_rank(group), dist.get_world_size(group)]


def add_shard(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """``state_dict`` post-hook: record which rank of how many saved a sharded state."""
    shard = _shard_of(optimizer)
    if shard is not None:
        state_dict["sparsetune"] = {**state_dict.get("sparsetune", {}), "shard": shard}


def check_shard(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """``load_state_dict`` pre-hook: a per-rank state loads only on the rank that saved it."""
    saved = (state_dict.get("sparsetune") or {}).get("shard")  # selection.STATE_KEY
    saved = None if saved is None else list(saved)
    shard = _shard_of(optimizer)
    if saved != shard:
        raise StateMismatchError(
            f"{type(optimizer).__name__}.load_state_dict: the state was saved by rank, world "
            f"{saved} (None: not sharded), but this optimizer is on {shard}; a sharded "
            f"optimizer's state holds one rank's shard and loads only on that rank of the same "
            f"sharding (to reshard, save and load through torch.distributed.checkpoint with "
            f"sparsetune.integrations.fsdp_checkpoint)"
        )
