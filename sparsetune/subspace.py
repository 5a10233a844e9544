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
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import check_int
from ._loss import LossFn, LossModule, check_scalar_loss, cycle
from .delta import BaseModelMismatchError, SparseDelta, base_fingerprint
from .errors import InvalidArgumentError, ParameterMismatchError
from .files import (
    FORMAT_VERSION,
    FileFormatError,
    atomic_save_safetensors,
    atomic_write,
    read_metadata,
)
from .mask import Mask

__all__ = ["FIT_METHODS", "Landscape", "Subspace", "SubspaceTrainResult", "fit"]

FIT_METHODS = ("svd", "joint")
_CHUNK = 1 << 19  # coordinates per streamed block: n x 2^19 float64 = 4 MB per solution
_MAX_JOINT_SOLUTIONS = 62  # observation patterns are int64 bit sets


# -- the union coordinates and the solutions on them ---------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """The D coordinates: for each parameter, sorted flat indices (None = every entry)."""

    shapes: dict[str, tuple[int, ...]]
    index: dict[str, Tensor | None]

    def count(self, name: str) -> int:
        idx = self.index[name]
        return math.prod(self.shapes[name]) if idx is None else idx.numel()

    @property
    def size(self) -> int:
        return sum(self.count(n) for n in self.shapes)

    def chunks(self) -> Iterator[tuple[str, int, int]]:
        for name in self.shapes:
            c = self.count(name)
            for start in range(0, c, _CHUNK):
                yield name, start, min(c, start + _CHUNK)

    def positions(self, name: str, flat: Tensor) -> Tensor:
        """Positions of flat entries ``flat`` (sorted) among the coordinates of ``name``, or -1."""
        idx = self.index[name]
        if idx is None:
            return flat
        pos = torch.searchsorted(idx, flat).clamp(max=max(idx.numel() - 1, 0))
        return torch.where(idx[pos] == flat, pos, torch.full_like(pos, -1))


@dataclass(frozen=True)
class _Vector:
    """One solution on the layout: per parameter, positions (None = all) and values."""

    pos: dict[str, Tensor | None]
    val: dict[str, Tensor]

    def block(self, name: str, start: int, stop: int) -> tuple[Tensor | None, Tensor] | None:
        """(local positions or None for all, values) of the coordinates [start, stop)."""
        if name not in self.val:
            return None
        pos, val = self.pos[name], self.val[name]
        if pos is None:
            return None, val[start:stop]
        lo, hi = (int(i) for i in torch.searchsorted(pos, torch.tensor([start, stop])))
        if lo == hi:
            return None
        return pos[lo:hi] - start, val[lo:hi]

    def sq_norm(self) -> float:
        return sum(float(v.double().pow(2).sum()) for v in self.val.values())


def _check_deltas(deltas: object) -> list[SparseDelta]:
    if isinstance(deltas, SparseDelta) or not isinstance(deltas, Iterable):
        raise InvalidArgumentError(
            f"deltas must be a sequence of SparseDelta, got {type(deltas).__name__}"
        )
    deltas = list(deltas)
    if not deltas:
        raise InvalidArgumentError("deltas is empty: fit needs at least one solution")
    bad = [type(d).__name__ for d in deltas if not isinstance(d, SparseDelta)]
    if bad:
        raise InvalidArgumentError(f"deltas must all be SparseDelta, got {bad[:3]}")
    prints = {d.base_fingerprint for d in deltas}
    if len(prints) > 1:
        raise BaseModelMismatchError(
            f"the deltas come from {len(prints)} different base models (fingerprints "
            f"{sorted(p[:12] for p in prints)}); a subspace needs solutions over one base"
        )
    return deltas


def _layout_of(deltas: Sequence[SparseDelta]) -> _Layout:
    shapes: dict[str, tuple[int, ...]] = {}
    union: dict[str, Tensor] = {}
    for d in deltas:
        for name, selected in d.support().items():
            shape = tuple(selected.shape)
            if shapes.setdefault(name, shape) != shape:
                raise ParameterMismatchError(
                    f"the deltas disagree on the shape of '{name}': {shapes[name]} and {shape}"
                )
            flat = selected.reshape(-1).cpu()
            union[name] = union[name] | flat if name in union else flat.clone()
    index = {n: (None if bool(u.all()) else torch.nonzero(u)[:, 0]) for n, u in union.items()}
    keep = [n for n in shapes if index[n] is None or index[n].numel()]
    return _Layout({n: shapes[n] for n in keep}, {n: index[n] for n in keep})


