"""Bounds (theory/ E2-E4): hand-computed values, monotonicity, the non-PSD case, and constants
measured on tiny models against dense float64 references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sparsetune import InvalidArgumentError, Mask, bounds
from sparsetune.bounds import (
    Constants,
    diagnose,
    estimate_constants,
    generalization_bound,
    sparsity_penalty,
    stability_bound,
)

finite = st.floats(min_value=-50, max_value=50, allow_nan=False)
positive = st.floats(min_value=1e-3, max_value=50)
density = st.floats(min_value=1e-4, max_value=1.0)
count = st.integers(min_value=1, max_value=10**6)
lam = st.floats(min_value=0.0, max_value=10.0)


# -- pure functions ------------------------------------------------------------------------------
def test_hand_computed_values():
    # 2 * 2^2 / ((0.5 + 2 * 2 * 0.25) * 10) = 8 / 15
    assert stability_bound(2.0, 0.5, 0.75, 10, lam=2.0) == pytest.approx(8 / 15, rel=1e-15)
    # curvature 0.5 + 2 * 1 * 0.5 = 1.5; (4 + 24 * 2 * 1 / 1.5) / (2 * 20 * 0.1) = 36 / 4 = 9
    assert generalization_bound(2.0, 1.0, 0.5, 0.5, 20, 0.1) == pytest.approx(3.0, rel=1e-15)
    assert sparsity_penalty(4.0, 0.25, lam=0.5) == pytest.approx(1.5, rel=1e-15)
    assert bounds.effective_curvature(-1.0, 0.5, 3.0) == pytest.approx(2.0)
    # p = 1: no regularisation left, Lambda_min alone
    assert stability_bound(1.0, 4.0, 1.0, 2) == pytest.approx(0.25)


def test_non_psd_is_infinite_never_negative_or_nan():
    assert stability_bound(1.0, -3.0, 0.5, 10) == math.inf
    assert generalization_bound(1.0, 1.0, -3.0, 0.5, 10, 0.05) == math.inf
    # exactly zero curvature is not a bound either
    assert stability_bound(1.0, -1.0, 0.5, 10) == math.inf
    out = stability_bound(1.0, -1.0, np.array([0.1, 0.5, 0.9]), 10)
    assert out[0] > 0 and np.isfinite(out[0]) and np.isinf(out[1:]).all()


@given(rho=positive, lmin=finite, p=density, n=count, lam=lam, C=positive,
       delta=st.floats(min_value=1e-3, max_value=0.999))
def test_bounds_are_positive_or_infinite(rho, lmin, p, n, lam, C, delta):
    s = stability_bound(rho, lmin, p, n, lam)
    g = generalization_bound(C, rho, lmin, p, n, delta, lam)
    for value in (s, g):
        assert not math.isnan(value) and value > 0
    assert math.isinf(s) == (lmin + 2 * lam * (1 - p) <= 0) == math.isinf(g)


@given(rho=positive, lmin=finite, p=density, q=density, n=count, lam=lam)
def test_monotone_in_p(rho, lmin, p, q, n, lam):
    lo, hi = sorted((p, q))
    assert stability_bound(rho, lmin, lo, n, lam) <= stability_bound(rho, lmin, hi, n, lam)
    assert (generalization_bound(1.0, rho, lmin, lo, n, 0.1, lam)
            <= generalization_bound(1.0, rho, lmin, hi, n, 0.1, lam))


@given(rho=positive, lmin=finite, p=density, n=count, m=count, lam=lam)
def test_monotone_in_n(rho, lmin, p, n, m, lam):
    small, large = sorted((n, m))
    assert stability_bound(rho, lmin, p, large, lam) <= stability_bound(rho, lmin, p, small, lam)
    assert (generalization_bound(1.0, rho, lmin, p, large, 0.1, lam)
            <= generalization_bound(1.0, rho, lmin, p, small, 0.1, lam))


@given(rho=positive, a=finite, b=finite, p=density, n=count, lam=lam)
def test_monotone_in_lambda_min(rho, a, b, p, n, lam):
    lo, hi = sorted((a, b))
    assert stability_bound(rho, hi, p, n, lam) <= stability_bound(rho, lo, p, n, lam)
    assert (generalization_bound(1.0, rho, hi, p, n, 0.1, lam)
            <= generalization_bound(1.0, rho, lo, p, n, 0.1, lam))


def test_vectorised_over_p_matches_scalar_calls():
    grid = np.geomspace(1e-3, 1, 9)
    vector = stability_bound(1.3, -0.4, grid, 50, lam=0.7)
    assert isinstance(vector, np.ndarray) and vector.shape == grid.shape
    np.testing.assert_array_equal(vector, [stability_bound(1.3, -0.4, p, 50, lam=0.7)
                                           for p in grid])
    gap = generalization_bound(2.0, 1.3, -0.4, grid, 50, 0.05, lam=0.7)
    np.testing.assert_array_equal(gap, [generalization_bound(2.0, 1.3, -0.4, p, 50, 0.05, 0.7)
                                        for p in grid])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"p": 0.0}, "p"), ({"p": 1.5}, "p"), ({"n": 0}, "n"), ({"n": 2.5}, "n"),
        ({"rho": -1.0}, "rho"), ({"lam": -0.1}, "lam"), ({"lambda_min": float("nan")},
                                                         "lambda_min"),
        ({"p": "dense"}, "p"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs, name):
    args = {"rho": 1.0, "lambda_min": 0.1, "p": 0.5, "n": 10, "lam": 1.0} | kwargs
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b"):
        stability_bound(**args)


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.5])
def test_generalization_delta_must_be_a_probability(delta):
    with pytest.raises(InvalidArgumentError, match="delta"):
        generalization_bound(1.0, 1.0, 0.1, 0.5, 10, delta)


# -- constants on a model, against dense references ----------------------------------------------
def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _ce_sum(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def _problem(make_mlp, make_mask, sizes=(5, 3, 6)):
    model = make_mlp(seed=1)
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(s, 4, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (s,), generator=gen)) for s in sizes]
    mask = make_mask(model, density=0.4, seed=2)
    return model, data, mask


def _reference(model, data, mask):
    """rho, C, risk and the eigenvalues of H_MM by brute force: autograd per example and
    torch.func.hessian of the mean loss over all examples."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    xs = torch.cat([x for x, _ in data])
    ys = torch.cat([y for _, y in data])
    norms, losses = [], []
    for i in range(len(ys)):
        def loss_i(p, i=i):
            out = torch.func.functional_call(model, p, (xs[i : i + 1],))
            return F.cross_entropy(out, ys[i : i + 1])

        g = torch.func.grad(loss_i)(params)
        norms.append(math.sqrt(sum(float((g[n] * mask[n]).square().sum()) for n in names)))
        losses.append(float(loss_i(params)))
    flat = torch.cat([params[n].reshape(-1) for n in names])
    shapes = [params[n].shape for n in names]

    def risk(v):
        p, start = {}, 0
        for n, s in zip(names, shapes):
            p[n] = v[start : start + s.numel()].reshape(s)
            start += s.numel()
        return F.cross_entropy(torch.func.functional_call(model, p, (xs,)), ys)

    H = torch.func.hessian(risk)(flat)
    sel = torch.cat([mask[n].reshape(-1) for n in names])
    eig = torch.linalg.eigvalsh(H[sel][:, sel])
    return max(norms), max(losses), sum(losses) / len(losses), float(eig[0]), float(eig[-1])


