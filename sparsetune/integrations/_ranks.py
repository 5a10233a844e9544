"""Collective checks shared by the FSDP2 helpers: one error on every rank, never a hang.

A rank that finds bad input cannot simply raise: the other ranks would wait in the next
collective forever. So each check runs on every rank, and :func:`raise_on_every_rank` exchanges
the outcome (and digests that must agree, such as the mask's) in one ``all_gather_object``;
then every rank raises the same error, or none does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..errors import InvalidArgumentError, StateMismatchError

__all__ = ["checked_on_every_rank", "global_batches", "raise_on_every_rank"]


def raise_on_every_rank(error: BaseException | None, group: Any,
                        agree: Mapping[str, str] | None = None) -> None:
    """Raise on every rank of ``group`` if any rank passes an ``error``, or if the values of
    ``agree`` (``what -> digest``) differ between ranks (:class:`StateMismatchError`).

    Collective. The error raised is the first failing rank's type, with its message prefixed
    by that rank.
    """
    mine = (None if error is None else (type(error), str(error)), dict(agree or {}))
    got: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, mine, group=group)
    for rank, (failure, _) in enumerate(got):
        if failure is not None:
            cls, message = failure
            raise cls(f"rank {rank}: {message}")
    for what in agree or {}:
        values = [found[what] for _, found in got]
        if len(set(values)) > 1:
            raise StateMismatchError(
                f"the ranks hold different {what} (digests by rank: "
                f"{[str(v)[:12] for v in values]}); every rank must pass the same"
            )


def checked_on_every_rank(check: Callable[[], Any], group: Any,
                          agree: Mapping[str, str] | None = None) -> Any:
    """``check()``'s result, once every rank of ``group`` has run its ``check`` without error
    (else :func:`raise_on_every_rank` raises everywhere). Collective."""
    result, error = None, None
    try:
        result = check()
    except Exception as exc:  # reported to every rank below, so none waits forever
        error = exc
    raise_on_every_rank(error, group, agree)
    return result


def global_batches(data: Iterable[Any], limit: int | None, device: torch.device,
                   group: Any) -> Iterator[Any]:
    """This rank's part of each global batch: one pass over ``data``, at most ``limit`` batches
    (None: all), ending on every rank at once; ranks whose data end at different batches get
    the same error everywhere. Collective at every batch."""
    it, seen = iter(data), 0
    while limit is None or seen < limit:
        batch = next(it, None)
        have = torch.tensor([batch is not None, batch is None], dtype=torch.int64,
                            device=device)
        dist.all_reduce(have, group=group)
        if int(have[1]) == dist.get_world_size(group):
            return
        raise_on_every_rank(InvalidArgumentError(
            f"the ranks ran out of batches at different steps ({int(have[1])} ranks had no "
            f"batch {seen}): under FSDP2 every rank must feed the same number of batches"
        ) if int(have[1]) else None, group)
        yield batch
        seen += 1
