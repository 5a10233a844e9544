"""Integrations with the libraries practitioners fine-tune with.

* :mod:`sparsetune.integrations.transformers`: a ``Trainer`` that selects the mask at the start
  of training and trains only it (:class:`SparseTrainer`), and a callback that saves the sparse
  delta and mask beside every checkpoint (:class:`SparseTuningCallback`).
* :mod:`sparsetune.integrations.peft`: LoRA and adapters as masks of an equivalent model;
  registers the selection methods ``"lora"`` and ``"adapter"``.
* :mod:`sparsetune.integrations.distributed`: the same mask on every rank (broadcast, or
  selected from statistics all-reduced over ranks) for DDP; on FSDP2 models the exact top-k
  across ranks (:mod:`.fsdp_select`).
* :mod:`sparsetune.integrations.fsdp` (sparse delta gathered on one rank) and
  :mod:`sparsetune.integrations.fsdp_checkpoint` (optimizer state through DCP, resharded).

Importing ``sparsetune`` imports this package and registers the peft methods, but none of
transformers, peft or torch.distributed's process groups is touched until a feature is used.
"""

from . import peft
from ._deps import MissingDependencyError

__all__ = ["MissingDependencyError", "peft"]
