"""sparsetune.curvature against dense float64 references (torch.func.hessian, J^T H_out J,
brute-force per-example loops, numpy eigvalsh) on a small MLP and a tiny BERT built in code.

Stochastic estimators get convergence tests (error at S and 16 S probes), not loose tolerances.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch import nn

import sparsetune as st
from sparsetune import Mask, curvature
from sparsetune.curvature import OutputLoss


@pytest.fixture(autouse=True)
def _own_rng():
    """Tests here seed and draw from torch's global RNG; others see it as it was."""
    with torch.random.fork_rng(devices=[]):
        yield


# -- models, data, losses ----------------------------------------------------------------------


def _mlp(seed=0, dropout=0.0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(4, 5), nn.Dropout(dropout), nn.Tanh(), nn.Linear(5, 3)
        ).double()


def _class_data(n_batches=3, batch=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 4, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (batch,), generator=gen))
        for _ in range(n_batches)
    ]


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _first(model, batch):
    return model(batch[0])


def _second(batch):
    return batch[1]


CE_SPEC = OutputLoss(_first, _second, loss="cross_entropy")
CE_SUM_SPEC = OutputLoss(_first, _second, loss="cross_entropy", reduction="sum")
MSE_SPEC = OutputLoss(_first, _second, loss="mse")
MSE_SUM_SPEC = OutputLoss(_first, _second, loss="mse", reduction="sum")

TINY_BERT_PARAMS = [
    "bert.embeddings.LayerNorm.weight",
    "bert.encoder.layer.0.attention.self.query.bias",
    "bert.encoder.layer.0.output.LayerNorm.bias",
    "classifier.weight",
]


def _tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForSequenceClassification(config).double()


def _bert_data(n_batches=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[1, 5:] = 0  # one padded example: attention masking is exercised
        out.append({
            "input_ids": torch.randint(0, 50, (3, 7), generator=gen),
            "attention_mask": mask,
            "labels": torch.randint(0, 2, (3,), generator=gen),
        })
    return out


def _hf_loss(model, batch):
    return model(**batch).loss


@functools.cache
def _tiny_bert_hessian():
    """Dense Hessian of the tiny BERT's loss over TINY_BERT_PARAMS (computed once)."""
    h, params = _dense_hessian(_tiny_bert(), _hf_loss, _bert_data(), TINY_BERT_PARAMS)
    return h, params


# -- dense references --------------------------------------------------------------------------


def _params(model, names=None):
    return {n: p.detach() for n, p in model.named_parameters() if names is None or n in names}


def _dense_hessian(model, loss_fn, data, names=None):
    """Dense Hessian of sum_b loss_fn over the named parameters (flattened, model order)."""
    params = _params(model, names)
    model.eval()

    def total(p):
        return sum(
            torch.func.functional_call(_Call(model, loss_fn), {f"m.{k}": v for k, v in p.items()},
                                       (b,))
            for b in data
        )

    with torch.no_grad():
        blocks = torch.func.hessian(total)(params)
    keys = list(params)
    sizes = [params[k].numel() for k in keys]
    return torch.cat([
        torch.cat([blocks[a][b].reshape(sa, sb) for b, sb in zip(keys, sizes)], 1)
        for a, sa in zip(keys, sizes)
    ], 0), params


class _Call(nn.Module):
    def __init__(self, model, fn):
        super().__init__()
        self.m, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.m, batch)


