"""Sparse deltas of FSDP2 (``torch.distributed.fsdp.fully_shard``) models, gathered on one rank.

:func:`extract_delta` is :meth:`SparseDelta.extract <sparsetune.SparseDelta.extract>` for a
model whose parameters are ``Shard(0)`` DTensors (:mod:`sparsetune.optim.sharded` describes the
layout): each rank takes the selected entries of its own shard (local flat indices shifted by
the shard's first global entry), and only those k entries (index, theta0, theta) travel to rank
``dst`` in one ``gather_object``; no full parameter is ever gathered. Rank ``dst`` returns the
delta, equal to what one process gets from the unsharded model, and the other ranks None;
:func:`save_delta` writes it on ``dst`` only.

The base fingerprint (:func:`sparsetune.delta.base_fingerprint`, SHA-256 over the full base
parameters in name order) is computed on ``dst`` shard by shard: for a sharded base, rank ``r``
sends its shard to ``dst`` when the hash reaches it (Shard(0) shards in rank order are the
tensor's bytes in order), so ``dst`` holds one shard at a time besides its own.
``base_state_dict`` may hold the base as DTensors sharded like the model (``{n:
p.detach().clone() for n, p in model.named_parameters()}`` before training, or its
``state_dict()``) or as full tensors on every rank (the pretrained weights).

Every function here is collective over the model's mesh; bad input raises the same error on
every rank (masks that differ between ranks included, found by digest).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._checks import unwrap_compiled
from .._delta_parts import BaseModelMismatchError, DeltaEntry, differing, gather, saved_buffers
from ..delta import SparseDelta
from ..errors import InvalidArgumentError, ParameterMismatchError
from ..mask import Mask
from ..optim.sharded import check_sharding, is_sharded, local, process_group, shard_rows
from ._ranks import checked_on_every_rank, raise_on_every_rank

__all__ = ["TRAINER_FSDP_REFUSAL", "extract_delta", "refuse_trainer_fsdp", "save_delta",
           "shard_span"]


#: Why ``SparseTrainer`` refuses FSDP, and what to do instead.
TRAINER_FSDP_REFUSAL = (
    "SparseTrainer does not support FSDP: accelerate builds the optimizer on the unsharded model "
    "and then swaps its parameters for fully_shard's DTensor shards, which SparseAdamW's compact "
    "state (built from the mask for each full parameter) cannot follow; and on the CPU "
    "accelerate 1.15 ignores FSDP and silently runs DDP. Train FSDP2 with plain torch instead "
    "(README, 'FSDP2'): fully_shard the model, then sparsetune.integrations.distributed."
    "select_distributed, sparsetune.SparseAdamW, your training loop, and sparsetune."
    "integrations.fsdp.save_delta; or drop the fsdp arguments to train with DDP"
)


def refuse_trainer_fsdp(args: Any, enabled: bool = False) -> None:
    """Raise :data:`TRAINER_FSDP_REFUSAL` if ``args`` (``TrainingArguments`` or None) ask for
    FSDP, ``accelerate launch`` does (``ACCELERATE_USE_FSDP``), or ``enabled`` (the Trainer's
    ``is_fsdp_enabled``). Reads no collective: every rank raises the same error."""
    asked = bool(getattr(args, "fsdp", None)) or getattr(args, "fsdp_plugin_args", None)
    launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if enabled or asked or launched:
        raise InvalidArgumentError(TRAINER_FSDP_REFUSAL)


def shard_span(param: Tensor) -> tuple[int, int]:
    """The global flat entries ``[first, end)`` of the full parameter held by this rank's
    shard of ``param`` (a ``Shard(0)`` DTensor): rows ``[start, end)`` times the row size."""
    start, end = shard_rows(param)
    row = math.prod(param.shape[1:])
    return start * row, end * row


def _group(model: nn.Module, who: str) -> Any:
    named = list(model.named_parameters())
    group = process_group(p for _, p in named)
    if group is None:
        raise InvalidArgumentError(
            f"{who} takes a model sharded with FSDP2's fully_shard; for a plain model use "
            f"SparseDelta.extract"
        )
    check_sharding(named, who)
    return group


def _check(model: nn.Module, base: Mapping[str, Tensor], mask: Mask, strict: bool,
           dst: int, world: int) -> dict[str, Tensor]:
    """Raise unless the inputs fit (SparseDelta.extract's checks); the model's buffers."""
    if not 0 <= dst < world:
        raise InvalidArgumentError(f"dst must be a rank of the model's mesh, 0 .. {world - 1}, "
                                   f"got dst={dst!r}")
    params, buffers = dict(model.named_parameters()), saved_buffers(model)
    mask.check(model)
    missing = [n for n in params if n not in base]
    shapes = [
        f"{n}: base {tuple(base[n].shape)} {base[n].dtype}, model {tuple(p.shape)} {p.dtype}"
        for n, p in {**params, **buffers}.items()
        if n in base and (base[n].shape != p.shape or base[n].dtype != p.dtype)
    ]
    if missing or shapes:
        raise ParameterMismatchError(f"base_state_dict does not match the model: missing "
                                     f"{missing}; mismatched {shapes}")
    check_sharding([(n, base[n]) for n in params if is_sharded(base[n])], "base_state_dict")
    for n in params:
        if is_sharded(base[n]) and shard_rows(base[n]) != shard_rows(params[n]):
            raise ParameterMismatchError(f"base_state_dict[{n!r}] is sharded otherwise than "
                                         f"the model's parameter")
    absent = [n for n in buffers if n not in base]
    if absent and strict:
        raise ParameterMismatchError(
            f"base_state_dict lacks the model's buffers {absent}, so the delta cannot tell "
            f"whether they changed: pass the base model's state_dict(), or strict=False"
        )
    return buffers


def _local_part(name: str, p: Tensor, old_full: Tensor, mask: Mask, strict: bool):
    """This rank's selected entries of ``name`` (global index, theta0, theta, on the CPU) and
    how many of its other entries moved."""
    new = local(p.detach())
    first, end = shard_span(p)
    if is_sharded(old_full):
        old = local(old_full.detach())
    else:
        old = old_full.detach().reshape(-1)[first:end].reshape(new.shape)
    new, old = new.reshape(-1), old.to(new.device).reshape(-1)
    index = None
    if name in mask:
        chosen = mask.indices(name).to(torch.int64)
        lo, hi = torch.searchsorted(chosen, torch.tensor([first, end], device=chosen.device))
        index = chosen[int(lo):int(hi)]
    moved = 0
    if strict:
        outside = new != old
        if index is not None:
            outside[(index - first).to(new.device)] = False
        moved = int(outside.sum())
    if index is None or not index.numel():
        return None, moved
    at = (index - first).to(new.device)
    return (index.cpu(), old[at].cpu(), new[at].cpu()), moved


def _fingerprint(params: Mapping[str, Tensor], base: Mapping[str, Tensor], group: Any,
                 dst: int) -> str | None:
    """:func:`~sparsetune.delta.base_fingerprint` of the base, on ``dst`` (None elsewhere);
    sharded tensors are hashed shard by shard in rank order. Collective."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    h = hashlib.sha256() if rank == dst else None
    for name in sorted(params):
        t = base[name].detach()
        if h is not None:
            h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        if not is_sharded(t):
            if h is not None:
                h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            continue
        shard = local(t).contiguous()
        if h is None:
            if shard.numel():
                dist.send(shard, group_dst=dst, group=group)
            continue
        chunk = -(-t.shape[0] // world)
        for r in range(world):
            rows = max(0, min(t.shape[0], (r + 1) * chunk) - min(t.shape[0], r * chunk))
            if r == dst or rows == 0:
                piece = shard if r == dst else None
            else:
                piece = torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=shard.device)
                dist.recv(piece, group_src=r, group=group)
            if piece is not None and piece.numel():
                h.update(piece.cpu().reshape(-1).view(torch.uint8).numpy())
    return None if h is None else h.hexdigest()


def extract_delta(
    model: nn.Module,
    base_state_dict: Mapping[str, Tensor],
    mask: Mask,
    *,
    method: str = "unknown",
    strict: bool = True,
    info: Mapping[str, str] | None = None,
    dst: int = 0,
) -> SparseDelta | None:
    """:meth:`SparseDelta.extract` of an FSDP2-sharded ``model``: the delta on rank ``dst`` (a
    rank of the model's mesh; its tensors on the CPU), None on the other ranks.

    Collective: call it on every rank with the same mask. ``strict``, ``method``, ``info`` and
    the buffers recorded behave as in :meth:`SparseDelta.extract`; the result equals
    ``SparseDelta.extract`` of the unsharded model (same entries, values and fingerprint).
    """
    model = unwrap_compiled(model)
    group = _group(model, "extract_delta")
    world = dist.get_world_size(group)
    params = dict(model.named_parameters())
    layout = hashlib.sha256(repr([(n, tuple(p.shape)) for n, p in params.items()]).encode())
    buffers = checked_on_every_rank(
        lambda: _check(model, base_state_dict, mask, strict, dst, world), group,
        {"masks": mask.digest() if isinstance(mask, Mask) else "not a Mask",
         "models (names and shapes)": layout.hexdigest()},
    )
    parts, moved = {}, torch.zeros(len(params), dtype=torch.int64)
    for i, (name, p) in enumerate(params.items()):
        part, moved[i] = _local_part(name, p, base_state_dict[name], mask, strict)
        if part is not None:
            parts[name] = part
    if strict:
        device = torch.device("cuda", torch.cuda.current_device()) if (
            dist.get_backend(group) == "nccl") else torch.device("cpu")
        total = moved.to(device)
        dist.all_reduce(total, group=group)
        outside = [f"{n} ({int(c)} entries)" for n, c in zip(params, total.cpu()) if c]
        raise_on_every_rank(BaseModelMismatchError(
            f"the model differs from the base outside the mask in {outside}; the delta would "
            f"not reproduce it (pass strict=False to keep only the masked change)"
        ) if outside else None, group)
    fingerprint = _fingerprint(params, base_state_dict, group, dst)
    rank = dist.get_rank(group)
    gathered: list[Any] | None = [None] * world if rank == dst else None
    dist.gather_object(parts, gathered, group_dst=dst, group=group)
    if gathered is None or fingerprint is None:
        return None
    entries = {}
    for name, p in params.items():
        pieces = [g[name] for g in gathered if name in g]
        if not pieces:
            continue
        index, old, new = (torch.cat(column) for column in zip(*pieces))
        full = index.numel() == p.numel()
        entries[name] = DeltaEntry(tuple(p.shape), None if full else index, old, new)
    changed = {}
    for name, b in buffers.items():
        if name in base_state_dict and differing(b, base_state_dict[name]):
            old_b = base_state_dict[name].detach().to(b.device)
            changed[name] = DeltaEntry(tuple(b.shape), None, gather(old_b, None),
                                       gather(b, None))
    return SparseDelta(entries, fingerprint, method, info, changed)


def save_delta(
    path: str | os.PathLike,
    model: nn.Module,
    base_state_dict: Mapping[str, Tensor],
    mask: Mask,
    *,
    method: str = "unknown",
    strict: bool = True,
    info: Mapping[str, str] | None = None,
    dst: int = 0,
) -> Path | None:
    """:func:`extract_delta`, written to ``path`` by rank ``dst`` (the path written); the other
    ranks write nothing and return None. Collective."""
    delta = extract_delta(model, base_state_dict, mask, method=method, strict=strict, info=info,
                          dst=dst)
    return None if delta is None else delta.save(path)