def _vector_of(
    delta: SparseDelta, layout: _Layout, dtype: torch.dtype, *, strict: bool
) -> tuple[_Vector, float]:
    """``delta`` on the layout, and the squared norm of its change outside the layout."""
    support, dense = delta.support(), delta.to_dense()
    pos: dict[str, Tensor | None] = {}
    val: dict[str, Tensor] = {}
    outside, outside_sq = 0, 0.0
    for name, selected in support.items():
        flat = torch.nonzero(selected.reshape(-1).cpu())[:, 0]
        values = dense[name].reshape(-1).cpu()[flat]
        if name not in layout.shapes:
            outside += flat.numel()
            outside_sq += float(values.pow(2).sum())
            continue
        if tuple(selected.shape) != layout.shapes[name]:
            raise ParameterMismatchError(
                f"the delta's '{name}' has shape {tuple(selected.shape)}, the subspace's "
                f"{layout.shapes[name]}"
            )
        p = layout.positions(name, flat)
        inside = p >= 0
        if not bool(inside.all()):
            outside += int((~inside).sum())
            outside_sq += float(values[~inside].pow(2).sum())
            p, values = p[inside], values[inside]
        if not p.numel():
            continue
        pos[name] = None if p.numel() == layout.count(name) else p
        val[name] = values.to(dtype)
    if outside and strict:
        raise InvalidArgumentError(
            f"the delta ({delta.method!r}) covers {outside} entries outside the subspace's "
            f"{layout.size} coordinates; the subspace cannot express them (pass strict=False "
            f"to use only the entries inside)"
        )
    return _Vector(pos, val), outside_sq


def _dense_block(vectors: Sequence[_Vector], name: str, start: int, stop: int):
    """Values (n, L) float64 (0 off each support) and observed (n, L) bool of one block."""
    x = torch.zeros(len(vectors), stop - start, dtype=torch.float64)
    seen = torch.zeros(len(vectors), stop - start, dtype=torch.bool)
    for i, v in enumerate(vectors):
        got = v.block(name, start, stop)
        if got is None:
            continue
        local, values = got
        if local is None:
            x[i] = values.double()
            seen[i] = True
        else:
            x[i, local] = values.double()
            seen[i, local] = True
    return x, seen


# -- fitting ------------------------------------------------------------------------------------
def _svd(vectors, layout, dim, dtype):
    n = len(vectors)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for name, s, e in layout.chunks():
        x, _ = _dense_block(vectors, name, s, e)
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
        x, _ = _dense_block(vectors, name, s, e)
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
        for s in range(0, t.shape[0], _CHUNK):
            rows[s : s + _CHUNK] = (t[s : s + _CHUNK].double() @ transform).to(dtype)
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
    deltas = _check_deltas(deltas)
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
    layout = _layout_of(deltas)
    vectors = [_vector_of(d, layout, dtype, strict=True)[0] for d in deltas]
    scale = torch.ones(len(vectors), dtype=torch.float64)
    work = vectors
    if normalize:
        scale = torch.tensor([v.sq_norm() for v in vectors], dtype=torch.float64).sqrt()
        zero = [label for label, s in zip(labels, scale) if float(s) == 0.0]
        if zero:
            raise InvalidArgumentError(f"cannot normalize solutions that are all zero: {zero}")
        work = [_Vector(v.pos, {k: x / float(s) for k, x in v.val.items()})
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
        [space._relative_error(v, zi) for v, zi in zip(vectors, z)], dtype=torch.float64
    )
    return space


# -- the subspace -------------------------------------------------------------------------------
@dataclass
class SubspaceTrainResult:
    """What :meth:`Subspace.train` found: the coordinates z (shape (d,)) and the loss per step."""

    z: Tensor
    losses: list[float] = field(default_factory=list)