def _unflatten(flat, params):
    out, start = {}, 0
    for k, p in params.items():
        out[k] = flat[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def _reference_diagonal(model, loss_fn, data, names=None):
    h, params = _dense_hessian(model, loss_fn, data, names)
    return _unflatten(torch.diagonal(h), params)


def _dense_ggn(model, spec, data, names=None):
    """sum_b J_b^T H_out,b J_b with J the Jacobian of all outputs of the batch (dense)."""
    params = _params(model, names)
    model.eval()
    total = 0
    for b in data:
        def outputs(p, b=b):
            call = _Call(model, spec.forward_fn)
            return torch.func.functional_call(call, {f"m.{k}": v for k, v in p.items()}, (b,))

        with torch.no_grad():
            out = outputs(params)
            jac = torch.func.jacrev(outputs)(params)
            j = torch.cat([jac[k].reshape(out.numel(), -1) for k in params], 1)
            targets = spec.targets_fn(b)

            def batch_loss(o, targets=targets, shape=out.shape):
                o = o.reshape(shape)
                if spec.loss == "mse":
                    return F.mse_loss(o, targets, reduction=spec.reduction)
                return F.cross_entropy(o.reshape(-1, shape[-1]), targets.reshape(-1),
                                       reduction=spec.reduction)

            h_out = torch.func.hessian(batch_loss)(out.reshape(-1))
        total = total + j.T @ h_out @ j
    return _unflatten(torch.diagonal(total), params)


def _brute_empirical_fisher(model, spec, data, names=None):
    """sum_b w_b sum_i (grad of the loss of example i alone)^2, one example at a time."""
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    out = {n: torch.zeros_like(p) for n, p in named}
    single = OutputLoss(spec.forward_fn, spec.targets_fn, spec.loss, "sum")
    for b in data:
        x, y = b
        counted = y.numel() if spec.loss == "mse" else int((y != -100).sum())
        w = 1.0 if spec.reduction == "sum" else 1.0 / counted
        for i in range(x.shape[0]):
            loss = single(model, (x[i : i + 1], y[i : i + 1]))
            grads = torch.autograd.grad(loss, [p for _, p in named])
            for (n, _), g in zip(named, grads):
                out[n] += w * g.square()
    return out


def _assert_close_dicts(got, want, atol, rtol=0.0):
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k].to(got[k].dtype), atol=atol, rtol=rtol,
                                   msg=lambda m, k=k: f"{k}: {m}")


def _rms_error(est, ref):
    num = sum(float((est[k] - ref[k]).square().sum()) for k in ref)
    return math.sqrt(num)


# -- exact -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scalar", [False, True])
def test_exact_equals_diagonal_of_torch_func_hessian_mlp(make_mlp, make_batches, scalar):
    model = make_mlp(seed=2, scalar=scalar)
    data = make_batches(3)

    def mse(m, b):
        return (m(b[0]) - b[1]).square().mean()

    got = curvature.hessian_diagonal(model, mse, data, "exact", progress=False)
    _assert_close_dicts(got, _reference_diagonal(model, mse, data), atol=1e-10)


def test_exact_equals_dense_hessian_on_tiny_bert_restricted():
    model, data = _tiny_bert(), _bert_data()
    got = curvature.hessian_diagonal(model, _hf_loss, data, "exact", params=TINY_BERT_PARAMS,
                                     chunk_size=7, progress=False)
    assert list(got) == TINY_BERT_PARAMS
    h, params = _tiny_bert_hessian()
    _assert_close_dicts(got, _unflatten(torch.diagonal(h), params), atol=1e-10)


def test_exact_with_a_mask_computes_only_selected_entries(make_mask):
    model, data = _mlp(), _class_data()
    mask = make_mask(model, density=0.4, seed=3, frozen=["0.bias"])
    got = curvature.hessian_diagonal(model, _ce, data, "exact", params=mask, progress=False)
    ref = _reference_diagonal(model, _ce, data)
    assert "0.bias" not in got
    for k, h in got.items():
        m = mask[k]
        torch.testing.assert_close(h[m], ref[k][m], atol=1e-10, rtol=0)
        assert torch.all(h[~m] == 0)


def test_exact_refuses_more_than_its_documented_size():
    big = nn.Linear(200, 100).double()  # 20,100 coordinates > EXACT_MAX_COORDINATES
    assert sum(p.numel() for p in big.parameters()) > curvature.EXACT_MAX_COORDINATES
    data = [torch.randn(2, 200, dtype=torch.float64)]
    with pytest.raises(st.InvalidArgumentError, match="EXACT_MAX_COORDINATES"):
        curvature.hessian_diagonal(big, lambda m, x: m(x).sum(), data, "exact", progress=False)
    # restricting params makes exact entries of the same model affordable
    got = curvature.hessian_diagonal(big, lambda m, x: m(x).square().sum(), data, "exact",
                                     params=["bias"], progress=False)
    torch.testing.assert_close(got["bias"], torch.full((100,), 4.0, dtype=torch.float64))