def test_constants_match_brute_force(make_mlp, make_mask):
    model, data, mask = _problem(make_mlp, make_mask)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    c = estimate_constants(model, _ce, data, mask)
    rho, C, risk, lo, hi = _reference(model, data, mask)
    assert c.rho == pytest.approx(rho, rel=1e-10)
    assert c.loss_max == pytest.approx(C, rel=1e-12)
    assert c.empirical_risk == pytest.approx(risk, rel=1e-12)
    assert c.lambda_min == pytest.approx(lo, rel=1e-9, abs=1e-12)
    assert c.lambda_max == pytest.approx(hi, rel=1e-9)
    assert c.num_examples == 14 and c.num_coordinates == mask.num_trainable
    assert c.density == mask.density
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_lanczos_path_agrees_with_dense_path(make_mlp, make_mask, monkeypatch):
    model, data, mask = _problem(make_mlp, make_mask)
    dense = estimate_constants(model, _ce, data, mask)
    monkeypatch.setattr(bounds.constants, "DENSE_MAX_COORDINATES", 0)
    lanczos = estimate_constants(model, _ce, data, mask)
    assert lanczos.lambda_min == pytest.approx(dense.lambda_min, rel=1e-6, abs=1e-9)
    assert lanczos.lambda_max == pytest.approx(dense.lambda_max, rel=1e-6)
    assert lanczos.lanczos_tol > 0 and "Lanczos" in lanczos.methods["lambda"]


