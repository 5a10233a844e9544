"""Fitting U: the top-d SVD of the solutions, or the joint decomposition (S2).

:func:`fit` turns n :class:`~sparsetune.SparseDelta` over one base model into a
:class:`~sparsetune.subspace.Subspace`. ``"svd"``: the top-d left singular vectors of the
zero-filled solutions [x_1 .. x_n] (uncentred, from their n x n Gram matrix). ``"joint"``:
min_{U, z_i} sum_i ||M_i (U z_i - x_i)||^2 + ridge terms (S2), each solution observed only on
its own support, by alternating least squares started from the SVD. Either way U is then
orthonormalised and its columns ordered by the singular values of the fitted coordinates. Sums
are accumulated in float64, streaming :data:`~sparsetune.subspace.layout.CHUNK` coordinates at a
time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_int
from ..delta import SparseDelta
from ..errors import InvalidArgumentError
from .layout import CHUNK, Vector, check_deltas, dense_block, layout_of, vector_of
from .space import Subspace

__all__ = ["FIT_METHODS", "fit"]

FIT_METHODS = ("svd", "joint")
_MAX_JOINT_SOLUTIONS = 62  # observation patterns are int64 bit sets


def _svd(vectors, layout, dim, dtype):
    n = len(vectors)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for name, s, e in layout.chunks():
        x, _ = dense_block(vectors, name, s, e)
        gram += x @ x.T
    lam, v = torch.linalg.eigh(gram)
    lam, v = lam.flip(0), v.flip(1)
    rank = int((lam > lam[0].clamp(min=0) * 1e-12).sum()) if float(lam[0]) > 0 else 0
    if rank < dim:
        raise InvalidArgumentError(
            f"the {n} solutions span only {rank} dimensions; dim must be <= {rank}, got "
            f"dim={dim}"
        )
    lam, v = lam[:dim], v[:, :dim]
    basis = {n_: torch.empty(layout.count(n_), dim, dtype=dtype) for n_ in layout.shapes}
    weights = v / lam.sqrt()
    for name, s, e in layout.chunks():
        x, _ = dense_block(vectors, name, s, e)
        basis[name][s:e] = (x.T @ weights).to(dtype)
    return basis, v * lam.sqrt()


def _observation_groups(vectors, layout):
    """Coordinates grouped by which solutions observe them (fixed for the whole fit).

    Returns the patterns (P, n) bool and, per chunk, [(pattern id, int32 positions), ...].
    """
    n = len(vectors)
    bits = torch.tensor([1 << i for i in range(n)], dtype=torch.int64)
    ids: dict[int, int] = {}
    groups = []
    for name, s, e in layout.chunks():
        key = torch.zeros(e - s, dtype=torch.int64)
        for i, v in enumerate(vectors):
            got = v.block(name, s, e)
            if got is not None:
                local = got[0]
                key[slice(None) if local is None else local] += bits[i]
        keys, inverse = torch.unique(key, return_inverse=True)
        order = torch.argsort(inverse, stable=True).to(torch.int32)
        counts = torch.bincount(inverse, minlength=keys.numel()).tolist()
        chunk = [(ids.setdefault(k, len(ids)), idx)
                 for k, idx in zip(keys.tolist(), order.split(counts))]
        groups.append(chunk)
    patterns = torch.tensor([[(k >> i) & 1 for i in range(n)] for k in ids], dtype=torch.bool)
    return patterns, groups


def _rhs(vectors, name, s, e, z):
    """X^T Z over coordinates [s, e): sum_i x_i z_i^T (L, d), x_i zero off its support."""
    out = torch.zeros(e - s, z.shape[1], dtype=torch.float64)
    for v, zi in zip(vectors, z):
        got = v.block(name, s, e)
        if got is None:
            continue
        local, values = got
        if local is None:
            out.addr_(values.double(), zi)
        else:
            out.index_add_(0, local, values.double()[:, None] * zi)
    return out


def _masked_normal_equations(vectors, layout, basis, ridge):
    """A_i = U^T M_i U + ridge, b_i = U^T x_i and ||x_i||^2 for every solution (float64)."""
    n, d = len(vectors), next(iter(basis.values())).shape[1]
    a = torch.zeros(n, d, d, dtype=torch.float64)
    b = torch.zeros(n, d, dtype=torch.float64)
    for name, s, e in layout.chunks():
        u = basis[name][s:e].double()
        for i, v in enumerate(vectors):
            got = v.block(name, s, e)
            if got is None:
                continue
            local, values = got
            ui = u if local is None else u[local]
            a[i] += ui.T @ ui
            b[i] += ui.T @ values.double()
    scale = sum(float(t.double().pow(2).sum()) for t in basis.values()) / d
    return a, a + ridge * max(scale, 1e-300) * torch.eye(d, dtype=torch.float64), b


def _joint(vectors, layout, dim, dtype, ridge, iterations, tol, progress):
    if len(vectors) > _MAX_JOINT_SOLUTIONS:
        raise InvalidArgumentError(
            f"method='joint' takes at most {_MAX_JOINT_SOLUTIONS} solutions, got "
            f"{len(vectors)}; use method='svd'"
        )
    basis, z = _svd(vectors, layout, dim, dtype)
    sq = torch.tensor([v.sq_norm() for v in vectors], dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)
    patterns, groups = _observation_groups(vectors, layout)
    previous = math.inf
    history = []
    for _ in tqdm(range(iterations), desc="joint fit", disable=not progress, leave=False):
        # U-step: each coordinate's row solves a d x d system over the solutions observing it,
        # one inverse per observation pattern.
        scale = float((z * z).sum()) / dim
        observed = patterns.double()
        grams = torch.einsum("pn,na,nb->pab", observed, z, z) + ridge * max(scale, 1e-300) * eye
        inverses = torch.linalg.inv(grams)
        for (name, s, e), chunk in zip(layout.chunks(), groups):
            rhs = _rhs(vectors, name, s, e, z)
            rows = torch.empty_like(rhs)
            for pattern, idx in chunk:
                rows[idx] = rhs[idx] @ inverses[pattern]  # inverses are symmetric
            basis[name][s:e] = rows.to(dtype)
        # z-step: each solution's coordinates solve its own masked least squares.
        a, a_ridge, b = _masked_normal_equations(vectors, layout, basis, ridge)
        z = torch.linalg.solve(a_ridge, b.unsqueeze(-1)).squeeze(-1)
        loss = float(
            (torch.einsum("na,nab,nb->n", z, a, z) - 2 * (z * b).sum(1) + sq).sum()
        )
        history.append(loss)
        if previous - loss <= tol * max(previous, 1e-300) and math.isfinite(previous):
            break
        previous = loss
    return basis, z, history


def _canonical(layout, basis, z):
    """Orthonormal columns ordered by the singular values of the coordinates; signs fixed."""
    d = z.shape[1]
    w = torch.zeros(d, d, dtype=torch.float64)
    for t in basis.values():
        w += t.double().T @ t.double()
    lam, q = torch.linalg.eigh(w)
    if float(lam.min()) <= 1e-300:
        raise InvalidArgumentError(
            "the fitted basis is rank deficient (a direction carries nothing); lower dim"
        )
    root = q @ torch.diag(lam.sqrt()) @ q.T
    inv_root = q @ torch.diag(lam.rsqrt()) @ q.T
    z = z @ root
    _, _, vh = torch.linalg.svd(z, full_matrices=False)
    rot = vh.T
    z = z @ rot
    signs = torch.sign(z.gather(0, z.abs().argmax(0, keepdim=True))[0])
    signs[signs == 0] = 1
    z = z * signs
    transform = inv_root @ rot * signs
    out = {}
    for name, t in basis.items():
        dtype = t.dtype
        rows = torch.empty_like(t)
        for s in range(0, t.shape[0], CHUNK):
            rows[s : s + CHUNK] = (t[s : s + CHUNK].double() @ transform).to(dtype)
        out[name] = rows
    return out, z


def fit(
    deltas: Iterable[SparseDelta],
    dim: int,
    *,
    method: str = "svd",
    labels: Sequence[str] | None = None,
    ridge: float = 1e-8,
    iterations: int = 50,
    tol: float = 1e-6,
    dtype: torch.dtype = torch.float32,
    normalize: bool = False,
    progress: bool = False,
) -> Subspace:
    """A d-dimensional subspace (S1) that reconstructs every solution in ``deltas``.

    ``deltas``: n :class:`SparseDelta` over one base model (full fine-tuning is a delta on a
    full mask; a merged LoRA is a delta on the matrices it changed). ``dim``: d, at most the
    rank of the solutions. ``method``: ``"svd"`` (uncentred PCA of the zero-filled solutions)
    or ``"joint"`` (S2: each solution observed only on its own support; alternating least
    squares from the SVD, at most ``iterations`` rounds, stopping when the objective falls by
    less than ``tol`` relatively; ``ridge`` is relative to the mean squared column norm).
    ``labels``: one name per delta (default: each delta's ``method``). The basis is stored in
    ``dtype`` (D x d entries; float32 needs 4 D d bytes); sums are accumulated in float64.
    ``normalize``: fit on every solution scaled to unit norm, so that methods whose changes are
    10-100x larger (a random mask trained at a high learning rate, full fine-tuning) do not
    claim every direction; the coordinates ``z`` stay those of the unscaled solutions.
    """
    deltas = check_deltas(deltas)
    dim = check_int("dim", dim)
    if method not in FIT_METHODS:
        raise InvalidArgumentError(f"method must be one of {list(FIT_METHODS)}, got {method!r}")
    if dim > len(deltas):
        raise InvalidArgumentError(
            f"dim must be at most the number of solutions ({len(deltas)}), got dim={dim}"
        )
    if labels is None:
        labels = [d.method for d in deltas]
    labels = [str(label) for label in labels]
    if len(labels) != len(deltas):
        raise InvalidArgumentError(
            f"labels must name each of the {len(deltas)} deltas, got {len(labels)} labels"
        )
    if not (isinstance(ridge, (int, float)) and ridge >= 0):
        raise InvalidArgumentError(f"ridge must be a number >= 0, got ridge={ridge!r}")
    check_int("iterations", iterations)
    if dtype not in (torch.float32, torch.float64):
        raise InvalidArgumentError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    layout = layout_of(deltas)
    vectors = [vector_of(d, layout, dtype, strict=True)[0] for d in deltas]
    scale = torch.ones(len(vectors), dtype=torch.float64)
    work = vectors
    if normalize:
        scale = torch.tensor([v.sq_norm() for v in vectors], dtype=torch.float64).sqrt()
        zero = [label for label, s in zip(labels, scale) if float(s) == 0.0]
        if zero:
            raise InvalidArgumentError(f"cannot normalize solutions that are all zero: {zero}")
        work = [Vector(v.pos, {k: x / float(s) for k, x in v.val.items()})
                for v, s in zip(vectors, scale)]
    history: list[float] = []
    if method == "svd":
        basis, z = _svd(work, layout, dim, dtype)
    else:
        basis, z, history = _joint(work, layout, dim, dtype, ridge, iterations, tol, progress)
    basis, z = _canonical(layout, basis, z)
    z = z * scale[:, None]  # coordinates of the solutions as given
    space = Subspace(layout, basis, z, labels, method, deltas[0].base_fingerprint)
    space.fit_history = history
    space.reconstruction_error = torch.tensor(
        [_relative_error(space, v, zi) for v, zi in zip(vectors, z)], dtype=torch.float64
    )
    return space


def _relative_error(space: Subspace, v: Vector, z: Tensor) -> float:
    """||M_i (U z - x_i)|| / ||x_i|| of one solution ``v`` at coordinates ``z``."""
    err, total = 0.0, 0.0
    for name, values in v.val.items():
        rows = space.basis(name) if v.pos[name] is None else space.basis(name)[v.pos[name]]
        err += float((rows.double() @ z.double() - values.double()).pow(2).sum())
        total += float(values.double().pow(2).sum())
    return math.sqrt(err / total) if total > 0 else 0.0