@settings(max_examples=10)
@given(split=hs.integers(1, 4), seed=hs.integers(0, 3))
def test_diagonal_is_of_the_sum_over_batches(split, seed):
    model, data = _mlp(seed), _class_data(5, seed=seed)
    whole = curvature.hessian_diagonal(model, _ce, data, "exact", progress=False)
    a = curvature.hessian_diagonal(model, _ce, data[:split], "exact", progress=False)
    b = curvature.hessian_diagonal(model, _ce, iter(data[split:]), "exact", progress=False)
    _assert_close_dicts(whole, {k: a[k] + b[k] for k in a}, atol=1e-12)


# -- GGN, Fisher, empirical Fisher -------------------------------------------------------------


def test_ggn_equals_the_hessian_for_a_linear_model_with_mse():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    data = [(torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))
            for _ in range(2)]
    for spec in (MSE_SPEC, MSE_SUM_SPEC):
        ggn = curvature.hessian_diagonal(model, spec, data, "ggn", progress=False)
        exact = curvature.hessian_diagonal(model, spec, data, "exact", progress=False)
        _assert_close_dicts(ggn, exact, atol=1e-12)
        _assert_close_dicts(exact, _reference_diagonal(model, spec, data), atol=1e-10)


@pytest.mark.parametrize("spec", [CE_SPEC, CE_SUM_SPEC, MSE_SPEC], ids=["ce", "ce_sum", "mse"])
def test_ggn_equals_dense_jacobian_reference_mlp(spec):
    model = _mlp()
    data = _class_data()
    if spec.loss == "mse":
        gen = torch.Generator().manual_seed(5)
        data = [(x, torch.randn(x.shape[0], 3, generator=gen, dtype=torch.float64))
                for x, _ in data]
    got = curvature.hessian_diagonal(model, spec, data, "ggn", chunk_size=4, progress=False)
    _assert_close_dicts(got, _dense_ggn(model, spec, data), atol=1e-12)


