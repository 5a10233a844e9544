"""The subspace itself: theta(z) = theta0 + M U z (S1) over the union coordinates.

:class:`Subspace` holds U (per parameter, the rows of its covered entries, (count, d)), the
fitted coordinates of each solution (n x d float64) and the base model's fingerprint. It projects
a delta to z, reconstructs M U z, writes theta(z) into a base model or as a
:class:`~sparsetune.SparseDelta` (:meth:`Subspace.decode`; decoding with another method's mask M
is Yi et al.'s *transfer*), evaluates and trains z with the base model untouched
(``torch.func.functional_call``), and maps the loss on a plane (:mod:`.landscape`). Its file
format lives in :mod:`sparsetune.files.subspace_file`.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._checks import check_int, check_positive
from .._loss import LossFn, LossModule, check_scalar_loss, cycle
from ..delta import BaseModelMismatchError, SparseDelta, base_fingerprint, saved_buffers
from ..errors import InvalidArgumentError, ParameterMismatchError
from ..mask import Mask
from .landscape import Landscape, check_axes, loss_plane, mark_points, plane_limits
from .layout import Layout, vector_of

__all__ = ["Subspace", "SubspaceTrainResult"]


@dataclass
class SubspaceTrainResult:
    """What :meth:`Subspace.train` found: the coordinates z (shape (d,)) and the loss per step."""

    z: Tensor
    losses: list[float] = field(default_factory=list)


class Subspace:
    """theta(z) = theta0 + M U z (S1) over the coordinates its solutions touch.

    Attributes: ``dim`` (d), ``num_coordinates`` (D), ``method`` (how it was fitted),
    ``labels`` and ``coordinates`` (n x d float64: the fitted coordinates of each solution),
    ``reconstruction_error`` (n: ||M_i (U z_i - x_i)|| / ||x_i||), ``base_fingerprint``.
    """

    def __init__(
        self,
        layout: Layout,
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

    @property
    def layout(self) -> Layout:
        """The union coordinates: each covered parameter's shape and flat indices."""
        return self._layout

    def __repr__(self) -> str:
        return (
            f"Subspace(dim={self.dim}, method={self.method!r}, coordinates={self.num_coordinates}"
            f", solutions={len(self.labels)}, base={self.base_fingerprint[:12]}...)"
        )

    def summary(self) -> str:
        """A readable table: each fitted solution's coordinates and reconstruction error."""
        lines = [f"{self!r}", f"{'solution':<24}{'rel. error':>11}  coordinates"]
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
        v, _ = vector_of(self._check_delta(delta), self._layout, torch.float64, strict=strict)
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
        check_positive("lr", lr)
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
        axes = check_axes(self.dim, axes)
        extra = [(label, self._check_z(z)) for label, zs in (points or {}).items() for z in zs]
        marked = mark_points(axes, [*zip(self.labels, self.coordinates), *extra])
        limits = plane_limits(marked, limits)
        self._check_model(model, check_base)

        def loss_at(z: Tensor) -> float:
            return self.evaluate(model, loss_fn, data, z, mask, check_base=False)

        result = loss_plane(loss_at, self.dim, axes, limits, grid, marked, title=title,
                            progress=progress)
        if path is not None:
            result.save_png(path)
        return result

    def decode(
        self, z: Tensor, model: nn.Module, mask: Mask | SparseDelta | None = None, *,
        method: str = "subspace", check_base: bool = True,
    ) -> SparseDelta:
        """theta0 + M U z as a SparseDelta of the base ``model`` (on M and the coordinates)."""
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
        unchanged = saved_buffers(model)
        return SparseDelta.extract(tuned, {**unchanged, **base}, Mask(support), method=method)

    # -- files ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the subspace to one safetensors file, atomically (kind ``"subspace"``)."""
        from ..files.subspace_file import save_subspace

        return save_subspace(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Subspace:
        """Read a subspace file strictly: every listed tensor present and consistent."""
        from ..files.subspace_file import load_subspace

        return load_subspace(path)
