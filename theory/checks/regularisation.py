"""E2 (sparsity as regularisation): the Monte Carlo mean over Bernoulli(p) masks of the relaxed
objective L(theta) + lam ||(I - M)(theta - theta0)||^2 matches the closed form
L(theta) + lam (1 - p) ||theta - theta0||^2 within its sampling error.

A real model: a small MLP trained for a few steps on scikit-learn's digits from its
initialisation theta0 (any theta works, E2 holds pointwise; a trained one has an uneven
theta - theta0). For each p, S masks with M_ii ~ Bernoulli(p) independently; the closed form is
``sparsetune.bounds.sparsity_penalty``. The sampling error is exact: the penalty
lam sum_i (1 - M_ii) d_i^2 has variance lam^2 p (1 - p) sum_i d_i^4, so
z = (mean - closed form) / (that standard deviation / sqrt(S)) is standard normal (CLT) when E2
holds; the check asks |z| < 4 at every p.

    .venv/bin/python -m theory.checks.regularisation [--quick] [--samples 4000]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsetune.bounds import sparsity_penalty

from ._common import RESULTS, save_figure, table, write_json

DENSITIES = (0.005, 0.05, 0.2, 0.5, 0.8, 0.95, 1.0)
Z_LIMIT = 4.0


def trained_mlp(steps: int = 50, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor], float]:
    """(model at theta, theta0, L(theta)): a 64-32-10 MLP after ``steps`` Adam steps on digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x), y))
    return model, theta0, loss


def monte_carlo(model: nn.Module, theta0: dict[str, torch.Tensor], loss: float, p: float,
                lam: float, samples: int, seed: int) -> dict[str, float]:
    """Mean of the relaxed objective over ``samples`` Bernoulli(p) masks, and the closed form."""
    d = torch.cat([(q.detach() - theta0[n]).reshape(-1) for n, q in model.named_parameters()])
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand((samples, d.numel()), generator=gen, dtype=torch.float64) < p  # Bernoulli
    values = loss + lam * (d * ~keep).square().sum(dim=1)
    sq = float(d.square().sum())
    closed = loss + float(sparsity_penalty(sq, p, lam))
    exact_sd = lam * math.sqrt(p * (1 - p) * float(d.pow(4).sum()))
    se = exact_sd / math.sqrt(samples)
    mean = float(values.mean())
    z = 0.0 if se == 0 else (mean - closed) / se
    return {
        "p": p, "monte_carlo_mean": mean, "closed_form": closed, "standard_error": se,
        "sample_standard_error": float(values.std()) / math.sqrt(samples), "z": z,
        "within": abs(z) < Z_LIMIT if se > 0 else math.isclose(mean, closed, rel_tol=1e-12),
    }


def plot(rows: list[dict[str, float]], loss: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    p = np.array([r["p"] for r in rows])
    ax.errorbar(p, [r["monte_carlo_mean"] - loss for r in rows],
                yerr=[2 * r["standard_error"] for r in rows], fmt="o", capsize=3,
                label="Monte Carlo mean of lam ||(I-M)(theta-theta0)||^2 (+- 2 s.e.)")
    grid = np.linspace(0, 1, 101)
    sq = (rows[0]["closed_form"] - loss) / (1 - rows[0]["p"]) if rows[0]["p"] < 1 else 0.0
    ax.plot(grid, (1 - grid) * sq, color="k", linewidth=1, label="lam (1-p) ||theta-theta0||^2")
    ax.set(xlabel="density p", ylabel="penalty", title="E2: sparsity as regularisation")
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000, help="masks per density")
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="300 masks per density")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples = 300
    model, theta0, loss = trained_mlp(seed=args.seed)
    rows = [monte_carlo(model, theta0, loss, p, args.lam, args.samples, args.seed + i)
            for i, p in enumerate(DENSITIES)]
    print(f"E2 (regularisation): relaxed objective over {args.samples} Bernoulli(p) masks vs the "
          f"closed form, lam = {args.lam:g}, L(theta) = {loss:.4g}")
    print(table(["p", "Monte Carlo", "closed form", "s.e. (exact)", "s.e. (sample)", "z",
                 f"|z| < {Z_LIMIT:g}"],
                [[r["p"], r["monte_carlo_mean"], r["closed_form"], r["standard_error"],
                  r["sample_standard_error"], r["z"], r["within"]] for r in rows]))
    holds = all(r["within"] for r in rows)
    print("E2 holds within the sampling error at every p" if holds else
          "E2 FAILS at p = " + ", ".join(f"{r['p']:g}" for r in rows if not r["within"]))
    name = "regularisation" + ("-quick" if args.quick else "")
    payload = {"check": "E2 sparsity as regularisation", "samples": args.samples,
               "lam": args.lam, "loss": loss, "rows": rows, "holds": holds}
    write_json(args.output_dir / f"{name}.json", payload)
    plot(rows, loss, args.output_dir / f"{name}.png")
    return payload


if __name__ == "__main__":
    main()