def test_ggn_per_position_cross_entropy_with_ignored_targets():
    """Outputs (N, T, C), targets (N, T) with -100 ignored: as F.cross_entropy sees them."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(2)
    data = []
    for _ in range(2):
        y = torch.randint(0, 3, (4, 5), generator=gen)
        y[0, 1] = y[2, 4] = -100
        data.append((torch.randn(4, 5, 4, generator=gen, dtype=torch.float64), y))
    got = curvature.hessian_diagonal(model, CE_SPEC, data, "ggn", progress=False)
    _assert_close_dicts(got, _dense_ggn(model, CE_SPEC, data), atol=1e-12)
    ef = curvature.hessian_diagonal(model, CE_SPEC, data, "empirical_fisher", progress=False)
    _assert_close_dicts(ef, _brute_empirical_fisher(model, CE_SPEC, data), atol=1e-12)


def test_ggn_on_tiny_bert_matches_dense_reference_through_the_example_loop():
    """transformers' mask code branches on input values: vmap over examples falls back to a
    loop over examples, with the same result as the dense reference."""
    model, data = _tiny_bert(), _bert_data()
    spec = OutputLoss.transformers()
    torch.testing.assert_close(spec(model.eval(), data[0]), _hf_loss(model, data[0]))
    got = curvature.hessian_diagonal(model, spec, data, "ggn", params=TINY_BERT_PARAMS,
                                     progress=False)
    _assert_close_dicts(got, _dense_ggn(model, spec, data, TINY_BERT_PARAMS), atol=1e-12)


@pytest.mark.parametrize("spec", [CE_SPEC, CE_SUM_SPEC, MSE_SPEC], ids=["ce", "ce_sum", "mse"])
def test_empirical_fisher_equals_brute_force_loop(spec):
    model, data = _mlp(), _class_data()
    if spec.loss == "mse":
        gen = torch.Generator().manual_seed(5)
        data = [(x, torch.randn(x.shape[0], 3, generator=gen, dtype=torch.float64))
                for x, _ in data]
    got = curvature.hessian_diagonal(model, spec, data, "empirical_fisher", chunk_size=4,
                                     progress=False)
    _assert_close_dicts(got, _brute_empirical_fisher(model, spec, data), atol=1e-14)


def test_empirical_fisher_on_tiny_bert_equals_per_example_loop():
    model, data = _tiny_bert(), _bert_data()
    spec = OutputLoss.transformers()
    got = curvature.hessian_diagonal(model, spec, data, "empirical_fisher",
                                     params=TINY_BERT_PARAMS, progress=False)
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if n in TINY_BERT_PARAMS]
    want = {n: torch.zeros_like(p) for n, p in named}
    for b in data:
        for i in range(3):
            one = {k: v[i : i + 1] for k, v in b.items()}
            grads = torch.autograd.grad(_hf_loss(model, one), [p for _, p in named])
            for (n, _), g in zip(named, grads):
                want[n] += g.square() / 3
    _assert_close_dicts(got, want, atol=1e-14)


def test_ggn_mc_is_unbiased_and_converges_to_the_ggn():
    """The sampled-label (Fisher) estimate: the mean over 128 seeds is within a few standard
    errors of the GGN, and its RMS error falls like 1/sqrt(S) (ratio 4 from S = 2 to 32; with
    3 classes each sample takes one of 3 values, so it takes many seeds to see the law)."""
    model, data = _mlp(), _class_data(2)
    exact = curvature.hessian_diagonal(model, CE_SPEC, data, "ggn", progress=False)
    ref = torch.cat([exact[k].reshape(-1) for k in exact])
    errors = {}
    for s in (2, 32):
        runs = torch.stack([
            torch.cat([t.reshape(-1) for t in curvature.hessian_diagonal(
                model, CE_SPEC, data, "ggn_mc", num_samples=s, seed=1000 * s + k,
                chunk_size=16, progress=False).values()])
            for k in range(128)
        ])
        z = (runs.mean(0) - ref) / (runs.std(0) / math.sqrt(len(runs)) + 1e-30)
        assert float(z.abs().max()) < 4.5
        errors[s] = math.sqrt(float((runs - ref).square().sum(1).mean()))
    assert 3.6 <= errors[2] / errors[32] <= 4.4


# -- Hutchinson ----------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_error_shrinks_like_one_over_sqrt_samples(distribution):
    """RMS error over 48 seeds at S and 16 S probes: the ratio is sqrt(16) = 4 for an unbiased
    estimator with variance sigma^2 / S (a biased one would level off, ratio -> 1)."""
    model, data = _mlp(), _class_data(2)
    exact = curvature.hessian_diagonal(model, _ce, data, "exact", progress=False)
    errors = {}
    for s in (4, 64):
        sq = [
            _rms_error(curvature.hessian_diagonal(
                model, _ce, data, "hutchinson", num_samples=s, seed=7919 * s + k,
                distribution=distribution, chunk_size=16, progress=False), exact) ** 2
            for k in range(48)
        ]
        errors[s] = math.sqrt(sum(sq) / len(sq))
    assert 3.6 <= errors[4] / errors[64] <= 4.4


def test_hutchinson_mean_over_seeds_is_unbiased_and_stderr_is_calibrated():
    model, data = _mlp(), _class_data(2)
    exact = curvature.hessian_diagonal(model, _ce, data, "exact", progress=False)
    estimates, stderrs = [], []
    for seed in range(40):
        est, se = curvature.hessian_diagonal(model, _ce, data, "hutchinson", num_samples=16,
                                             seed=seed, return_stderr=True, progress=False)
        estimates.append(torch.cat([est[k].reshape(-1) for k in est]))
        stderrs.append(torch.cat([se[k].reshape(-1) for k in se]))
    ref = torch.cat([exact[k].reshape(-1) for k in exact])
    est = torch.stack(estimates)
    spread = est.std(0)
    # unbiased: the mean of 40 runs is within 4 standard errors of the mean, entry by entry
    assert torch.all((est.mean(0) - ref).abs() <= 4 * spread / math.sqrt(40) + 1e-12)
    # calibrated: the reported standard error matches the spread across seeds (overall)
    ratio = float(torch.stack(stderrs).square().mean().sqrt() / spread.square().mean().sqrt())
    assert 0.85 <= ratio <= 1.15


@settings(max_examples=12)
@given(
    num_samples=hs.integers(1, 9),
    chunk=hs.integers(1, 10),
    distribution=hs.sampled_from(["rademacher", "gaussian"]),
)
def test_hutchinson_result_does_not_depend_on_the_chunk_size(num_samples, chunk, distribution):
    model, data = _mlp(), _class_data(2)
    kw = dict(num_samples=num_samples, seed=3, distribution=distribution, progress=False)
    a = curvature.hessian_diagonal(model, _ce, data, "hutchinson", chunk_size=chunk, **kw)
    b = curvature.hessian_diagonal(model, _ce, data, "hutchinson", chunk_size=1, **kw)
    _assert_close_dicts(a, b, atol=1e-12)


class _Separable(nn.Module):
    """loss = sum(a * t^2 + b * t^4): a diagonal Hessian 2a + 12 b t^2."""

    def __init__(self, t, a, b):
        super().__init__()
        self.t = nn.Parameter(t)
        self.register_buffer("a", a)
        self.register_buffer("b", b)

    def forward(self, scale):
        return scale * (self.a * self.t**2 + self.b * self.t**4).sum()


@given(size=hs.integers(1, 12), seed=hs.integers(0, 100))
def test_one_rademacher_probe_is_exact_for_a_diagonal_hessian(size, seed):
    gen = torch.Generator().manual_seed(seed)
    t, a, b = (torch.randn(size, generator=gen, dtype=torch.float64) for _ in range(3))
    model = _Separable(t, a, b)
    got = curvature.hessian_diagonal(model, lambda m, s: m(s), [1.0, 0.5], "hutchinson",
                                     num_samples=1, seed=seed, progress=False)
    torch.testing.assert_close(got["t"], 1.5 * (2 * a + 12 * b * t**2), atol=1e-12, rtol=1e-12)


def test_hutchinson_with_a_mask_probes_only_selected_entries(make_mask):
    """Probes are 0 outside the mask, so off-mask couplings add no noise: on a one-entry mask
    per tensor the estimate is exact."""
    model, data = _mlp(), _class_data(2)
    exact = curvature.hessian_diagonal(model, _ce, data, "exact", progress=False)
    bits = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    bits["3.weight"].view(-1)[4] = True
    got = curvature.hessian_diagonal(model, _ce, data, "hutchinson", params=Mask(bits),
                                     num_samples=3, progress=False)
    assert list(got) == ["3.weight"]
    torch.testing.assert_close(got["3.weight"].view(-1)[4], exact["3.weight"].view(-1)[4],
                               atol=1e-12, rtol=0)
    assert int((got["3.weight"] != 0).sum()) == 1
    # with a denser mask: zero outside, within a few standard errors inside
    mask = make_mask(model, density=0.5, seed=1)
    est, se = curvature.hessian_diagonal(model, _ce, data, "hutchinson", params=mask,
                                         num_samples=256, chunk_size=64, return_stderr=True,
                                         progress=False)
    for k, m in mask.items():
        assert torch.all(est[k][~m] == 0) and torch.all(se[k][~m] == 0)
        assert torch.all((est[k][m] - exact[k][m]).abs() <= 4.5 * se[k][m] + 1e-12)


# -- finite differences --------------------------------------------------------------------------


def test_finite_difference_approaches_hutchinson_with_the_same_probes_as_step_squared():
    model, data = _mlp(), _class_data(2)
    kw = dict(num_samples=6, seed=11, progress=False)
    hutch = curvature.hessian_diagonal(model, _ce, data, "hutchinson", **kw)
    gaps = []
    for step in (1e-2, 1e-3):
        fd = curvature.hessian_diagonal(model, _ce, data, "finite_difference", step=step, **kw)
        gaps.append(_rms_error(fd, hutch))
    assert 70 <= gaps[0] / gaps[1] <= 130  # central differences: error ~ step^2
    default = curvature.hessian_diagonal(model, _ce, data, "finite_difference", **kw)
    assert _rms_error(default, hutch) < 1e-8


# -- eigenvalues ---------------------------------------------------------------------------------


def test_extreme_eigenvalues_equal_eigvalsh_of_the_dense_hessian():
    model, data = _mlp(), _class_data()
    h, _ = _dense_hessian(model, _ce, data)
    want = np.linalg.eigvalsh(h.numpy())
    lo, hi = curvature.extreme_eigenvalues(model, _ce, data, progress=False)
    assert abs(lo - want[0]) <= 1e-6 and abs(hi - want[-1]) <= 1e-6
    assert lo < 0 < hi  # an indefinite Hessian away from a minimum: both ends matter
    lo_only = curvature.extreme_eigenvalues(model, _ce, data, which="min", progress=False)
    hi_only = curvature.extreme_eigenvalues(model, _ce, data, which="max", progress=False)
    assert lo_only[1] is None and abs(lo_only[0] - want[0]) <= 1e-6
    assert hi_only[0] is None and abs(hi_only[1] - want[-1]) <= 1e-6


def test_extreme_eigenvalues_on_the_masked_subspace(make_mask):
    model, data = _mlp(), _class_data()
    mask = make_mask(model, density=0.5, seed=4)
    h, params = _dense_hessian(model, _ce, data)
    sel = torch.cat([mask[k].reshape(-1) for k in params])
    want = np.linalg.eigvalsh(h[sel][:, sel].numpy())
    lo, hi = curvature.extreme_eigenvalues(model, _ce, data, mask=mask, progress=False)
    assert abs(lo - want[0]) <= 1e-6 and abs(hi - want[-1]) <= 1e-6


def test_extreme_eigenvalues_on_tiny_bert_restricted():
    model, data = _tiny_bert(), _bert_data()
    h, _ = _tiny_bert_hessian()
    want = np.linalg.eigvalsh(h.numpy())
    lo, hi = curvature.extreme_eigenvalues(model, _hf_loss, data, mask=TINY_BERT_PARAMS,
                                           progress=False)
    assert abs(lo - want[0]) <= 1e-6 and abs(hi - want[-1]) <= 1e-6


def test_extreme_eigenvalues_of_one_or_two_coordinates():
    model, data = _mlp(), _class_data()
    h, params = _dense_hessian(model, _ce, data)
    sizes = {k: p.numel() for k, p in params.items()}
    offset = sum(sizes[k] for k in list(params)[: list(params).index("3.bias")])
    for count in (1, 2):
        bits = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
        bits["3.bias"][:count] = True
        want = np.linalg.eigvalsh(h[offset : offset + count, offset : offset + count].numpy())
        lo, hi = curvature.extreme_eigenvalues(model, _ce, data, mask=Mask(bits),
                                               progress=False)
        assert abs(lo - want[0]) <= 1e-10 and abs(hi - want[-1]) <= 1e-10


# -- hvp helper, modes, dtypes -------------------------------------------------------------------


def test_hvp_equals_dense_hessian_times_vector():
    model, data = _mlp(), _class_data()
    h, params = _dense_hessian(model, _ce, data)
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
    got = curvature.hvp(model, _ce, data, v)
    want = _unflatten(h @ torch.cat([t.reshape(-1) for t in v.values()]), params)
    _assert_close_dicts(got, want, atol=1e-12)


def test_dual_number_hvp_equals_the_torch_func_transform_on_tiny_bert():
    # Objective.hvp (dual numbers + autograd) is the fast path; jvp(grad) is its twin under vmap.
    from sparsetune.curvature.objective import Objective, evaluating

    model, data = _tiny_bert(), _bert_data()
    objective = Objective(model, _hf_loss, [n for n, _ in model.named_parameters()])
    gen = torch.Generator().manual_seed(1)
    primals = objective.primals
    v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in primals.items()}
    with evaluating(model):
        fast = objective.hvp(data[0], v)
        reference = objective.hvp_transform(data[0], v)
    assert set(fast) == set(reference)
    _assert_close_dicts(fast, reference, atol=1e-12)
    assert all(not t.requires_grad for t in fast.values())
    assert all(p.grad is None for p in model.parameters())


def test_dropout_is_off_during_the_estimate_and_the_model_is_left_as_found():
    model, data = _mlp(dropout=0.5), _class_data()
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = curvature.hessian_diagonal(model, _ce, data, "exact", progress=False)
    assert model.training and model[1].training
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])
    model.eval()
    _assert_close_dicts(got, _reference_diagonal(model, _ce, data), atol=1e-10)


def test_float32_model_gives_float32_estimates_close_to_float64():
    model64, data64 = _mlp(), _class_data()
    model32 = _mlp().float()
    data32 = [(x.float(), y) for x, y in data64]
    for method, spec in (("exact", _ce), ("hutchinson", _ce), ("ggn", CE_SPEC),
                         ("empirical_fisher", CE_SPEC), ("finite_difference", _ce)):
        a = curvature.hessian_diagonal(model32, spec, data32, method, progress=False)
        b = curvature.hessian_diagonal(model64, spec, data64, method, progress=False)
        assert all(t.dtype == torch.float32 for t in a.values())
        atol = 1e-2 if method == "finite_difference" else 1e-4
        _assert_close_dicts(a, {k: v.float() for k, v in b.items()}, atol=atol, rtol=1e-3)


def test_frozen_parameters_are_left_out_by_default():
    model, data = _mlp(), _class_data()
    model[0].weight.requires_grad_(False)
    got = curvature.hessian_diagonal(model, _ce, data, "hutchinson", num_samples=2,
                                     progress=False)
    assert list(got) == ["0.bias", "3.weight", "3.bias"]


# -- bad input -----------------------------------------------------------------------------------


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(st.SparsetuneError) as info:
        curvature.hessian_diagonal(_mlp(), _ce, _class_data(), "newton", progress=False)
    assert isinstance(info.value, ValueError)
    for name in curvature.METHODS:
        assert name in str(info.value)
    assert set(curvature.METHODS) == {
        "exact", "hutchinson", "ggn", "ggn_mc", "empirical_fisher", "finite_difference"
    }


@pytest.mark.parametrize("method", ["exact", "hutchinson", "ggn", "ggn_mc", "empirical_fisher",
                                    "finite_difference"])
def test_empty_data_is_refused(method):
    loss = CE_SPEC if method in ("ggn", "ggn_mc", "empirical_fisher") else _ce
    with pytest.raises(st.InvalidArgumentError, match="no batch"):
        curvature.hessian_diagonal(_mlp(), loss, [], method, progress=False)
    with pytest.raises(st.InvalidArgumentError, match="no batch"):
        curvature.extreme_eigenvalues(_mlp(), _ce, iter([]), progress=False)


def test_non_finite_result_names_the_parameter():
    model, data = _mlp(), _class_data()

    def exploding(m, b):  # finite through the first layer, inf curvature in the second
        return F.cross_entropy(m(b[0]), b[1]) + (m[3].bias * 1e300).square().sum()

    with pytest.raises(curvature.CurvatureError, match=r"'3\.bias'") as info:
        curvature.hessian_diagonal(model, exploding, data, "exact", progress=False)
    assert isinstance(info.value, st.SparsetuneError)
    with pytest.raises(curvature.CurvatureError, match=r"'3\.bias'"):
        curvature.extreme_eigenvalues(model, exploding, data, progress=False)


def test_loss_that_is_not_a_scalar_is_refused():
    model, data = _mlp(), _class_data()
    for bad, words in ((lambda m, b: m(b[0]), "shape \\(6, 3\\)"),
                       (lambda m, b: [m(b[0]).sum()], "got list"),
                       (lambda m, b: m(b[0]).sum().reshape(1), "shape \\(1,\\)")):
        for method in ("exact", "hutchinson", "finite_difference"):
            with pytest.raises(st.InvalidArgumentError, match=words):
                curvature.hessian_diagonal(model, bad, data, method, num_samples=None,
                                           progress=False)
        with pytest.raises(st.InvalidArgumentError, match="scalar"):
            curvature.extreme_eigenvalues(model, bad, data, progress=False)


def test_f_mse_loss_mean_gets_an_error_naming_the_pytorch_bug(make_mlp, make_batches):
    """F.mse_loss(reduction="mean") breaks forward-over-reverse AD (pytorch/pytorch#123996)."""
    model, data = make_mlp(), make_batches(2)
    with pytest.raises(st.InvalidArgumentError, match="123996"):
        curvature.hessian_diagonal(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), data,
                                   "hutchinson", num_samples=2, progress=False)
    spec = OutputLoss(_first, _second, loss="mse")  # the remedy the message gives
    torch.testing.assert_close(spec(model, data[0]), F.mse_loss(model(data[0][0]), data[0][1]))