@dataclass
class Landscape:
    """A 2-D grid of the subspace: ``values[j, i]`` is the mean loss at (``xs[i]``, ``ys[j]``).

    ``points`` maps a label to the in-plane coordinates of every marked solution with that
    label (their other coordinates are not shown by the picture).
    """

    xs: Tensor
    ys: Tensor
    values: Tensor
    axes: tuple[int, int]
    points: dict[str, list[tuple[float, float]]]
    title: str = ""

    def save_png(self, path: str | os.PathLike) -> Path:
        """Heat map with each label's points marked, written atomically as a PNG."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 5.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        mesh = ax.pcolormesh(
            self.xs.numpy(), self.ys.numpy(), self.values.numpy(), shading="nearest",
            cmap="viridis_r",
        )
        fig.colorbar(mesh, ax=ax, label="mean loss")
        from matplotlib import colormaps

        colors = colormaps["tab20"].colors
        markers = "o^sDvPXhp<>*"
        for k, (label, pts) in enumerate(self.points.items()):
            xs, ys = zip(*pts) if pts else ((), ())
            ax.scatter(xs, ys, marker=markers[k % len(markers)], s=60, label=label,
                       color=colors[(2 * k) % 20 + (k // 10) % 2], edgecolors="white",
                       linewidths=0.8)
        ax.scatter([0], [0], marker="+", color="red", s=80, label="base (z = 0)")
        ax.set(xlabel=f"z[{self.axes[0]}]", ylabel=f"z[{self.axes[1]}]", title=self.title)
        fig.legend(fontsize="small", loc="outside right upper")
        target = Path(path)
        return atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


class Subspace:
    """theta(z) = theta0 + M U z (S1) over the coordinates its solutions touch.

    Attributes: ``dim`` (d), ``num_coordinates`` (D), ``method`` (how it was fitted),
    ``labels`` and ``coordinates`` (n x d float64: the fitted coordinates of each solution),
    ``reconstruction_error`` (n: ||M_i (U z_i - x_i)|| / ||x_i||), ``base_fingerprint``.
    """

    def __init__(
        self,
        layout: _Layout,
        basis: Mapping[str, Tensor],
        coordinates: Tensor,
        labels: Sequence[str],
        method: str,
        fingerprint: str,
    ) -> None:
        self._layout = layout
        self._basis = dict(basis)
        self.coordinates = coordinates.to(torch.float64)
        self.labels = list(labels)
        self.method = method
        self.base_fingerprint = fingerprint
        self.reconstruction_error = torch.full((len(self.labels),), float("nan"))
        self.fit_history: list[float] = []

    @property
    def dim(self) -> int:
        return self.coordinates.shape[1]

    @property
    def num_coordinates(self) -> int:
        return self._layout.size

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._layout.shapes)

    def __repr__(self) -> str:
        return (
            f"Subspace(dim={self.dim}, method={self.method!r}, coordinates={self.num_coordinates}"
            f", solutions={len(self.labels)}, base={self.base_fingerprint[:12]}...)"
        )

    def summary(self) -> str:
        """A readable table: each fitted solution's coordinates and reconstruction error."""
        lines = [
            f"{self!r}",
            f"{'solution':<24}{'rel. error':>11}  coordinates",
        ]
        for label, z, err in zip(self.labels, self.coordinates, self.reconstruction_error):
            coords = " ".join(f"{float(c):+.3g}" for c in z[:8])
            more = " ..." if self.dim > 8 else ""
            lines.append(f"{label:<24}{float(err):>11.4f}  {coords}{more}")
        return "\n".join(lines)

    def basis(self, name: str) -> Tensor:
        """Rows of U for parameter ``name``: (count, d), in the order of its flat indices."""
        return self._basis[name]

    def index(self, name: str) -> Tensor | None:
        """Flat indices of ``name`` the subspace covers (None: every entry)."""
        return self._layout.index[name]

    # -- coordinates ------------------------------------------------------------------------
    def _check_z(self, z: object) -> Tensor:
        if not isinstance(z, Tensor):
            z = torch.as_tensor(z, dtype=torch.float64)
        if z.shape != (self.dim,) or not z.is_floating_point():
            raise InvalidArgumentError(
                f"z must be a floating-point tensor of shape ({self.dim},), got "
                f"{z.dtype} {tuple(z.shape)}"
            )
        return z

    def _relative_error(self, v: _Vector, z: Tensor) -> float:
        err, total = 0.0, 0.0
        for name, values in v.val.items():
            rows = self._basis[name] if v.pos[name] is None else self._basis[name][v.pos[name]]
            err += float((rows.double() @ z.double() - values.double()).pow(2).sum())
            total += float(values.double().pow(2).sum())
        return math.sqrt(err / total) if total > 0 else 0.0

    def _check_delta(self, delta: object) -> SparseDelta:
        if not isinstance(delta, SparseDelta):
            raise InvalidArgumentError(f"delta must be a SparseDelta, got {type(delta).__name__}")
        if delta.base_fingerprint != self.base_fingerprint:
            raise BaseModelMismatchError(
                f"the delta was extracted from another base model (fingerprint "
                f"{delta.base_fingerprint[:12]}..., the subspace's {self.base_fingerprint[:12]}"
                f"...)"
            )
        return delta

    def project(self, delta: SparseDelta, *, strict: bool = True) -> Tensor:
        """Coordinates z (shape (d,), float64) that best reconstruct ``delta`` on its support.

        Minimum-norm least squares of || M (U z - x) || over the delta's own support M (for a
        delta whose support is the whole union, simply z = U^T x). With ``strict=True``
        (default) a delta that changes entries outside the subspace's coordinates is refused;
        with ``strict=False`` those entries are left out.
        """
        v, _ = _vector_of(self._check_delta(delta), self._layout, torch.float64, strict=strict)
        a = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        b = torch.zeros(self.dim, dtype=torch.float64)
        for name, values in v.val.items():
            rows = self._basis[name] if v.pos[name] is None else self._basis[name][v.pos[name]]
            rows = rows.double()
            a += rows.T @ rows
            b += rows.T @ values
        scale = float(a.diagonal().max()) if a.numel() else 0.0
        if scale == 0.0:
            return torch.zeros(self.dim, dtype=torch.float64)
        return torch.linalg.lstsq(a, b.unsqueeze(1), rcond=1e-10, driver="gelsd").solution[:, 0]

    def reconstruct(self, z: Tensor, mask: Mask | SparseDelta | None = None) -> dict[str, Tensor]:
        """dtheta = M U z as dense float64 tensors per parameter (0 outside the coordinates).

        ``mask``: a Mask, or a SparseDelta whose support is used (default: every coordinate).
        """
        z = self._check_z(z).detach().double()
        keep = self._mask_bits(mask)
        out = {}
        for name, shape in self._layout.shapes.items():
            change = self._basis[name].double() @ z
            if keep is not None:
                if name not in keep:
                    continue
                change = change * keep[name]
            dense = torch.zeros(math.prod(shape), dtype=torch.float64)
            idx = self._layout.index[name]
            dense[slice(None) if idx is None else idx] = change
            out[name] = dense.reshape(shape)
        return out

    def _mask_bits(self, mask: Mask | SparseDelta | None) -> dict[str, Tensor] | None:
        """For each covered parameter in ``mask``: which of its coordinates the mask keeps."""
        if mask is None:
            return None
        if isinstance(mask, SparseDelta):
            mask = mask.support()
        if not isinstance(mask, Mask):
            raise InvalidArgumentError(
                f"mask must be a Mask, a SparseDelta or None, got {type(mask).__name__}"
            )
        bits = {}
        for name, shape in self._layout.shapes.items():
            if name not in mask:
                continue
            selected = mask[name]
            if tuple(selected.shape) != shape:
                raise ParameterMismatchError(
                    f"mask's '{name}' has shape {tuple(selected.shape)}, the subspace's {shape}"
                )
            flat = selected.reshape(-1).cpu()
            idx = self._layout.index[name]
            bits[name] = flat if idx is None else flat[idx]
        return bits

    # -- the model at theta(z) -----------------------------------------------------------------
    def _check_model(self, model: nn.Module, check_base: bool) -> dict[str, Tensor]:
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model)}")
        params = {n: p.detach() for n, p in model.named_parameters()}
        wrong = [
            f"{n}: subspace {s}, model {tuple(params[n].shape) if n in params else 'missing'}"
            for n, s in self._layout.shapes.items()
            if n not in params or tuple(params[n].shape) != s
        ]
        if wrong:
            raise ParameterMismatchError(f"the subspace does not fit the model: {wrong}")
        if check_base:
            found = base_fingerprint(params)
            if found != self.base_fingerprint:
                raise BaseModelMismatchError(
                    f"the model is not the base the subspace was fitted over (fingerprint "
                    f"{found[:12]}..., expected {self.base_fingerprint[:12]}...); pass the "
                    f"untouched base model, or check_base=False"
                )
        return params

    def parameters_at(
        self, z: Tensor, base: Mapping[str, Tensor], mask: Mask | SparseDelta | None = None
    ) -> dict[str, Tensor]:
        """theta0 + M U z (S1) for every covered parameter (differentiable in ``z``).

        ``base`` maps names to theta0 (e.g. ``dict(model.named_parameters())``); each result has
        its parameter's dtype and device.
        """
        return self._theta(z, base, self._mask_bits(mask))

    def _theta(
        self, z: Tensor, base: Mapping[str, Tensor], bits: dict[str, Tensor] | None
    ) -> dict[str, Tensor]:
        z = self._check_z(z)
        out = {}
        for name in self._layout.shapes:
            if bits is not None and name not in bits:
                continue
            theta0 = base[name].detach()
            rows = self._basis[name].to(device=theta0.device)
            change = rows @ z.to(device=theta0.device, dtype=rows.dtype)
            if bits is not None:
                change = change * bits[name].to(theta0.device)
            change = change.to(theta0.dtype)
            idx = self._layout.index[name]
            flat = theta0.reshape(-1)
            if idx is None:
                out[name] = (flat + change).reshape(theta0.shape)
            else:
                out[name] = flat.index_add(0, idx.to(theta0.device), change).reshape(theta0.shape)
        return out

    def _loss(self, model, loss_fn, params, batch) -> Tensor:
        swapped = {f"model.{n}": t for n, t in params.items()}
        return check_scalar_loss(
            torch.func.functional_call(LossModule(model, loss_fn), swapped, (batch,)))

    @torch.no_grad()
    def apply_to(
        self, model: nn.Module, z: Tensor, mask: Mask | SparseDelta | None = None, *,
        check_base: bool = True,
    ) -> nn.Module:
        """Write theta0 + M U z into the base ``model`` in place (fingerprint checked)."""
        base = self._check_model(model, check_base)
        named = dict(model.named_parameters())
        for name, value in self.parameters_at(z, base, mask).items():
            named[name].copy_(value)
        return model

    def evaluate(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable[Any],
        z: Tensor,
        mask: Mask | SparseDelta | None = None,
        *,
        check_base: bool = True,
    ) -> float:
        """Mean of ``loss_fn(model, batch)`` over ``data`` at theta(z); the model is untouched.

        Runs in the model's current train/eval mode, without gradients.
        """
        base = self._check_model(model, check_base)
        bits = self._mask_bits(mask)
        total, count = 0.0, 0
        with torch.no_grad():
            params = {**base, **self._theta(z, base, bits)}
            for batch in data:
                total += float(self._loss(model, loss_fn, params, batch))
                count += 1
        if not count:
            raise InvalidArgumentError("data is empty: nothing to evaluate")
        return total / count

    def train(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable[Any],
        *,
        steps: int,
        lr: float = 1e-2,
        mask: Mask | SparseDelta | None = None,
        init: Tensor | None = None,
        check_base: bool = True,
        progress: bool = False,
    ) -> SubspaceTrainResult:
        """Train only z: Adam on loss_fn at theta0 + M U z for ``steps`` batches of ``data``.

        ``model`` is the base and is never modified (``torch.func.functional_call`` swaps every
        parameter for theta(z), so no ``.grad`` is written). ``data`` is iterated again when it
        runs out. ``init`` is the starting z (default 0, the base model); ``mask`` is the
        support the point is decoded in (default every coordinate). Runs in the model's current
        train/eval mode (``model.train()`` for dropout).

        Adam steps in orthonormal coordinates of the decoded directions M U (z = T w with
        (M U T)^T (M U T) = I), so ``lr`` is a step length in parameter space (units of theta)
        whatever the scale of U's columns on the mask; the returned z is in the subspace's own
        coordinates. Directions that decode to zero on the mask stay at ``init``.
        """
        check_int("steps", steps)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise InvalidArgumentError(f"lr must be a number > 0, got lr={lr!r}")
        base = self._check_model(model, check_base)
        bits = self._mask_bits(mask)
        dtype = next(iter(self._basis.values())).dtype
        start = torch.zeros(self.dim, dtype=torch.float64) if init is None else self._check_z(init)
        # Adam runs on whitened coordinates w, z = T w with (M U T)^T (M U T) = I on the kept
        # directions: restricted to a method's support, U's columns can be far from orthonormal
        # (a joint basis spreads over every method's entries), and Adam's per-coordinate steps
        # in z then zig-zag or stall. Directions M U cannot express (zero Gram eigenvalues)
        # change nothing in the model and are left out.
        gram = self._gram(bits)
        eigvals, eigvecs = torch.linalg.eigh(gram)
        keep = eigvals > 1e-10 * max(float(eigvals.max()), 0.0)
        if not bool(keep.any()):
            raise InvalidArgumentError(
                "the subspace has no direction on the entries of this mask (M U = 0); "
                "pick a mask that overlaps the subspace's coordinates"
            )
        to_z = eigvecs[:, keep] / eigvals[keep].sqrt()  # T: w -> z (d, r)
        from_z = eigvecs[:, keep].T * eigvals[keep].sqrt()[:, None]  # z -> w (r, d)
        w = (from_z @ start.double()).to(dtype).clone().requires_grad_(True)
        to_z = to_z.to(dtype)
        outside = start.double() - to_z.double() @ (from_z @ start.double())  # kept as given
        opt = torch.optim.Adam([w], lr=lr)
        losses: list[float] = []
        stream = cycle(data)
        for _ in tqdm(range(steps), desc="subspace training", disable=not progress, leave=False):
            opt.zero_grad(set_to_none=True)
            z = to_z @ w + outside.to(dtype)
            params = {**base, **self._theta(z, base, bits)}
            loss = self._loss(model, loss_fn, params, next(stream))
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        z = to_z.double() @ w.detach().double() + outside
        return SubspaceTrainResult(z, losses)

    def _gram(self, bits: dict[str, Tensor] | None) -> Tensor:
        """(M U)^T (M U), (d, d) float64, over the coordinates ``bits`` keeps (None: all)."""
        gram = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        for name, rows in self._basis.items():
            if bits is not None:
                if name not in bits:
                    continue
                rows = rows[bits[name].to(torch.bool)]
            rows = rows.double()
            gram += rows.T @ rows
        return gram

    def landscape(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable[Any],
        *,
        grid: int = 11,
        axes: tuple[int, int] = (0, 1),
        limits: tuple[float, float, float, float] | None = None,
        mask: Mask | SparseDelta | None = None,
        points: Mapping[str, Sequence[Tensor]] | None = None,
        path: str | os.PathLike | None = None,
        title: str = "",
        check_base: bool = True,
        progress: bool = False,
    ) -> Landscape:
        """Mean loss on a ``grid`` x ``grid`` plane z = a e_i + b e_j, (i, j) = ``axes``.

        The fitted solutions are marked at their (z_i, z_j) (grouped by label), with any extra
        ``points`` (label -> list of z). ``limits`` = (x_min, x_max, y_min, y_max); by default
        the marked points and the origin with a 20% margin. ``data`` is iterated once per grid
        point (keep it small). With ``path`` the heat map is saved as a PNG.
        """
        check_int("grid", grid, minimum=2)
        i, j = axes
        if not (0 <= i < self.dim and 0 <= j < self.dim and i != j):
            raise InvalidArgumentError(
                f"axes must be two different integers in [0, {self.dim}), got axes={axes!r}"
            )
        marked: dict[str, list[tuple[float, float]]] = {}
        for label, z in zip(self.labels, self.coordinates):
            marked.setdefault(label, []).append((float(z[i]), float(z[j])))
        for label, zs in (points or {}).items():
            for z in zs:
                z = self._check_z(z)
                marked.setdefault(label, []).append((float(z[i]), float(z[j])))
        if limits is None:
            xs_all = [p[0] for pts in marked.values() for p in pts] + [0.0]
            ys_all = [p[1] for pts in marked.values() for p in pts] + [0.0]
            pad_x = 0.2 * (max(xs_all) - min(xs_all)) or 1.0
            pad_y = 0.2 * (max(ys_all) - min(ys_all)) or 1.0
            limits = (min(xs_all) - pad_x, max(xs_all) + pad_x,
                      min(ys_all) - pad_y, max(ys_all) + pad_y)
        if len(limits) != 4 or not (limits[0] < limits[1] and limits[2] < limits[3]):
            raise InvalidArgumentError(
                f"limits must be (x_min, x_max, y_min, y_max) with min < max, got {limits!r}"
            )
        xs = torch.linspace(limits[0], limits[1], grid, dtype=torch.float64)
        ys = torch.linspace(limits[2], limits[3], grid, dtype=torch.float64)
        values = torch.empty(grid, grid, dtype=torch.float64)
        self._check_model(model, check_base)
        cells = [(r, c) for r in range(grid) for c in range(grid)]
        for r, c in tqdm(cells, desc="landscape", disable=not progress, leave=False):
            z = torch.zeros(self.dim, dtype=torch.float64)
            z[i], z[j] = xs[c], ys[r]
            values[r, c] = self.evaluate(model, loss_fn, data, z, mask, check_base=False)
        result = Landscape(xs, ys, values, (i, j), marked, title)
        if path is not None:
            result.save_png(path)
        return result

    def decode(
        self, z: Tensor, model: nn.Module, mask: Mask | SparseDelta | None = None, *,
        method: str = "subspace", check_base: bool = True,
    ) -> SparseDelta:
        """theta0 + M U z as a SparseDelta of the base ``model`` (on M and the coordinates)."""
        import copy

        base = self._check_model(model, check_base)
        bits = self._mask_bits(mask)
        tuned = copy.deepcopy(model)
        named = dict(tuned.named_parameters())
        support = {}
        with torch.no_grad():
            for name, value in self._theta(z, base, bits).items():
                named[name].copy_(value)
        for name, shape in self._layout.shapes.items():
            if bits is not None and name not in bits:
                continue
            flat = torch.zeros(math.prod(shape), dtype=torch.bool)
            idx = self._layout.index[name]
            if bits is None:
                keep = torch.ones(self._layout.count(name), dtype=torch.bool)
            else:
                keep = bits[name]
            flat[slice(None) if idx is None else idx] = keep
            support[name] = flat.reshape(shape).to(base[name].device)
        return SparseDelta.extract(tuned, base, Mask(support), method=method)

    # -- files ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the subspace to one safetensors file, atomically (kind ``"subspace"``)."""
        tensors: dict[str, Tensor] = {
            "coordinates": self.coordinates.contiguous(),
            "reconstruction_error": self.reconstruction_error.to(torch.float64),
        }
        parameters = []
        for name, shape in self._layout.shapes.items():
            tensors[f"basis:{name}"] = self._basis[name]
            idx = self._layout.index[name]
            if idx is not None:
                dtype = torch.int32 if math.prod(shape) < 2**31 else torch.int64
                tensors[f"idx:{name}"] = idx.to(dtype)
            parameters.append([name, list(shape), "dense" if idx is None else "idx"])
        metadata = {
            "format_version": FORMAT_VERSION,
            "kind": "subspace",
            "method": self.method,
            "dim": str(self.dim),
            "labels": json.dumps(self.labels),
            "base_fingerprint": self.base_fingerprint,
            "parameters": json.dumps(parameters),
            "fit_history": json.dumps(self.fit_history),
        }
        return atomic_save_safetensors(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Subspace:
        """Read a subspace file strictly: every listed tensor present and consistent."""
        metadata = read_metadata(path, "subspace")
        try:
            parameters = json.loads(metadata["parameters"])
            labels = json.loads(metadata["labels"])
            dim = int(metadata["dim"])
            fingerprint = metadata["base_fingerprint"]
            history = json.loads(metadata.get("fit_history", "[]"))
        except (KeyError, ValueError) as exc:
            raise FileFormatError(f"{path}: damaged metadata ({exc})") from exc
        expected = {"coordinates", "reconstruction_error"}
        for name, _, encoding in parameters:
            expected.add(f"basis:{name}")
            if encoding == "idx":
                expected.add(f"idx:{name}")
        shapes, index, basis = {}, {}, {}
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            if present != expected:
                raise FileFormatError(
                    f"{path}: tensors do not match the listed parameters; missing "
                    f"{sorted(expected - present)}, unexpected {sorted(present - expected)}"
                )
            coordinates = f.get_tensor("coordinates")
            error = f.get_tensor("reconstruction_error")
            for name, shape, encoding in parameters:
                idx = f.get_tensor(f"idx:{name}").long() if encoding == "idx" else None
                rows = f.get_tensor(f"basis:{name}")
                count = math.prod(shape) if idx is None else idx.numel()
                if rows.shape != (count, dim) or (
                    idx is not None and count and (int(idx.min()) < 0
                                                    or int(idx.max()) >= math.prod(shape))
                ):
                    raise FileFormatError(f"{path}: entries of '{name}' are inconsistent")
                shapes[name], index[name], basis[name] = tuple(shape), idx, rows
        if coordinates.shape != (len(labels), dim) or error.shape != (len(labels),):
            raise FileFormatError(f"{path}: coordinates do not match {len(labels)} labels")
        space = cls(_Layout(shapes, index), basis, coordinates, labels,
                    metadata.get("method", "unknown"), fingerprint)
        space.reconstruction_error = error
        space.fit_history = history
        return space
