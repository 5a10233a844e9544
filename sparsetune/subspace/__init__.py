"""A unified optimisation subspace for delta tuning (Yi et al., Findings of EMNLP 2022).

Yi et al. ("Different Tunes Played with Equal Skill: Exploring a Unified Optimization Subspace
for Delta Tuning", arXiv 2210.13311) find that solutions of different delta-tuning methods on
one task lie near a shared low-dimensional subspace: training only d coordinates inside it
reaches comparable scores, and a point found with one method transfers to another.

Here every solution is a :class:`~sparsetune.SparseDelta` over one base model, and the
subspace lives in the coordinates that some solution touches (their union, D entries):

    theta(z) = theta0 + M U z,        U in R^{D x d} (orthonormal columns), z in R^d   (S1)

where M is the support (E1's mask) of the method the point is decoded for: M = I gives the
union, the support of a SAM delta gives "the same point as SAM would express it". Decoding one
z with another method's M is the paper's *transfer*.

:func:`fit` finds U from n solutions x_1..x_n (x_i in R^D, zero off its support S_i):

* ``method="svd"``: the top-d left singular vectors of [x_1 .. x_n], uncentred so that z = 0 is
  the base model. A sparse solution's zeros off its support count as data.
* ``method="joint"``: the linear form of the paper's joint decomposition,

      min_{U, z_1..z_n}  sum_i || M_i (U z_i - x_i) ||^2 + ridge terms              (S2)

  Yi et al. give each method its own parameter space (adapter, LoRA, prefix) and learn, per
  method, a projection from one shared intrinsic space back to that space. Our methods share
  one parameter space, and a method's own space is its support, so its projection is M_i U: a
  sparse solution is *observed* only on its support and says nothing elsewhere (entries its
  method cannot move are missing, not zero). (S2) is solved exactly block by block
  (alternating least squares, started from the SVD). What we leave out of the paper's
  training, and why: (a) its non-linear encoders from a solution to its intrinsic point are
  replaced by the exact least-squares coordinates (the optimal encoder of a linear
  projection); (b) its extra task loss at random convex combinations of the methods'
  intrinsic points (their "mode connectivity" term) is not part of the fit: it needs the model
  and data inside the fit, and :meth:`Subspace.train` optimises in the subspace afterwards
  (the paper's stage 2).

After fitting, U is orthonormalised and rotated so that its columns are ordered by how much of
the solutions they carry (singular values of the fitted coordinates): axes 0 and 1 are the
plane :meth:`Subspace.landscape` draws.

Example::

    space = st.subspace.fit([sam_delta, bitfit_delta, full_delta], dim=2)
    z = space.project(full_delta)                      # coordinates, shape (2,)
    result = space.train(base, loss_fn, batches, steps=100, lr=1e-2, mask=sam_mask)
    space.landscape(base, loss_fn, batches, grid=11, path="landscape.png")

Modules: :mod:`.layout` (the union coordinates and the solutions on them), :mod:`.fitting` (svd
and joint fitting), :mod:`.space` (:class:`Subspace`: decode, evaluate, train) and
:mod:`.landscape` (the loss on a plane and its heat map); the file format is
:mod:`sparsetune.files.subspace_file`.
"""

from .fitting import FIT_METHODS, fit
from .landscape import Landscape
from .space import Subspace, SubspaceTrainResult

__all__ = ["FIT_METHODS", "Landscape", "Subspace", "SubspaceTrainResult", "fit"]
