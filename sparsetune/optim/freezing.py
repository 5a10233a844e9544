"""Parameters with no selected entry stop requiring grad while a compact optimizer owns them.

A parameter the mask leaves entirely frozen never moves, but while it requires grad the
backward still builds its full dense gradient (for a mask on q_proj/v_proj of a Llama model,
the gradients of every other matrix: most of a step's backward weight-gradient work and memory).
:class:`~sparsetune.SparseAdamW` and :class:`~sparsetune.SparseSGD` therefore set
``requires_grad=False`` on those parameters when they are built (``freeze_unselected=None``,
the default, means True here; nothing is frozen when the mask selects nothing at all), as peft
freezes the base model, and mark each such parameter. Under DDP the automatic choice is off:
DDP fixes the parameters it reduces when it wraps the model, so a parameter frozen afterwards
breaks its next forward; build the optimizer with ``freeze_unselected=True`` *before* wrapping
to have both. FSDP2 (``fully_shard``) copes with parameters frozen after wrapping: frozen there
too. A later compact optimizer whose mask selects entries of a marked parameter makes it
require grad again; a parameter the caller froze (unmarked) is never touched. Input gradients
still flow through frozen layers; only their weight gradients are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.distributed as dist
from torch import Tensor

from ..errors import InvalidArgumentError
from ..mask import Mask

__all__ = ["FROZEN_BY_OPTIMIZER", "apply_freezing", "check_freeze_unselected",
           "frozen_by_optimizer"]

#: Attribute set on a parameter that a compact optimizer froze.
FROZEN_BY_OPTIMIZER = "_sparsetune_frozen_unselected"


def frozen_by_optimizer(param: Tensor) -> bool:
    """True if a compact optimizer set ``param.requires_grad=False`` (and nothing undid it)."""
    return bool(getattr(param, FROZEN_BY_OPTIMIZER, False)) and not param.requires_grad


def check_freeze_unselected(value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise InvalidArgumentError(
            f"freeze_unselected must be True, False or None (automatic), got {value!r}")


def _data_parallel(named: list[tuple[str, Tensor]]) -> bool:
    """A process group is up and some parameter is a plain (not FSDP2-sharded) tensor."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return any(not isinstance(p, DTensor) for _, p in named)


def apply_freezing(
    named: Iterable[tuple[str, Tensor]], mask: Mask, freeze: bool | None
) -> list[str]:
    """Unfreeze the marked parameters ``mask`` selects entries of; with ``freeze``, freeze (and
    mark) the leaf parameters requiring grad that it selects none of (global counts, so every
    FSDP2 rank decides alike). ``freeze=None``: True, except with a process group initialized
    and plain (unsharded) parameters, the DDP case: DDP fixes the set of parameters it reduces
    when it wraps the model, and a parameter frozen after that makes its next forward fail.
    When ``mask`` selects nothing at all, nothing is frozen (the loss would then have no
    gradient path). Returns the names frozen by this call."""
    named = list(named)
    if freeze is None:
        freeze = not _data_parallel(named)
    freeze = freeze and any(name in mask and mask.count(name) > 0 for name, _ in named)
    frozen = []
    for name, p in named:
        selected = name in mask and mask.count(name) > 0
        if selected and frozen_by_optimizer(p):
            p.requires_grad_(True)
            delattr(p, FROZEN_BY_OPTIMIZER)
        elif freeze and not selected and name in mask and p.requires_grad and p.is_leaf:
            p.requires_grad_(False)
            setattr(p, FROZEN_BY_OPTIMIZER, True)
            frozen.append(name)
    return frozen
