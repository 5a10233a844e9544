"""Sparse-gradient training: backward computes only the gradient entries a mask selects.

A masked optimizer alone still pays for every dense weight gradient (for a Linear, half of the
backward's matrix products; for a word embedding, a vocabulary-sized buffer) only to discard
all but a fraction p of it. :func:`prepare` reroutes the forward of every ``nn.Linear``,
``nn.Embedding`` and transformers ``Conv1D`` (GPT-2; W: (in, out), y = x W + b, so its weight
gradient is the Linear's product with x and g swapped) whose weight is partly selected
through an autograd function whose backward returns the gradient at the selected entries only
(theory/ E1: only M dtheta is trained):

* Linear, y = x W^T + b: the input gradient dL/dx = g W is dense (it flows on), the weight
  gradient is (g^T x)[r, c] = sum_n g[n, r] x[n, c] at the k selected pairs (r, c) only, n
  running over every token of the batch: either k sampled dot products
  (``torch.sparse.sampled_addmm``) or one dense product over just the rows and columns the
  mask touches, whichever costs less for that weight (:data:`LINEAR_PRODUCTS`) among those
  that can run for its device and dtype (:data:`LINEAR_SUPPORT`); bfloat16 and float16
  operands are multiplied with float32 accumulation, chunk by chunk;
* Embedding: the gradient rows of the token ids in the batch (index_add over the batch), read at
  the selected entries of those rows; every other selected entry gets 0, as in the dense path.

The k values arrive in ``weight.grad`` as a coalesced sparse COO tensor whose indices are the
selected positions in row-major order, so gradient accumulation, ``zero_grad`` and GradScaler
keep working (for a 16-bit weight the k values are also summed over backward passes in float32,
:mod:`.accumulate`, and ``.grad`` holds the sum rounded); :class:`~sparsetune.SparseAdamW`
and :class:`~sparsetune.SparseSGD` read the values directly (no dense gradient is ever built).
Biases and LayerNorm parameters keep their ordinary (small) dense gradients. Parameters with no
selected entry stop requiring grad (input gradients still flow through them). A partly
selected weight of any other layer type keeps its dense gradient (the masked dense path), with
a :class:`SparseGradientFallbackWarning` naming it.

Dense optimizers cannot use these gradients: ``torch.optim`` optimizers and
:class:`~sparsetune.MaskedOptimizer` raise on them, and ``torch.nn.utils.clip_grad_norm_``
raises too; clip with :meth:`SparseAdamW.clip_grad_norm_ <sparsetune.SparseAdamW>` instead.

Modules: :mod:`.plan` (where the selected entries are; the cost model of
:data:`LINEAR_PRODUCTS`), :mod:`.products` (the products in every dtype, and where each can
run), :mod:`.accumulate` (the float32 sum of a 16-bit weight's gradients), :mod:`.functions`
(the autograd functions), :mod:`.mode` (turning the mode on and off; reading the compact
gradients back).
"""

from .mode import (
    SparseGradientFallbackWarning,
    SparseGradients,
    compact_parameters,
    plan_of,
    prepare,
    selected_gradient,
)
from .plan import Plan
from .products import LINEAR_COSTS, LINEAR_PRODUCTS, LINEAR_SUPPORT, linear_support

__all__ = [
    "LINEAR_COSTS",
    "LINEAR_PRODUCTS",
    "LINEAR_SUPPORT",
    "Plan",
    "SparseGradientFallbackWarning",
    "SparseGradients",
    "compact_parameters",
    "linear_support",
    "plan_of",
    "prepare",
    "selected_gradient",
]
