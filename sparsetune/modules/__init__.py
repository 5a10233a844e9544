"""Sparse deltas as modules over a frozen base: :func:`attach` (LoRA-style usage).

``handle = st.attach(model, mask, name="task")`` gives each covered layer the k selected
entries of its weight as trainable float32 values, computes base(x) + delta(x) without
building W0 + S, and never writes the base; ``handle.parameters()`` go to any torch optimizer.
Several named deltas share one base (:meth:`DeltaHandle.set_active`); ``merge``/``unmerge``
fold one into the float base weights and back, bit for bit; ``to_delta`` /
``SparseDelta.attach_to`` convert to and from the :class:`~sparsetune.SparseDelta` file format.

``merge(requantize=True)`` folds a delta into a torchao int8 base and reports the error;
``save_pretrained`` / ``DeltaHandle.from_pretrained`` keep a delta in a peft-style folder.

Modules: :mod:`.functions` (the autograd functions of delta(x)), :mod:`.slot` (the per-layer
child module and forward hook), :mod:`.attach` (``attach`` and the handle), :mod:`.requantize`
(merging into a quantized weight), :mod:`.pretrained` (the folder).
"""

from .attach import DeltaHandle, attach, base_parameters, merged_weight_values
from .functions import CsrLayout
from .requantize import RequantizeReport
from .slot import SLOT, DeltaSlot, LayerDelta

__all__ = ["SLOT", "CsrLayout", "DeltaHandle", "DeltaSlot", "LayerDelta", "RequantizeReport",
           "attach", "base_parameters", "merged_weight_values"]