def test_sum_and_mean_losses_give_the_same_constants(make_mlp, make_mask):
    model, data, mask = _problem(make_mlp, make_mask)
    mean = estimate_constants(model, _ce, data, mask)
    total = estimate_constants(model, _ce_sum, data, mask)
    for field in ("rho", "loss_max", "empirical_risk", "lambda_min", "lambda_max"):
        assert getattr(total, field) == pytest.approx(getattr(mean, field), rel=1e-9, abs=1e-12)


def test_loss_that_is_not_per_example_is_refused(make_mlp, make_mask):
    model, data, mask = _problem(make_mlp, make_mask)

    def squared_mean(model, batch):  # (mean loss)^2 is not a mean or sum of example losses
        return _ce(model, batch) ** 2

    with pytest.raises(InvalidArgumentError, match="neither the mean"):
        estimate_constants(model, squared_mean, data, mask)


def test_batches_without_a_common_example_dim_are_refused(make_mlp):
    model = make_mlp()
    data = [(torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (2,)))]
    with pytest.raises(InvalidArgumentError, match="dim 0"):
        estimate_constants(model, _ce, data)


# -- the report ------------------------------------------------------------------------------------
def _constants(lambda_min: float, density: float = 0.01) -> Constants:
    return Constants(rho=2.0, rho_median=1.0, loss_max=3.0, empirical_risk=0.5,
                     lambda_min=lambda_min, lambda_max=10.0, lambda_error=0.0, lanczos_tol=0.0,
                     num_examples=32, num_coordinates=1000, density=density,
                     methods={"rho": "test"})


def test_report_values_and_json():
    report = diagnose(None, None, None, constants=_constants(0.1), n=500, lam=0.5, delta=0.1)
    assert report.applies and report.p == 0.01
    assert report.stability_at_p == pytest.approx(stability_bound(2.0, 0.1, 0.01, 500, 0.5))
    assert report.generalization_at_p == pytest.approx(
        generalization_bound(3.0, 2.0, 0.1, 0.01, 500, 0.1, 0.5))
    assert report.p_threshold is None
    assert 0.01 in report.p_grid.tolist()
    data = json.loads(report.to_json())
    assert data["applies"] is True and data["n"] == 500 and len(data["stability"]) == len(
        report.p_grid)
    text = str(report)
    assert "<- this mask" in text and "0.01" in text and "lam" in text


def test_non_psd_report_is_plain():
    report = diagnose(None, None, None, constants=_constants(-1.5, density=0.5), n=100)
    # Lambda_min + 2 (1 - 0.5) = -0.5 <= 0
    assert not report.applies
    assert report.stability_at_p is None and report.generalization_at_p is None
    assert report.p_threshold == pytest.approx(0.25)
    assert "no bound at p = 0.5" in report.reason and "-0.5" in report.reason
    data = json.loads(report.to_json())  # strict JSON: no Infinity, no NaN
    assert data["stability_at_p"] is None
    low = [s for p, s in zip(data["p_grid"], data["stability"]) if p < 0.25]
    high = [s for p, s in zip(data["p_grid"], data["stability"]) if p >= 0.25]
    assert all(s is not None and s > 0 for s in low) and all(s is None for s in high)
    assert "no bound" in str(report)


def test_plot_and_json_are_written_atomically(tmp_path):
    report = diagnose(None, None, None, constants=_constants(-1.5, density=0.5), n=100)
    png = report.plot(tmp_path / "sub" / "bounds.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = report.write_json(tmp_path / "bounds.json")
    assert json.loads(out.read_text())["applies"] is False
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bounds.json", "bounds.png", "sub"]


def test_diagnose_on_a_model(make_mlp, make_mask):
    model, data, mask = _problem(make_mlp, make_mask)
    report = diagnose(model, _ce, data, mask, n=1000, p_grid=[0.01, 0.1, 1.0])
    c = report.constants
    assert report.n == 1000 and report.p == mask.density
    assert report.p_grid.tolist() == sorted({0.01, 0.1, 1.0, mask.density})
    expected = stability_bound(c.rho, c.lambda_min, report.p_grid, 1000, 1.0)
    np.testing.assert_array_equal(report.stability, expected)


def test_diagnose_validates_its_settings():
    with pytest.raises(InvalidArgumentError, match="n must"):
        diagnose(None, None, None, constants=_constants(0.1), n=0)
    with pytest.raises(InvalidArgumentError, match="only apply"):
        diagnose(None, None, None, constants=_constants(0.1), tol=1e-3)
    with pytest.raises(InvalidArgumentError, match="p_grid"):
        diagnose(None, None, None, constants=_constants(0.1), p_grid=[0.5, 2.0])


def test_full_mask_density_is_one(make_mlp):
    model = make_mlp()
    data = [(torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)))]
    c = estimate_constants(model, _ce, data, Mask.full(model))
    assert c.density == 1.0 and c.num_coordinates == sum(p.numel() for p in model.parameters())