def test_sdpa_attention_gets_an_error_that_says_load_it_eager():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, attn_implementation="sdpa"))
    data = _bert_data(1)
    inside = ["bert.encoder.layer.0.attention.self.query.bias"]  # tangents reach SDPA
    with pytest.raises(st.InvalidArgumentError, match='attn_implementation="eager"'):
        curvature.hessian_diagonal(model, _hf_loss, data, "hutchinson", num_samples=2,
                                   params=inside, progress=False)
    with pytest.raises(st.InvalidArgumentError, match='attn_implementation="eager"'):
        curvature.extreme_eigenvalues(model, _hf_loss, data, mask=inside, progress=False)
    model.set_attn_implementation("eager")  # the remedy the message gives
    got = curvature.hessian_diagonal(model, _hf_loss, data, "hutchinson", num_samples=2,
                                     params=inside, progress=False)
    assert torch.isfinite(got[inside[0]]).all()


def test_per_example_methods_need_an_output_loss():
    for method in ("ggn", "ggn_mc", "empirical_fisher"):
        with pytest.raises(st.InvalidArgumentError, match="OutputLoss"):
            curvature.hessian_diagonal(_mlp(), _ce, _class_data(), method, progress=False)


def test_options_that_do_not_apply_or_are_out_of_range_are_refused():
    model, data = _mlp(), _class_data()
    cases = [
        (dict(method="exact", num_samples=4), "num_samples=4 does not apply"),
        (dict(method="hutchinson", step=1e-3), "step=0.001 does not apply.*finite_difference"),
        (dict(method="ggn", loss_fn=CE_SPEC, distribution="gaussian"), "distribution"),
        (dict(method="exact", return_stderr=True), "return_stderr"),
        (dict(method="hutchinson", num_samples=0), "num_samples must be an integer >= 1"),
        (dict(method="hutchinson", chunk_size=0), "chunk_size must be"),
        (dict(method="hutchinson", distribution="uniform"), "distribution must be one of"),
        (dict(method="hutchinson", num_samples=1, return_stderr=True), "num_samples >= 2"),
        (dict(method="finite_difference", step=0.0), "step must be"),
        (dict(method="hutchinson", seed=1.5), "seed must be an integer"),
        (dict(method="hutchinson", params=["nope"]), "lacks: \\['nope'\\]"),
        (dict(method="hutchinson", params=[]), "selects no coordinate"),
    ]
    for kwargs, words in cases:
        kwargs = {"loss_fn": _ce, "progress": False, **kwargs}
        with pytest.raises(st.SparsetuneError, match=words):
            curvature.hessian_diagonal(model, data=data, **kwargs)
    with pytest.raises(st.InvalidArgumentError, match="which must be one of"):
        curvature.extreme_eigenvalues(model, _ce, data, which="middle", progress=False)
    with pytest.raises(st.ParameterMismatchError, match="lacks"):
        curvature.extreme_eigenvalues(model, _ce, data, mask=["nope"], progress=False)


def test_output_loss_validates_its_spec_and_the_targets():
    with pytest.raises(st.InvalidArgumentError, match="loss must be one of"):
        OutputLoss(_first, _second, loss="hinge")
    with pytest.raises(st.InvalidArgumentError, match="reduction must be one of"):
        OutputLoss(_first, _second, reduction="none")
    model, data = _mlp(), _class_data()
    out_of_range = [(x, y + 3) for x, y in data]
    for method in ("ggn", "empirical_fisher", "exact"):
        with pytest.raises(st.InvalidArgumentError, match=r"in \[0, 3\)"):
            curvature.hessian_diagonal(model, CE_SPEC, out_of_range, method, progress=False)
    with pytest.raises(st.InvalidArgumentError, match="targets of the outputs' shape"):
        curvature.hessian_diagonal(model, MSE_SPEC, data, "ggn", progress=False)
    with pytest.raises(st.InvalidArgumentError, match="integer class ids"):
        curvature.hessian_diagonal(model, CE_SPEC, [(x, y.double()) for x, y in data], "ggn",
                                   progress=False)
