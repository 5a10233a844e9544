"""E3 (stability): measured pointwise hypothesis stability of sparse fine-tuning falls as the
density p falls, and stays under the bound evaluated with estimated constants.

Set-up (scikit-learn's breast_cancer, 569 x 30, standardised): a logistic regression
(``nn.Linear(30, 1)``, m = 31 parameters) is "pretrained" on 250 examples with a strong ridge
(theta0: a good but shrunk start), then sparse fine-tuned on n other examples with a random
mask of density p (``sparsetune.select(model, "random", p)``): theta = theta0 + M dtheta,
trained to convergence (L-BFGS in float64 on the k selected entries) on the mean logistic loss
plus a small ridge mu/2 ||dtheta||^2 that keeps the problem well posed at p = 1.

Measured: ``sparsetune.testing.empirical_stability`` (leave-one-out retraining) averaged over
mask draws. Bound: ``sparsetune.bounds.stability_bound`` with the constants of
``sparsetune.bounds.estimate_constants`` at the fine-tuned model, in two readings (theory/ E3):

* masked (fixed mask): rho and Lambda_min of the trained coordinates only (H_MM), plus the
  ridge mu, and lam = 0 (for a fixed mask the sparsity is exact, not a penalty);
* paper: rho and Lambda_min of the full Hessian plus mu, with the relaxed penalty 2 lam (1 - p)
  and lam = ``--lam`` (default 1).

The table says, for each p, whether the measured value stays under each bound, and whether the
measured value falls with p.

    .venv/bin/python -m theory.checks.stability [--quick]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetune import Mask, select
from sparsetune.bounds import estimate_constants, stability_bound
from sparsetune.testing import empirical_stability

from ._common import RESULTS, save_figure, table, write_json

DENSITIES = (0.1, 0.25, 0.5, 1.0)
PRETRAIN = 250
PRETRAIN_RIDGE = 1e-2
RIDGE = 1e-2  # mu: the fine-tuning objective is mean loss + mu/2 ||dtheta||^2

Example = tuple[Tensor, Tensor]


def load_data(seed: int = 0) -> tuple[Tensor, Tensor]:
    """breast_cancer, standardised, rows in a seeded random order (float64 x, float64 y)."""
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer()
    x = (raw.data - raw.data.mean(0)) / raw.data.std(0)
    order = np.random.default_rng(seed).permutation(len(x))
    return (torch.tensor(x[order], dtype=torch.float64),
            torch.tensor(raw.target[order], dtype=torch.float64))


def batch_loss(model: nn.Module, batch: Example) -> Tensor:
    """Mean logistic loss of a batch (x: (N, 30), y: (N,))."""
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)


def example_loss(model: nn.Module, example: Example) -> Tensor:
    x, y = example
    return batch_loss(model, (x.unsqueeze(0), y.unsqueeze(0)))


def _fit(model: nn.Linear, x: Tensor, y: Tensor, mask: Mask, ridge: float) -> nn.Linear:
    """Minimise mean loss + ridge/2 ||dtheta||^2 over the selected entries of a logistic
    regression, theta = theta0 + P z (theory/ E1), by damped Newton to machine precision."""
    theta0 = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    selected = torch.cat([mask["weight"].reshape(-1), mask["bias"]])
    features = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)[:, selected]
    offset = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1) @ theta0
    n, k = features.shape
    z = torch.zeros(k, dtype=torch.float64)

    def value(z: Tensor) -> Tensor:
        logits = offset + features @ z
        return (F.softplus(logits) - y * logits).mean() + 0.5 * ridge * z @ z

    for _ in range(100):
        s = torch.sigmoid(offset + features @ z)
        grad = features.T @ (s - y) / n + ridge * z
        hess = (features.T * (s * (1 - s))) @ features / n + ridge * torch.eye(k, dtype=z.dtype)
        step = torch.linalg.solve(hess, grad)
        decrement = float(grad @ step)  # Newton decrement^2: the predicted decrease, twice
        if decrement < 1e-28:  # converged to rounding
            break
        t, current = 1.0, float(value(z))
        # backtrack far from the solution only: near it the full step is quadratically
        # convergent and the loss can no longer resolve the decrease
        while (decrement > 1e-12 and t > 1e-6
               and float(value(z - t * step)) > current - 0.25 * t * decrement):
            t /= 2
        z = z - t * step
    theta = theta0.clone()
    theta[selected] += z
    tuned = nn.Linear(model.in_features, 1).double()
    with torch.no_grad():
        tuned.weight.copy_(theta[:-1].reshape(1, -1))
        tuned.bias.copy_(theta[-1:])
    return tuned


def pretrained(x: Tensor, y: Tensor) -> nn.Linear:
    """theta0: the logistic regression fitted on the pretraining rows with a strong ridge."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Linear(x.shape[1], 1).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return _fit(model, x, y, Mask.full(model), PRETRAIN_RIDGE)