# -- the command line, on the embedded real model -------------------------------------------------
def test_cli_bound_on_the_embedded_model(tmp_path, capsys):
    from sparsetune import data
    from sparsetune.cli import main

    model, _ = data.load_model(2)
    keep = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    keep["classifier.bias"][:] = True
    keep["classifier.weight"][:, :3] = True
    keep["bert.encoder.layer.5.output.dense.bias"][:2] = True
    mask_path = Mask.from_dict(keep).save(tmp_path / "mask.safetensors")
    code = main(["bound", "--data", "rotten_tomatoes", "--mask", str(mask_path),
                 "--num-examples", "3", "--max-length", "16", "--batch-size", "2",
                 "--no-progress", "--json", str(tmp_path / "b.json"),
                 "--plot", str(tmp_path / "b.png")])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "b.json").read_text())
    c = report["constants"]
    assert c["num_coordinates"] == 10 and c["num_examples"] == 3
    assert all(math.isfinite(c[k]) for k in ("rho", "lambda_min", "lambda_max", "loss_max"))
    assert c["rho"] > 0 and c["lambda_max"] >= c["lambda_min"]
    # finite bounds, or the plain non-PSD report: never a negative or NaN number
    if report["applies"]:
        assert report["stability_at_p"] > 0 and report["generalization_at_p"] > 0
    else:
        assert report["stability_at_p"] is None and "no bound" in out
    assert "stability E3" in out and "<- this mask" in out
    assert (tmp_path / "b.png").exists()


def test_cli_bound_reports_bad_data_in_one_line(tmp_path, capsys):
    from sparsetune.cli import main

    code = main(["bound", "--data", "csv:" + str(tmp_path / "absent.csv"), "--mask",
                 str(tmp_path / "m.safetensors")])
    assert code == 2
    err = capsys.readouterr().err
    assert "absent.csv" in err and len(err.strip().splitlines()) == 1
    assert main(["bound", "--data", "imdb", "--mask", "m.safetensors"]) == 2
    assert "csv:FILE or one of" in capsys.readouterr().err


@pytest.mark.slow
def test_diagnose_on_the_embedded_model_at_p_0005():
    """The demo's set-up: a random mask at p = 0.5% with the head (about 115k entries: Lanczos)."""
    from sparsetune import data, select

    task = data.load_task("rotten_tomatoes", max_examples=400)
    model, tokenizer = data.load_model(2)
    mask = select(model, "random", 0.005, always_train=data.HEAD_PARAMETERS)
    sample = data.Split(task.train.texts[:8], task.train.labels[:8])
    report = diagnose(model, None, data.batches(sample, tokenizer, batch_size=8), mask,
                      n=len(task.train), tol=1e-2, progress=False)
    c = report.constants
    assert c.num_coordinates == mask.num_trainable > 256 and c.lanczos_tol == 1e-2
    assert all(math.isfinite(v) for v in (c.rho, c.lambda_min, c.lambda_max, c.loss_max))
    assert c.lambda_min <= c.lambda_max
    if report.applies:
        assert report.stability_at_p > 0
    else:
        assert report.stability_at_p is None and "no bound" in str(report)


def test_a_verdict_within_the_eigenvalue_uncertainty_is_flagged():
    c = _constants(-1.99)
    c = Constants(**{**c.to_dict(), "lambda_error": 0.05})
    report = diagnose(None, None, None, constants=c, n=100)  # curvature -1.99 + 1.98 = -0.01
    assert not report.applies and "not settled" in report.reason
    sure = diagnose(None, None, None, constants=_constants(-1.99), n=100)
    assert "not settled" not in sure.reason


def test_docstring_examples():
    import doctest

    for module in (bounds, bounds.formulas, bounds.constants, bounds.report):
        assert doctest.testmod(module, raise_on_error=False).failed == 0


def test_report_says_no_bound_at_any_density_when_lambda_min_is_below_minus_two_lam():
    # p* = 1 + Lambda_min / (2 lam) = 1 - 27.8 / 2 < 0: no density gives a PSD regularised Hessian
    report = diagnose(None, None, None, constants=_constants(-27.8, density=0.005), n=100)
    text = str(report)
    assert "no bound at any p in (0, 1]" in text and "no bound for p >=" not in text
    assert not report.applies and report.stability_at_p is None
    assert np.isinf(report.stability).all() and np.isinf(report.generalization).all()
