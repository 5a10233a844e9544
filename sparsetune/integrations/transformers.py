"""Sparse fine-tuning with the transformers ``Trainer``.

Two ways in:

1. Build the optimizer yourself and hand it over; the Trainer works unchanged::

       opt = sparsetune.SparseAdamW(model, mask, lr=1e-4)
       trainer = Trainer(model=model, args=args, train_dataset=data,
                         optimizers=(opt, scheduler),
                         callbacks=[SparseTuningCallback(model, mask)])

2. Let :class:`SparseTrainer` select the mask at the start of training (a method name and a
   density, scored on a few batches of the trainer's own training data) and train only it::

       trainer = SparseTrainer(model=model, args=args, train_dataset=data,
                               method="sam", density=0.005, always_train=["classifier.weight",
                               "classifier.bias"])
       trainer.train()                       # or train(resume_from_checkpoint=True)

Why a Trainer subclass: the Trainer builds its optimizer in ``create_optimizer`` *before* any
callback runs (``on_train_begin`` comes after), and its default optimizer is built from unnamed
parameter lists, so no callback can make it train only a mask. :class:`SparseTrainer` overrides
``create_optimizer`` (the hook transformers documents for this) to select the mask and build a
:class:`~sparsetune.SparseAdamW` from ``TrainingArguments`` (learning rate, betas, epsilon,
weight decay with the Trainer's own no-decay rule for biases and LayerNorm weights).

With ``SparseTrainer(..., sparse_gradients=True)`` the backward pass computes the weight
gradients of ``nn.Linear`` and ``nn.Embedding`` at the selected entries only
(:func:`sparsetune.prepare`) for the duration of ``train()``; one process only (DDP does not
reduce sparse COO gradients).

Gradient clipping (``TrainingArguments.max_grad_norm``): :class:`SparseTrainer` clips by the
global norm over the *selected* entries (:meth:`SparseAdamW.clip_grad_norm_
<sparsetune.SparseAdamW>`), and logs that norm as ``grad_norm``: gradients at frozen entries
never move a weight, so they do not count. A plain ``Trainer`` given a sparse optimizer (way 1)
clips over *all* entries, frozen ones included, so its updates are clipped harder than the
theory says: set ``max_grad_norm=0`` there and clip with ``optimizer.clip_grad_norm_`` yourself
if that matters. With :func:`sparsetune.prepare` a plain ``Trainer`` cannot train at all: it
takes the norm of every gradient each step for its ``grad_norm`` log, even with
``max_grad_norm=0``, and torch's norm rejects sparse gradients; use
``SparseTrainer(sparse_gradients=True)``.

In both cases :class:`SparseTuningCallback` writes ``checkpoint-N/sparse_delta.safetensors``
(theta - theta0 on the mask, theory/ E1) and ``checkpoint-N/sparse_mask.safetensors`` beside
every checkpoint the Trainer saves. Resuming (``train(resume_from_checkpoint=...)``) restores the
mask from the checkpoint (never re-selects it on tuned weights) and the optimizer's compact
state from ``optimizer.pt``, which ``SparseAdamW.load_state_dict`` accepts only with that mask.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import unwrap_compiled
from .._loss import FirstBatches
from ..delta import BaseModelMismatchError, SparseDelta, base_fingerprint, saved_buffers
from ..errors import InvalidArgumentError, StateMismatchError
from ..files import read_metadata
from ..mask import Mask
from ..optim import SparseAdamW
from ..optim.freezing import apply_freezing
from ..select import method_info, select
from ..sparse_grad import SparseGradients, prepare
from ._deps import require
from .fsdp import refuse_trainer_fsdp

require("transformers", "transformers==5.23.0", "sparsetune.integrations.transformers")
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint  # noqa: E402

__all__ = ["DELTA_FILE", "MASK_FILE", "SparseTrainer", "SparseTuningCallback"]

#: File names written inside every ``checkpoint-N`` folder.
DELTA_FILE = "sparse_delta.safetensors"
MASK_FILE = "sparse_mask.safetensors"

# TrainingArguments.optim values that mean AdamW, which SparseTrainer replaces by SparseAdamW.
_ADAMW = ("adamw_torch", "adamw_torch_fused")


class SparseTuningCallback(TrainerCallback):
    """Save the sparse delta and the mask beside every checkpoint the Trainer writes.

    Built *before* training, from the pretrained model: it keeps theta0 on the selected entries
    only (one copy of the selected values, not of the model) and the base model's fingerprint.
    On every save it writes ``checkpoint-N/sparse_delta.safetensors`` and
    ``checkpoint-N/sparse_mask.safetensors``; if an entry outside the mask moved (a dense
    optimizer, say), the rebuilt theta0 no longer has the base fingerprint and it raises
    :class:`~sparsetune.BaseModelMismatchError` rather than write a delta that does not
    reproduce the model. Only the process that
    saves (``args.should_save``, rank 0) writes. Building the delta takes one transient copy of
    the model's parameters.

    The plain ``Trainer`` this callback usually rides with clips gradients over *all* entries
    (frozen ones too), not over the selected ones as :class:`SparseTrainer` does (set
    ``max_grad_norm=0`` and clip with ``optimizer.clip_grad_norm_`` yourself if that matters);
    with :func:`sparsetune.prepare` it fails on the sparse gradients whatever ``max_grad_norm``
    (it logs their norm every step): use ``SparseTrainer(sparse_gradients=True)`` there.

    Args:
        model: the pretrained model, before any training step (names as the mask's).
        mask: the entries being trained.
        method: recorded in both files (e.g. ``"sam"``).
    """

    def __init__(self, model: nn.Module, mask: Mask, *, method: str = "unknown") -> None:
        if not isinstance(mask, Mask):
            raise InvalidArgumentError(f"mask must be a sparsetune.Mask, got {type(mask).__name__}")
        model = unwrap_compiled(model)  # torch.compile: the module it wraps, plain names
        mask.check(model, complete=True)
        self.mask = mask
        self.method = method
        params = dict(model.named_parameters())
        self.base_fingerprint = base_fingerprint(params)
        # persistent buffers (BatchNorm statistics): the delta records those training changes
        self._buffers0 = {n: b.detach().clone() for n, b in saved_buffers(model).items()}
        self._theta0 = {
            n: params[n].detach()[mask[n].to(params[n].device)].clone()
            for n, row in mask.per_parameter().items()
            if row.selected
        }

    def base_state(self, model: nn.Module) -> dict[str, Tensor]:
        """theta0 for every parameter (the current values with the selected entries reset) and
        the persistent buffers as they were before training."""
        base = dict(self._buffers0)
        for name, p in unwrap_compiled(model).named_parameters():
            value = p.detach()
            if name in self._theta0:
                value = value.clone()
                value[self.mask[name].to(value.device)] = self._theta0[name].to(value.device)
            base[name] = value
        return base

    def delta(self, model: nn.Module) -> SparseDelta:
        """theta - theta0 of ``model`` on the mask (theory/ E1)."""
        model = unwrap_compiled(model)
        self.mask.check(model)
        delta = SparseDelta.extract(model, self.base_state(model), self.mask, method=self.method)
        if delta.base_fingerprint != self.base_fingerprint:
            # Off the mask, base_state() reads the current values: if any of them moved, the
            # rebuilt theta0 is not the base any more, and its fingerprint says so.
            raise BaseModelMismatchError(
                "entries outside the mask moved since training began (the model no longer "
                "matches theta0 outside the mask): train with an optimizer that keeps frozen "
                "entries fixed (sparsetune.SparseAdamW or MaskedOptimizer)"
            )
        return delta

    def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                **kwargs: Any) -> None:
        if not args.should_save:
            return
        if model is None:
            raise InvalidArgumentError("SparseTuningCallback.on_save got no model from the Trainer")
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            raise InvalidArgumentError(
                f"SparseTuningCallback: the checkpoint folder {folder} does not exist (is this a "
                f"hyperparameter search, whose checkpoints live in per-trial folders? that is "
                f"not supported)"
            )
        self.delta(model).save(folder / DELTA_FILE)
        self.mask.save(folder / MASK_FILE, method=self.method)


class SparseTrainer(Trainer):
    """A ``transformers.Trainer`` that trains only the entries of a sparse mask.

    At the start of training it selects the mask with :func:`sparsetune.select` (``method``,
    ``density``, scored on the first ``selection_batches`` batches of the trainer's own training
    dataloader, drawn without disturbing the training RNG), or takes a given ``mask``; then
    ``create_optimizer`` builds a :class:`~sparsetune.SparseAdamW` over it with the learning
    rate, betas, epsilon and weight decay of ``args`` (no decay for biases and LayerNorm
    weights, as the Trainer does). A :class:`SparseTuningCallback` saves the sparse delta and
    the mask beside every checkpoint; ``train(resume_from_checkpoint=...)`` reads the mask back
    from the checkpoint and checks that ``model`` is the base the checkpoint was tuned from.

    Gradient clipping (``args.max_grad_norm > 0``) scales the gradients so that their global
    norm over the *selected* entries is at most ``max_grad_norm``
    (:meth:`SparseAdamW.clip_grad_norm_ <sparsetune.SparseAdamW>`), after unscaling AMP
    gradients as accelerate does; the logged ``grad_norm`` is that norm too. (The plain
    ``Trainer`` counts frozen entries as well, which clips the trained ones harder.)

    Args:
        method: a selection method (``sparsetune.METHODS``), or None with ``mask=``.
        density: p in (0, 1] for methods that take a budget.
        mask: a ready mask instead of ``method``.
        always_train: parameter names trained in full (a fresh task head).
        selection_batches: batches of training data given to data-driven methods.
        selection_options: further ``select`` options (``max_grad_norm``, ``scope``, ...).
        selection_loss_fn: ``loss_fn(model, batch)`` for selection only (training uses the
            Trainer's loss); default ``model(**batch).loss``, and for a causal LM whose
            batches carry no labels, next-token prediction on ``input_ids`` with padding
            (``attention_mask == 0``) ignored (:func:`sparsetune.select.select`).
        decay_to: ``"zero"`` (AdamW) or ``"init"`` (pull toward theta0, theory/ E2).
        sparse_gradients: compute Linear/Embedding weight gradients at the selected entries
            only (:func:`sparsetune.prepare`), from just after the optimizer is built until
            ``train()`` returns or raises, when the model is restored. Same updates as the
            dense path (to rounding); one process only. Either way, parameters with no
            selected entry have ``requires_grad`` off during ``train()`` (restored after).
        *args, **kwargs: as for ``Trainer``; ``optimizers`` may carry a scheduler only.

    Not supported (refused at construction): ``model_init``, DeepSpeed, FSDP (use plain-torch
    FSDP2: :data:`~sparsetune.integrations.fsdp.TRAINER_FSDP_REFUSAL`), ``optim`` other than
    ``adamw_torch``/``adamw_torch_fused``, ``sparse_gradients=True`` over several processes or
    GPUs (DDP does not reduce sparse COO gradients; DataParallel replicas share the forwards).
    """

    def __init__(
        self,
        *args: Any,
        method: str | None = None,
        density: float | None = None,
        mask: Mask | None = None,
        always_train: Iterable[str] = (),
        selection_batches: int = 8,
        selection_options: Mapping[str, Any] | None = None,
        selection_loss_fn: Any = None,
        decay_to: str = "zero",
        sparse_gradients: bool = False,
        **kwargs: Any,
    ) -> None:
        if (method is None) == (mask is None):
            raise InvalidArgumentError(
                f"SparseTrainer needs exactly one of method= (with density=) and mask=, got "
                f"method={method!r} and mask={'a Mask' if mask is not None else None}"
            )
        if mask is not None and not isinstance(mask, Mask):
            raise InvalidArgumentError(f"mask must be a sparsetune.Mask, got {type(mask).__name__}")
        if method is not None:
            info = method_info(method)
            if info.uses_density and density is None:
                raise InvalidArgumentError(f"method {method!r} needs density= in (0, 1]")
        elif density is not None:
            raise InvalidArgumentError("density= goes with method=, not with a ready mask=")
        if isinstance(selection_batches, bool) or not isinstance(selection_batches, int) or (
            selection_batches < 1
        ):
            raise InvalidArgumentError(
                f"selection_batches must be an integer >= 1, got {selection_batches!r}"
            )
        if not isinstance(sparse_gradients, bool):
            raise InvalidArgumentError(
                f"sparse_gradients must be True or False, got {sparse_gradients!r}"
            )
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers[0] is not None:
            raise InvalidArgumentError(
                "SparseTrainer builds its own SparseAdamW over the mask; pass optimizers=(None, "
                "scheduler), or use Trainer(optimizers=(sparsetune.SparseAdamW(...), scheduler))"
            )
        if kwargs.get("optimizer_cls_and_kwargs") is not None or kwargs.get("model_init"):
            raise InvalidArgumentError(
                "SparseTrainer does not take optimizer_cls_and_kwargs or model_init: it builds "
                "SparseAdamW over the model it is given"
            )
        refuse_trainer_fsdp(args[1] if len(args) > 1 else kwargs.get("args"))  # before accelerate
        super().__init__(*args, **kwargs)
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if optim not in _ADAMW or self.args.optim_args:
            raise InvalidArgumentError(
                f"SparseTrainer trains with SparseAdamW; TrainingArguments.optim must be one of "
                f"{list(_ADAMW)} without optim_args, got optim={optim!r}, "
                f"optim_args={self.args.optim_args!r}"
            )
        refuse_trainer_fsdp(self.args, self.is_fsdp_enabled)
        if self.is_deepspeed_enabled:
            raise InvalidArgumentError(
                "SparseTrainer does not support DeepSpeed (sharded parameters); use DDP"
            )
        if sparse_gradients:
            _check_single_process(self.args)
        self.sparse_method = method if method is not None else "given"
        self.density = density
        self.sparse_mask: Mask | None = mask
        self._given_mask = mask
        self.always_train = [always_train] if isinstance(always_train, str) else list(always_train)
        self.selection_batches = selection_batches
        self.selection_options = dict(selection_options or {})
        self.selection_loss_fn = selection_loss_fn
        self.decay_to = decay_to
        self.sparse_callback: SparseTuningCallback | None = None
        self.sparse_gradients = sparse_gradients
        self._sparse_gradients_handle: SparseGradients | None = None

    # -- mask -----------------------------------------------------------------------------
    def select_mask(self) -> Mask:
        """Select the mask on the pretrained model (called once, at the start of training)."""
        return select(
            self.model,
            self.sparse_method,
            self.density,
            # the dataloader's shuffling is drawn inside a forked RNG, so that training sees the
            # same random stream whether a mask was selected or not (a resumed run stays exact)
            data=FirstBatches(_TrainLoader(self), self.selection_batches,
                              context=lambda: _forked_rng(self.args.device)),
            loss_fn=self.selection_loss_fn,
            always_train=self.always_train,
            **self.selection_options,
        )

    def _attach(self, mask: Mask) -> None:
        self.sparse_mask = mask
        self.sparse_callback = SparseTuningCallback(self.model, mask, method=self.sparse_method)
        self.add_callback(self.sparse_callback)

    def _restore_from_checkpoint(self, checkpoint: str | os.PathLike) -> None:
        """Read the mask of ``checkpoint`` and check that ``self.model`` is its base."""
        folder = Path(checkpoint)
        if not (folder / MASK_FILE).is_file() or not (folder / DELTA_FILE).is_file():
            raise StateMismatchError(
                f"{folder} has no {MASK_FILE} and {DELTA_FILE}: it was not saved by SparseTrainer "
                f"or SparseTuningCallback, so the mask it trained is unknown (selecting again on "
                f"tuned weights would pick another one)"
            )
        mask = Mask.load(folder / MASK_FILE, model=self.model)
        if self._given_mask is not None and mask != self._given_mask:
            raise StateMismatchError(
                f"{folder / MASK_FILE} holds another mask than the mask= given to SparseTrainer "
                f"(digests {mask.digest()[:12]}... and {self._given_mask.digest()[:12]}...)"
            )
        saved = read_metadata(folder / DELTA_FILE, "delta")["base_fingerprint"]
        found = base_fingerprint(dict(unwrap_compiled(self.model).named_parameters()))
        if saved != found:
            raise BaseModelMismatchError(
                f"the model given to SparseTrainer is not the base model {folder} was tuned from "
                f"(fingerprints {found[:12]}... and {saved[:12]}...): pass the pretrained "
                f"model; train() loads the checkpoint's weights itself"
            )
        self._attach(mask)

    # -- Trainer hooks --------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if checkpoint and self.optimizer is None:
            # Before super().train() loads the checkpoint's weights: self.model is still theta0.
            self._restore_from_checkpoint(checkpoint)
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self._sparse_gradients_handle is not None:
                self._sparse_gradients_handle.remove()  # the model is left as it was
                self._sparse_gradients_handle = None
            for p, flag in flags:  # last: the optimizer froze unselected parameters meanwhile
                p.requires_grad_(flag)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self._build_optimizer(model)
        elif self.is_in_train:  # a later train(): freeze the unselected parameters again
            apply_freezing(unwrap_compiled(self.model).named_parameters(), self.sparse_mask, None)
        if self.sparse_gradients and self.is_in_train and self._sparse_gradients_handle is None:
            # After building the optimizer: prepare() turns requires_grad off for parameters
            # with no selected entry, and the optimizer is built from requires_grad parameters.
            self._sparse_gradients_handle = prepare(self.model, self.sparse_mask)
        return self.optimizer

    def sparse_optimizer(self) -> SparseAdamW:
        """The SparseAdamW this trainer built (inside accelerate's wrapper once training runs)."""
        optimizer = self.optimizer
        while isinstance(optimizer, AcceleratedOptimizer):
            optimizer = optimizer.optimizer
        if not isinstance(optimizer, SparseAdamW):
            raise InvalidArgumentError(
                f"SparseTrainer has no SparseAdamW yet (optimizer is "
                f"{type(optimizer).__name__}): call create_optimizer() or train() first"
            )
        return optimizer

    def _clip_grad_norm(self, model: nn.Module) -> Tensor:
        """Clip to ``args.max_grad_norm`` over the selected entries; the norm before clipping."""
        self.accelerator.unscale_gradients()
        return self.sparse_optimizer().clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Tensor | float | None = None
                       ) -> Tensor | float:
        """The norm logged as ``grad_norm``: over the selected entries (unclipped if given)."""
        if grad_norm is None:
            self.accelerator.unscale_gradients()
            grad_norm = self.sparse_optimizer().clip_grad_norm_(float("inf"))  # scales by 1
        return grad_norm

    def _build_optimizer(self, model: nn.Module | None) -> None:
        if model is not None and model is not self.model:
            raise InvalidArgumentError(
                "SparseTrainer cannot build its optimizer on a wrapped model"
            )
        if self.sparse_mask is None or self.sparse_callback is None:
            self._attach(self.sparse_mask if self.sparse_mask is not None else self.select_mask())
        plain = unwrap_compiled(self.model)  # torch.compile: the mask's (plain) names
        decay = set(self.get_decay_parameter_names(plain))
        named = [(n, p) for n, p in plain.named_parameters() if p.requires_grad]
        groups = [
            {"params": [(n, p) for n, p in named if n in decay],
             "weight_decay": self.args.weight_decay},
            {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        self.optimizer = SparseAdamW(
            [g for g in groups if g["params"]],
            self.sparse_mask,
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            weight_decay=self.args.weight_decay,
            decay_to=self.decay_to,
        )


def _check_single_process(args: Any) -> None:
    """Refuse sparse-gradient training over several processes or GPUs (``args``:
    ``TrainingArguments``): DDP does not all-reduce sparse COO gradients, and DataParallel
    replicas would run the original modules' replaced forwards."""
    world_size, n_gpu = int(args.world_size), int(args.n_gpu)
    if world_size > 1 or n_gpu > 1:
        raise InvalidArgumentError(
            f"SparseTrainer(sparse_gradients=True) runs in one process on one device, got "
            f"world_size={world_size}, n_gpu={n_gpu}: DDP does not reduce sparse gradients; "
            f"use sparse_gradients=False (the dense masked path) for multi-device training"
        )


class _TrainLoader:
    """The trainer's training dataloader, built afresh at each pass (its shuffling is seeded)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __iter__(self) -> Iterator[Any]:
        return iter(self.trainer.get_train_dataloader())


@contextlib.contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