def measure(p: float, mask_seed: int, base: nn.Linear, train: Sequence[Example], lam: float,
            num_removals: int | None) -> dict[str, float]:
    """Leave-one-out stability and both bounds for one random mask of density p."""
    mask = select(base, "random", p, seed=mask_seed)

    def train_fn(examples: Sequence[Example], mask: Mask) -> nn.Module:
        xs = torch.stack([e[0] for e in examples])
        ys = torch.stack([e[1] for e in examples])
        return _fit(base, xs, ys, mask, RIDGE)

    estimate = empirical_stability(train_fn, train, mask, loss_fn=example_loss,
                                   num_removals=num_removals, seed=mask_seed)
    tuned = train_fn(train, mask)
    all_data = [(torch.stack([e[0] for e in train]), torch.stack([e[1] for e in train]))]
    masked = estimate_constants(tuned, batch_loss, all_data, mask)
    full = estimate_constants(tuned, batch_loss, all_data, None)
    n = len(train)
    return {
        "measured": estimate.mean,
        "measured_stderr": estimate.stderr,
        "rho_masked": masked.rho,
        "lambda_min_masked": masked.lambda_min,
        "bound_masked": float(stability_bound(masked.rho, masked.lambda_min + RIDGE, p, n,
                                              lam=0.0)),
        "rho_full": full.rho,
        "lambda_min_full": full.lambda_min,
        "bound_paper": float(stability_bound(full.rho, full.lambda_min + RIDGE, p, n, lam=lam)),
        "selected": mask.num_selected,
    }


def run(n: int, densities: Sequence[float], masks_per_p: int, lam: float,
        num_removals: int | None, seed: int = 0) -> list[dict[str, object]]:
    x, y = load_data(seed)
    base = pretrained(x[:PRETRAIN], y[:PRETRAIN])
    train = [(x[i], y[i]) for i in range(PRETRAIN, PRETRAIN + n)]
    rows = []
    for p in densities:
        draws = [measure(p, seed * 1000 + s, base, train, lam, num_removals)
                 for s in range(masks_per_p)]
        row: dict[str, object] = {"p": p, "n": n, "masks": masks_per_p}
        for key in draws[0]:
            row[key] = statistics.fmean(float(d[key]) for d in draws)
        se = [float(d["measured_stderr"]) for d in draws]
        row["measured_stderr"] = float(np.sqrt(np.sum(np.square(se)))) / masks_per_p
        row["under_masked_bound"] = all(
            float(d["measured"]) <= float(d["bound_masked"]) for d in draws)
        row["under_paper_bound"] = all(
            float(d["measured"]) <= float(d["bound_paper"]) for d in draws)
        rows.append(row)
    for i, row in enumerate(rows):
        # as p falls (from row i to row i - 1) the measured value must not rise by more than
        # two standard errors of the difference: noise is not a violation, a real rise is
        if i == 0:
            row["falls_with_p"] = True
            continue
        prev = rows[i - 1]
        noise = 2 * float(np.hypot(row["measured_stderr"], prev["measured_stderr"]))
        row["falls_with_p"] = float(prev["measured"]) <= float(row["measured"]) + noise
    return rows


def trend(rows: list[dict[str, object]]) -> tuple[float, float]:
    """(measured at the largest p - measured at the smallest p, two standard errors of it)."""
    first, last = rows[0], rows[-1]
    diff = float(last["measured"]) - float(first["measured"])
    return diff, 2 * float(np.hypot(first["measured_stderr"], last["measured_stderr"]))


