"""E5 (SAM, the paper's Theorem 3): on random tiny problems, the mask that keeps the k largest
g_i^2 / h_i minimises the second-order model over *all* masks of size k.

Each trial draws m parameters, a gradient g, a positive curvature and a budget k, and builds a
model whose loss is exactly the second-order model
L(theta) = g^T (theta - theta0) + 1/2 (theta - theta0)^T H (theta - theta0). The SAM mask comes
from the library (``select.accumulated_gradient`` for g, ``curvature.hessian_diagonal(method=
"exact")`` for h, ``Mask.top_k`` of g^2 / h); the brute force solves min over dtheta of the
model for every one of the C(m, k) masks with a dense linear solve. Three variants:

* ``diagonal H`` (the theorem's assumption): SAM must reach the brute-force minimum every time;
* ``diagonal H, score g^2`` (the paper's practical variant, H bounded by lambda_max I): not
  optimal in general, shown for contrast;
* ``dense H`` (off-diagonal couplings, SAM with diag(H)): the theorem does not cover it; the
  table reports how often SAM is still optimal and its regret.

    .venv/bin/python -m theory.checks.sam_optimality [--quick] [--trials 200]
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sparsetune import Mask, curvature
from sparsetune.select import accumulated_gradient

from ._common import RESULTS, save_figure, table, write_json

VARIANTS = ("diagonal H", "diagonal H, score g^2", "dense H")


class Quadratic(nn.Module):
    """A model whose loss is exactly g^T d + 1/2 d^T H d, d = theta - theta0."""

    def __init__(self, theta0: Tensor, g: Tensor, H: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta0.clone())
        self.register_buffer("theta0", theta0.clone())
        self.register_buffer("g", g)
        self.register_buffer("H", H)

    def forward(self, _batch: object = None) -> Tensor:
        d = self.theta - self.theta0
        return self.g @ d + 0.5 * d @ self.H @ d


def _loss(model: nn.Module, batch: object) -> Tensor:
    return model(batch)


def model_value(g: np.ndarray, H: np.ndarray, support: tuple[int, ...]) -> float:
    """min over d supported on ``support`` of g^T d + 1/2 d^T H d, by a dense solve."""
    idx = list(support)
    d = np.linalg.solve(H[np.ix_(idx, idx)], -g[idx])
    return float(g[idx] @ d + 0.5 * d @ H[np.ix_(idx, idx)] @ d)


@dataclass(frozen=True)
class Trial:
    variant: str
    m: int
    k: int
    sam_value: float  # the second-order model at the SAM mask's minimiser
    best_value: float  # brute-force minimum over all C(m, k) masks

    @property
    def regret(self) -> float:
        return self.sam_value - self.best_value

    @property
    def optimal(self) -> bool:
        return self.regret <= 1e-9 * max(1.0, abs(self.best_value))


def trial(seed: int, variant: str = "diagonal H", max_m: int = 9) -> Trial:
    """One random problem: SAM's mask from the library against the brute-force best mask."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    rng = np.random.default_rng(seed)
    m = int(rng.integers(3, max_m + 1))
    k = int(rng.integers(1, m))
    g = rng.standard_normal(m) * rng.lognormal(0, 1, m)
    h = rng.lognormal(0, 1, m)
    if variant == "dense H":
        A = rng.standard_normal((m, m)) / np.sqrt(m)
        H = A @ A.T + np.diag(h)  # positive definite, coupled
    else:
        H = np.diag(h)
    theta0 = torch.from_numpy(rng.standard_normal(m))
    model = Quadratic(theta0, torch.from_numpy(g), torch.from_numpy(H)).double()
    data = [None]
    grad = accumulated_gradient(model, _loss, data, max_grad_norm=None)["theta"]
    if variant == "diagonal H, score g^2":
        scores = grad.square()
    else:
        diag = curvature.hessian_diagonal(model, _loss, data, method="exact", progress=False)
        scores = grad.square() / diag["theta"]
    # (k + 0.5) / m: budget_size reads p as a decimal, and floor(m p) must be exactly k
    mask = Mask.top_k({"theta": scores}, density=(k + 0.5) / m)
    support = tuple(int(i) for i in torch.nonzero(mask["theta"]).squeeze(1))
    if len(support) != k:
        raise AssertionError(f"top_k kept {len(support)} entries, expected k = {k}")
    best = min(model_value(g, H, s) for s in itertools.combinations(range(m), k))
    return Trial(variant, m, k, model_value(g, H, support), best)


def run(trials: int, max_m: int = 9) -> dict[str, list[Trial]]:
    return {v: [trial(s, v, max_m) for s in range(trials)] for v in VARIANTS}


def summarise(results: dict[str, list[Trial]]) -> list[dict[str, object]]:
    rows = []
    for variant, ts in results.items():
        regrets = np.array([t.regret for t in ts])
        rows.append({
            "variant": variant,
            "trials": len(ts),
            "sam_optimal": sum(t.optimal for t in ts) / len(ts),
            "mean_regret": float(regrets.mean()),
            "max_regret": float(regrets.max()),
            "theorem_applies": variant == "diagonal H",
        })
    return rows


def plot(results: dict[str, list[Trial]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    lo = min(t.best_value for ts in results.values() for t in ts)
    for (variant, ts), marker in zip(results.items(), "o^s"):
        ax.scatter([t.best_value for t in ts], [t.sam_value for t in ts], marker=marker,
                   s=18, alpha=0.7, label=variant)
    ax.plot([lo, 0], [lo, 0], color="k", linewidth=1, label="SAM = brute-force minimum")
    ax.set(xlabel="brute-force minimum of the second-order model over all masks of size k",
           ylabel="second-order model at the selected mask",
           title="E5: the SAM mask against every mask of size k")
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="random problems per variant")
    parser.add_argument("--max-m", type=int, default=10, help="largest number of parameters")
    parser.add_argument("--quick", action="store_true", help="20 trials of at most 7 parameters")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.max_m = 20, 7
    results = run(args.trials, args.max_m)
    rows = summarise(results)
    print("E5 (SAM optimality): fraction of random problems where the selected mask reaches the "
          "brute-force minimum")
    print(table(["variant", "trials", "SAM optimal", "mean regret", "max regret",
                 "theorem applies"], [list(r.values()) for r in rows]))
    failed = [r for r in rows if r["theorem_applies"] and r["sam_optimal"] < 1]
    print("SAM reached the minimum in every diagonal-H trial" if not failed else
          f"SAM MISSED the minimum in {1 - failed[0]['sam_optimal']:.1%} of diagonal-H trials")
    name = "sam_optimality" + ("-quick" if args.quick else "")
    payload = {"check": "E5 SAM optimality", "trials": args.trials, "max_m": args.max_m,
               "rows": rows, "holds": not failed}
    write_json(args.output_dir / f"{name}.json", payload)
    plot(results, args.output_dir / f"{name}.png")
    return payload


if __name__ == "__main__":
    main()