def plot(rows: list[dict[str, object]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    p = [float(r["p"]) for r in rows]
    ax.errorbar(p, [float(r["measured"]) for r in rows],
                yerr=[2 * float(r["measured_stderr"]) for r in rows], fmt="o-", capsize=3,
                label="measured (leave-one-out, +- 2 s.e.)")
    ax.plot(p, [float(r["bound_masked"]) for r in rows], "s--",
            label="E3, masked reading (H_MM + mu, lam = 0)")
    ax.plot(p, [float(r["bound_paper"]) for r in rows], "^:",
            label="E3, paper's reading (H + mu, 2 lam (1-p))")
    ax.set(xscale="log", yscale="log", xlabel="density p",
           ylabel="E |l(A(S\\i), z_i) - l(A(S), z_i)|",
           title=f"E3: stability of sparse fine-tuning (breast_cancer, n = {rows[0]['n']})")
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=80, help="fine-tuning examples")
    parser.add_argument("--masks", type=int, default=4, help="random masks per density")
    parser.add_argument("--lam", type=float, default=1.0, help="lam of the paper's reading")
    parser.add_argument("--removals", type=int, default=None,
                        help="examples left out per mask (default: all n)")
    parser.add_argument("--quick", action="store_true",
                        help="n = 60, 3 masks per density, p in {0.1, 0.5, 1}")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    densities = DENSITIES
    if args.quick:
        args.n, args.masks, densities = 60, 3, (0.1, 0.5, 1.0)
    rows = run(args.n, densities, args.masks, args.lam, args.removals)
    print(f"E3 (stability): logistic regression on breast_cancer, fine-tuned on n = {args.n} "
          f"examples from a pretrained start, {args.masks} random masks per p, ridge mu = "
          f"{RIDGE:g}")
    print(table(
        ["p", "k", "measured", "+- s.e.", "rho_M", "Lmin_M", "bound masked", "under",
         "rho", "Lmin", f"bound paper lam={args.lam:g}", "under", "no rise as p falls"],
        [[r["p"], r["selected"], r["measured"], r["measured_stderr"], r["rho_masked"],
          r["lambda_min_masked"], r["bound_masked"], r["under_masked_bound"], r["rho_full"],
          r["lambda_min_full"], r["bound_paper"], r["under_paper_bound"], r["falls_with_p"]]
         for r in rows]))
    problems = []
    diff, noise = trend(rows)
    print(f"measured at p = {rows[-1]['p']:g} minus at p = {rows[0]['p']:g}: {diff:.4g} "
          f"(two standard errors: {noise:.2g})")
    if not diff > noise:
        problems.append(f"the measured stability at p = {rows[0]['p']:g} is not significantly "
                        f"below that at p = {rows[-1]['p']:g}")
    if not all(r["falls_with_p"] for r in rows):
        problems.append("the measured stability rises as p falls (beyond 2 s.e.) at p = " +
                        ", ".join(f"{r['p']:g}" for r in rows if not r["falls_with_p"]))
    if not all(r["under_masked_bound"] for r in rows):
        problems.append("the measured stability exceeds the masked-reading bound at p = " +
                        ", ".join(f"{r['p']:g}" for r in rows if not r["under_masked_bound"]))
    if not all(r["under_paper_bound"] for r in rows):
        problems.append("the measured stability exceeds the paper-reading bound at p = " +
                        ", ".join(f"{r['p']:g}" for r in rows if not r["under_paper_bound"]))
    print("E3 holds: the measured stability falls with p and stays under both bounds"
          if not problems else "where E3 does not hold: " + "; ".join(problems))
    name = "stability" + ("-quick" if args.quick else "")
    payload = {"check": "E3 stability", "n": args.n, "masks": args.masks, "lam": args.lam,
               "ridge": RIDGE, "rows": rows, "trend": diff, "trend_noise": noise,
               "problems": problems, "holds": not problems}
    write_json(args.output_dir / f"{name}.json", payload)
    plot(rows, args.output_dir / f"{name}.png")
    return payload


if __name__ == "__main__":
    main()
