"""SparseAdamW and SparseSGD: exact parity with the wrapped dense optimizers, compact state.

References are float64 and exact: MaskedOptimizer(torch.optim.AdamW / SGD, foreach=False) for
the update rule, the for-loop twin for the foreach path, closed forms and hand arithmetic for
``decay_to``, and a hand byte count for the state size.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch import nn

import sparsetune as st
from sparsetune import Mask, MaskedOptimizer, SparseAdamW, SparseSGD

FROZEN, FULL = "fc1.bias", "fc2.bias"  # an all-False and an all-True parameter
STEPS, NO_GRAD_STEP, RELOAD_STEP = 24, 5, 13


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def assert_params_close(a: nn.Module, b: nn.Module, atol: float, where: str = ""):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(
            p, q, atol=atol, rtol=0, msg=lambda m, n=name: f"{where}{n}: {m}"
        )


# -- parity with MaskedOptimizer(torch.optim.X(foreach=False)) --------------------------------
ADAMW_CASES = {
    "plain": dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.3),
    "amsgrad": dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3, amsgrad=True),
    "maximize": dict(lr=0.02, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, maximize=True),
}
SGD_CASES = {
    "momentum_dampening": dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.1),
    "nesterov": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
    "no_momentum": dict(lr=0.05, weight_decay=0.2),
    "maximize": dict(lr=0.05, momentum=0.5, weight_decay=0.1, maximize=True),
}
PARITY = [("adamw", name, fe) for name in ADAMW_CASES for fe in (True, False)] + [
    ("sgd", name, fe) for name in SGD_CASES for fe in (True, False)
]


def make_pair(kind, case, model, mask, foreach):
    if kind == "adamw":
        hyper = ADAMW_CASES[case]
        sparse = SparseAdamW(model, mask, **hyper, foreach=foreach)
        return sparse, lambda ps: torch.optim.AdamW(ps, **hyper, foreach=False), hyper
    hyper = SGD_CASES[case]
    sparse = SparseSGD(model, mask, **hyper, foreach=foreach)
    return sparse, lambda ps: torch.optim.SGD(ps, **hyper, foreach=False), hyper


@pytest.mark.parametrize(("kind", "case", "foreach"), PARITY)
def test_matches_masked_dense_optimizer(kind, case, foreach, make_mlp, make_mask, make_batches):
    """20+ steps with a no-grad step, a 0-dim, an all-False, an all-True parameter and a reload."""
    model = make_mlp(seed=0, scalar=True)
    reference = copy.deepcopy(model)
    mask = make_mask(model, density=0.4, seed=1, frozen=[FROZEN], full=[FULL, "scale"])
    assert mask["scale"].ndim == 0 and bool(mask["scale"])  # the 0-dim parameter is trained
    opt, dense, hyper = make_pair(kind, case, model, mask, foreach)
    ref = MaskedOptimizer(dense(reference.parameters()), mask, reference)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    for step, (x, y) in enumerate(make_batches(STEPS, seed=2)):
        if step == RELOAD_STEP:  # continue in a freshly constructed optimizer
            saved = roundtrip(opt.state_dict())
            cls = SparseAdamW if kind == "adamw" else SparseSGD
            opt = cls(model, mask, **hyper, foreach=foreach)
            opt.load_state_dict(saved)
        for m, o in ((model, opt), (reference, ref)):
            o.zero_grad()
            loss_of(m, x, y).backward()
            if step == NO_GRAD_STEP:
                m.fc1.weight.grad = None
            o.step()
        assert_params_close(model, reference, atol=1e-12, where=f"step {step}: ")

    for name, p in model.named_parameters():
        frozen = ~mask[name]
        assert torch.equal(p.detach()[frozen], before[name][frozen])
        assert (p.detach()[mask[name]] != before[name][mask[name]]).all()
    # the compact state is the dense state at the selected entries
    key = "exp_avg" if kind == "adamw" else "momentum_buffer"
    for name, p in model.named_parameters():
        q = reference.get_parameter(name)
        if not mask[name].any():
            assert p not in opt.state and q not in ref.state
            continue
        if ref.state[q].get(key) is None:  # SGD without momentum keeps no buffer
            assert opt.state[p].get(key) is None
            continue
        dense_state = ref.state[q][key].reshape(-1)[mask[name].reshape(-1)]
        torch.testing.assert_close(opt.state[p][key], dense_state, atol=1e-12, rtol=0)
    step_count = opt.state[model.fc1.weight]["step"]
    assert step_count == STEPS - 1  # the no-grad step did not count


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("density", [0.5, 1.0])
def test_channels_last_parameters_match_masked_dense(
    kind, density, foreach, make_convnet, make_mask
):
    """A non-contiguous (channels_last) parameter, partly or fully selected."""
    model = make_convnet(seed=20)
    reference = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    mask = make_mask(model, density=0.5, seed=21, full=names if density == 1.0 else ())
    case = "plain" if kind == "adamw" else "nesterov"
    opt, dense, _ = make_pair(kind, case, model, mask, foreach)
    ref = MaskedOptimizer(dense(reference.parameters()), mask, reference)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(22)
    for step in range(6):
        x = torch.randn(3, 2, 5, 5, generator=gen, dtype=torch.float64)
        x = x.to(memory_format=torch.channels_last)
        for m, o in ((model, opt), (reference, ref)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
        assert_params_close(model, reference, atol=1e-12, where=f"step {step}: ")
    w, sel = model[0].weight.detach(), mask["0.weight"]
    assert torch.equal(w[~sel], before["0.weight"][~sel])
    assert (w[sel] != before["0.weight"][sel]).all()
    assert not model[0].weight.is_contiguous()


def grouped(model, adamw: bool):
    """Two named parameter groups with their own hyper-parameters (and one inheriting)."""
    named = list(model.named_parameters())
    first = {"params": named[:3], "lr": 0.05, "weight_decay": 0.0}
    if adamw:
        first.update(amsgrad=True, betas=(0.8, 0.9))
    else:
        first.update(momentum=0.5, nesterov=True)
    return [first, {"params": named[3:]}]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_param_groups_with_their_own_hyper_parameters(
    kind, foreach, make_mlp, make_mask, make_batches
):
    """Per-group lr, weight decay, amsgrad/betas or momentum/nesterov, as in torch.optim."""
    model = make_mlp(seed=23, scalar=True)
    reference = copy.deepcopy(model)
    mask = make_mask(model, density=0.5, seed=24, frozen=[FROZEN])
    if kind == "adamw":
        opt = SparseAdamW(grouped(model, True), mask, lr=0.01, weight_decay=0.2, foreach=foreach)
        dense = torch.optim.AdamW(
            [{**g, "params": [p for _, p in g["params"]]} for g in grouped(reference, True)],
            lr=0.01,
            weight_decay=0.2,
            foreach=False,
        )
    else:
        opt = SparseSGD(
            grouped(model, False), mask, lr=0.02, momentum=0.9, weight_decay=0.1, foreach=foreach
        )
        dense = torch.optim.SGD(
            [{**g, "params": [p for _, p in g["params"]]} for g in grouped(reference, False)],
            lr=0.02,
            momentum=0.9,
            weight_decay=0.1,
            foreach=False,
        )
    ref = MaskedOptimizer(dense, mask, reference)
    for step, (x, y) in enumerate(make_batches(8, seed=25)):
        for m, o in ((model, opt), (reference, ref)):
            o.zero_grad()
            loss_of(m, x, y).backward()
            o.step()
        assert_params_close(model, reference, atol=1e-12, where=f"step {step}: ")
    if kind == "adamw":
        assert "max_exp_avg_sq" in opt.state[model.fc1.weight]
        assert "max_exp_avg_sq" not in opt.state[model.fc2.weight]


def test_param_group_decay_to_is_validated(make_mlp, make_mask):
    model = make_mlp()
    mask = make_mask(model)
    named = list(model.named_parameters())
    with pytest.raises(st.InvalidArgumentError, match="'foo'"):
        SparseAdamW([{"params": named, "decay_to": "foo"}], mask)
    opt = SparseSGD(named[:2], mask)
    with pytest.raises(st.InvalidArgumentError, match="'bar'"):
        opt.add_param_group({"params": named[2:], "decay_to": "bar"})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [SparseAdamW, SparseSGD])
def test_frozen_entries_untouched_under_amp_clipping_and_schedulers(
    cls, make_mlp, make_mask, make_batches
):
    """bf16 autocast + GradScaler, gradient clipping and OneCycleLR around a sparse optimizer."""
    model = make_mlp(seed=26, dtype=torch.float32, scalar=True)
    mask = make_mask(model, density=0.4, seed=27, frozen=[FROZEN], full=[FULL])
    opt = cls(model, mask, lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=10, cycle_momentum=cls is SparseAdamW
    )
    scaler = torch.amp.GradScaler("cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step, (x, y) in enumerate(make_batches(10, dtype=torch.float32, seed=28)):
        opt.zero_grad(set_to_none=step % 2 == 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        scaler.scale(((out.float() - y) ** 2).mean()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        scaler.step(opt)
        scaler.update()
        sched.step()
    for name, p in model.named_parameters():
        sel = mask[name]
        assert torch.equal(p.detach()[~sel], before[name][~sel]), name
        assert (p.detach()[sel] != before[name][sel]).all(), name
    assert opt.state[model.fc2.weight]["step"] == 10


# -- the implementations of the step: flat, foreach, forloop ---------------------------------
IMPL_CASES = [
    (SparseAdamW, dict(lr=0.03, weight_decay=0.2)),
    (SparseAdamW, dict(lr=0.03, weight_decay=0.2, amsgrad=True, maximize=True)),
    (SparseAdamW, dict(lr=0.03, weight_decay=0.2, decay_to="init")),
    (SparseSGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.1)),
    (SparseSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, decay_to="init")),
    (SparseSGD, dict(lr=0.05, weight_decay=0.1, maximize=True)),
]


@pytest.mark.parametrize(
    ("cls", "hyper", "impl"),
    [(cls, hyper, impl) for cls, hyper in IMPL_CASES for impl in cls.impls],
)
def test_every_impl_equals_the_for_loop(cls, hyper, impl, make_mlp, make_mask, make_batches):
    """The same seeded float64 model, 20 steps with a None gradient, a layer frozen for a while
    and a 0-dim parameter: every parameter and state tensor equals the for-loop reference."""
    a = make_mlp(seed=3, scalar=True)
    b = copy.deepcopy(a)
    mask = make_mask(a, density=0.5, seed=4, frozen=[FROZEN], full=[FULL])
    if impl not in cls.impls:  # SparseSGD has no flat implementation: refused, by name
        with pytest.raises(st.InvalidArgumentError, match=rf"impl must be one of.*got '{impl}'"):
            cls(a, mask, **hyper, impl=impl)
        return
    fast, slow = cls(a, mask, **hyper, impl=impl), cls(b, mask, **hyper, impl="forloop")
    for step, (x, y) in enumerate(make_batches(20, seed=5)):
        for m, o in ((a, fast), (b, slow)):
            o.zero_grad()
            loss_of(m, x, y).backward()
            if step == 3:
                m.fc2.weight.grad = None
            if step == 7:  # a layer frozen for a while, by giving it no gradient
                m.scale.grad = None
            o.step()
        assert_params_close(a, b, atol=1e-12, where=f"step {step}: ")

    assert bool(fast._flats) == (impl in ("flat", "packed")), "flat ran exactly when asked for"
    for pa, pb in zip(a.parameters(), b.parameters()):
        sa, sb = fast.state.get(pa, {}), slow.state.get(pb, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]):
                torch.testing.assert_close(sa[key], sb[key], atol=1e-12, rtol=0)
            else:
                assert sa[key] == sb[key], key
    assert len(fast.state) == sum(bool(mask[n].any()) for n, _ in a.named_parameters())


def test_impl_is_checked_and_foreach_maps_to_it(make_mlp, make_mask):
    model = make_mlp(seed=3)
    mask = make_mask(model, density=0.5, seed=4)

    def impl(opt):
        (value,) = {group["impl"] for group in opt.param_groups}
        return value

    assert impl(SparseAdamW(model, mask)) == impl(SparseAdamW(model, mask, foreach=True)) == "flat"
    assert impl(SparseSGD(model, mask)) == impl(SparseSGD(model, mask, foreach=True)) == "foreach"
    assert impl(SparseAdamW(model, mask, foreach=False)) == "forloop"
    assert impl(SparseSGD(model, mask, impl="forloop", foreach=False)) == "forloop"
    groups = [{"params": list(model.named_parameters()), "foreach": False}]
    assert impl(SparseAdamW(groups, mask)) == "forloop"
    with pytest.raises(
        st.InvalidArgumentError,
        match=r"SparseAdamW: impl must be one of \['flat', 'packed', 'foreach', 'forloop'\]",
    ):
        SparseAdamW(model, mask, impl="fast")
    with pytest.raises(st.InvalidArgumentError, match="impl='flat' contradicts foreach=False"):
        SparseAdamW(model, mask, impl="flat", foreach=False)
    # a state saved before impl existed names the step by foreach in its groups
    opt = SparseAdamW(model, mask)
    saved = opt.state_dict()
    saved["param_groups"] = [
        {**{k: v for k, v in g.items() if k != "impl"}, "foreach": False}
        for g in saved["param_groups"]
    ]
    opt.load_state_dict(saved)
    assert impl(opt) == "forloop" and "foreach" not in opt.param_groups[0]


# -- decay_to ---------------------------------------------------------------------------------
def zero_grad_steps(model, opt, steps, how):
    x = torch.randn(3, 4, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        if how == "explicit":
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        else:  # a loss whose value does not depend on the parameters
            (0.0 * model(x).sum()).backward()
        opt.step()


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("how", ["explicit", "zero_loss"])
def test_adamw_decay_to_with_zero_gradients(how, foreach, make_mlp, make_mask):
    lr, wd, steps = 0.1, 0.5, 10
    factor = 1 - lr * wd
    results = {}
    for decay_to in ("init", "zero"):
        model = make_mlp(seed=6, scalar=True)
        mask = make_mask(model, density=0.5, seed=7, full=[FULL])
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = SparseAdamW(model, mask, lr=lr, weight_decay=wd, decay_to=decay_to, foreach=foreach)
        zero_grad_steps(model, opt, steps, how)
        for name, p in model.named_parameters():
            sel = mask[name]
            assert torch.equal(p.detach()[~sel], theta0[name][~sel])
            if decay_to == "init":
                assert torch.equal(p.detach()[sel], theta0[name][sel]), name
            else:
                expected = theta0[name][sel].clone()
                for _ in range(steps):
                    expected = expected * factor
                assert torch.equal(p.detach()[sel], expected), name
                closed = theta0[name][sel] * factor**steps
                torch.testing.assert_close(p.detach()[sel], closed, atol=1e-14, rtol=1e-13)
        results[decay_to] = model.fc2.bias.detach().clone()
    assert not torch.equal(results["init"], results["zero"])


def sgd_zero_grad_factor(lr, wd, momentum, steps):
    """theta_t / theta_0 for SGD on the loss 0 with L2 decay to zero (dampening 0).

    The state (theta, b) evolves linearly: b' = mu b + wd theta, theta' = theta - lr b', i.e.
    (theta', b') = A (theta, b) with A = [[1 - lr wd, -lr mu], [wd, mu]] and b_0 = 0.
    """
    a = np.array([[1 - lr * wd, -lr * momentum], [wd, momentum]], dtype=np.float64)
    return float((np.linalg.matrix_power(a, steps) @ np.array([1.0, 0.0]))[0])


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_decay_to_matches_closed_form(momentum, foreach, make_mlp, make_mask):
    lr, wd, steps = 0.1, 0.4, 15
    assert sgd_zero_grad_factor(lr, wd, 0.0, 3) == pytest.approx((1 - lr * wd) ** 3, abs=1e-15)
    for decay_to in ("init", "zero"):
        model = make_mlp(seed=8)
        mask = make_mask(model, density=0.5, seed=9)
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = SparseSGD(
            model,
            mask,
            lr=lr,
            momentum=momentum,
            weight_decay=wd,
            decay_to=decay_to,
            foreach=foreach,
        )
        zero_grad_steps(model, opt, steps, "explicit")
        factor = sgd_zero_grad_factor(lr, wd, momentum, steps)
        assert abs(factor - 1) > 0.1
        for name, p in model.named_parameters():
            sel = mask[name]
            assert torch.equal(p.detach()[~sel], theta0[name][~sel])
            if decay_to == "init":
                assert torch.equal(p.detach()[sel], theta0[name][sel]), name
            else:
                torch.testing.assert_close(
                    p.detach()[sel], theta0[name][sel] * factor, atol=1e-13, rtol=1e-12
                )


class Vector(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values, dtype=torch.float64))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("decay_to", ["init", "zero"])
def test_adamw_one_step_by_hand(decay_to, foreach):
    theta0 = [0.5, -1.0, 2.0]
    moved = [0.75, -0.5, 1.5]  # where the parameter is when the step is taken
    grad = [0.1, -0.3, 0.2]
    lr, wd, beta1, beta2, eps = 0.1, 0.5, 0.9, 0.999, 1e-8
    model = Vector(theta0)
    mask = Mask.from_dict({"w": torch.tensor([True, False, True])})
    opt = SparseAdamW(
        model,
        mask,
        lr=lr,
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=wd,
        decay_to=decay_to,
        foreach=foreach,
    )
    with torch.no_grad():
        model.w.copy_(torch.tensor(moved, dtype=torch.float64))
    model.w.grad = torch.tensor(grad, dtype=torch.float64)
    opt.step()

    def by_hand(target: float, v: float, g: float) -> float:
        v = v - lr * wd * (v - target)  # decoupled decay toward the target
        m = (1 - beta1) * g
        s = (1 - beta2) * g * g
        m_hat, s_hat = m / (1 - beta1), s / (1 - beta2)
        return v - lr * m_hat / (math.sqrt(s_hat) + eps)

    targets = theta0 if decay_to == "init" else [0.0, 0.0, 0.0]
    got = model.w.detach().tolist()
    assert got[1] == moved[1]  # frozen: stays where it is, not pulled toward theta0
    for i in (0, 2):
        expected = by_hand(targets[i], moved[i], grad[i])
        assert math.isclose(got[i], expected, rel_tol=1e-13, abs_tol=1e-15), (i, got, expected)
        # the two decay targets give clearly different results here
        assert abs(by_hand(theta0[i], moved[i], grad[i]) - by_hand(0.0, moved[i], grad[i])) > 0.01


# -- compact state ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hyper",
    [{}, {"amsgrad": True}, {"decay_to": "init"}, {"amsgrad": True, "decay_to": "init"}],
)
def test_sparse_adamw_state_is_compact(hyper, make_mlp, make_mask, make_batches):
    model = make_mlp(seed=10, scalar=True)
    mask = make_mask(model, density=0.3, seed=11, frozen=[FROZEN], full=[FULL])
    opt = SparseAdamW(model, mask, lr=0.01, **hyper)
    for x, y in make_batches(2):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()

    per_entry = 2 + hyper.get("amsgrad", False) + (hyper.get("decay_to") == "init")
    expected_bytes = 0
    for name, p in model.named_parameters():
        k = int(mask[name].sum())
        if k == 0:
            assert p not in opt.state
            continue
        state = opt.state[p]
        tensors = {key: v for key, v in state.items() if torch.is_tensor(v)}
        assert len(tensors) == per_entry
        for key, value in tensors.items():
            assert value.shape == (k,), (name, key)
            assert value.dtype == torch.float64
        partly = k < p.numel()
        # moments (+ amsgrad max, theta0) and the int32 index; no cached values between steps
        expected_bytes += per_entry * k * 8 + (4 * k if partly else 0)
    assert 0 < int(mask["fc1.weight"].sum()) < model.fc1.weight.numel()
    assert st.optimizer_state_nbytes(opt) == expected_bytes


def test_sparse_sgd_state_is_compact(make_mlp, make_mask, make_batches):
    model = make_mlp(seed=12)
    mask = make_mask(model, density=0.3, seed=13, frozen=[FROZEN], full=[FULL])
    opt = SparseSGD(model, mask, lr=0.01, momentum=0.9)
    for x, y in make_batches(2):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    expected_bytes = 0
    for name, p in model.named_parameters():
        k = int(mask[name].sum())
        if k == 0:
            assert p not in opt.state
            continue
        assert opt.state[p]["momentum_buffer"].shape == (k,)
        expected_bytes += 8 * k + (4 * k if k < p.numel() else 0)
    assert st.optimizer_state_nbytes(opt) == expected_bytes


class Bag(nn.Module):
    def __init__(self, shapes, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.coef = []
        for i, shape in enumerate(shapes):
            self.register_parameter(
                f"p{i}", nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
            )
            self.coef.append(torch.randn(shape, generator=gen, dtype=torch.float64))

    def loss(self):
        return sum((c * torch.sin(p)).sum() for c, p in zip(self.coef, self.parameters()))


shapes = hs.lists(hs.integers(1, 4), min_size=0, max_size=3).map(tuple)


@given(
    shape_list=hs.lists(shapes, min_size=1, max_size=3),
    density=hs.floats(0.0, 1.0),
    seed=hs.integers(0, 2**16),
    sgd=hs.booleans(),
    decay_to=hs.sampled_from(["zero", "init"]),
    flag=hs.booleans(),
    steps=hs.integers(1, 3),
)
@settings(max_examples=100)
def test_property_state_dict_round_trip_is_lossless(
    shape_list, density, seed, sgd, decay_to, flag, steps
):
    model = Bag(shape_list, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    mask = Mask.from_dict(
        {n: torch.rand(p.shape, generator=gen) < density for n, p in model.named_parameters()}
    )

    def build():
        if sgd:
            return SparseSGD(
                model,
                mask,
                lr=0.1,
                momentum=0.9,
                nesterov=flag,
                weight_decay=0.1,
                decay_to=decay_to,
            )
        return SparseAdamW(model, mask, lr=0.1, amsgrad=flag, decay_to=decay_to)

    opt = build()
    for _ in range(steps):
        opt.zero_grad()
        model.loss().backward()
        opt.step()
    saved = opt.state_dict()
    fresh = build()
    fresh.load_state_dict(roundtrip(saved))

    assert fresh.state.keys() == opt.state.keys()
    for p, state in opt.state.items():
        assert fresh.state[p].keys() == state.keys()
        for key, value in state.items():
            if torch.is_tensor(value):
                assert torch.equal(fresh.state[p][key], value), key
                assert fresh.state[p][key].dtype == value.dtype
            else:
                assert fresh.state[p][key] == value, key
    assert fresh.state_dict()["sparsetune"] == saved["sparsetune"]
    # and both take the same next step from the same point
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    model.loss().backward()
    fresh.step()
    after_fresh = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), after_fresh[n]), n


@pytest.mark.parametrize("cls", [SparseAdamW, SparseSGD])
def test_state_saved_with_another_mask_is_refused(cls, make_mlp, make_mask, make_batches):
    model = make_mlp(seed=14)
    mask, other = make_mask(model, seed=15), make_mask(model, seed=16)
    opt = cls(model, mask, lr=0.01, momentum=0.9) if cls is SparseSGD else cls(model, mask)
    x, y = make_batches(1)[0]
    loss_of(model, x, y).backward()
    opt.step()
    saved = opt.state_dict()
    target = cls(model, other, lr=0.01)
    with pytest.raises(st.StateMismatchError, match="digest"):
        target.load_state_dict(saved)
    assert len(target.state) == 0
    unfingerprinted = {k: v for k, v in saved.items() if k != "sparsetune"}
    with pytest.raises(st.StateMismatchError, match="sparsetune"):
        cls(model, mask, lr=0.01).load_state_dict(unfingerprinted)


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "echo"),
    [
        (SparseAdamW, {"lr": -0.1}, "-0.1"),
        (SparseSGD, {"lr": -0.25}, "-0.25"),
        (SparseAdamW, {"betas": (1.0, 0.999)}, "index 0: 1.0"),
        (SparseAdamW, {"betas": (0.9, 1.0)}, "index 1: 1.0"),
        (SparseAdamW, {"betas": (-0.5, 0.999)}, "-0.5"),
        (SparseAdamW, {"eps": -1e-8}, "-1e-08"),
        (SparseAdamW, {"weight_decay": -0.01}, "-0.01"),
        (SparseSGD, {"weight_decay": -0.02}, "-0.02"),
        (SparseSGD, {"momentum": -0.9}, "-0.9"),
        (SparseSGD, {"nesterov": True, "momentum": 0.0}, "momentum=0.0"),
        (SparseSGD, {"nesterov": True, "momentum": 0.9, "dampening": 0.5}, "dampening=0.5"),
        (SparseAdamW, {"lr": float("nan")}, "nan"),
        (SparseSGD, {"weight_decay": float("nan")}, "nan"),
        (SparseAdamW, {"betas": (0.9, float("nan"))}, "index 1: nan"),
        (SparseAdamW, {"decay_to": "foo"}, "'foo'"),
        (SparseSGD, {"decay_to": "foo"}, "'foo'"),
    ],
)
def test_bad_hyper_parameters_are_refused_with_their_value(cls, kwargs, echo, make_mlp, make_mask):
    model = make_mlp()
    with pytest.raises(st.InvalidArgumentError) as info:
        cls(model, make_mask(model), **kwargs)
    assert echo in str(info.value)
    assert isinstance(info.value, ValueError)


def _build(which, model, mask):
    if which == "masked":
        return MaskedOptimizer(torch.optim.AdamW(model.parameters()), mask, model)
    if which == "named":
        return SparseAdamW(model.named_parameters(), mask)
    return {"adamw": SparseAdamW, "sgd": SparseSGD}[which](model, mask)


@pytest.mark.parametrize("which", ["masked", "adamw", "sgd", "named"])
def test_mask_that_does_not_fit_the_model_is_refused(which, make_mlp, make_mask):
    model = make_mlp()
    good = dict(make_mask(model).items())

    missing = Mask.from_dict({n: t for n, t in good.items() if n != "fc2.weight"})
    with pytest.raises(st.ParameterMismatchError, match=r"fc2\.weight"):
        _build(which, model, missing)

    misshaped = Mask.from_dict({**good, "fc1.weight": torch.ones(4, 5, dtype=torch.bool)})
    with pytest.raises(st.ParameterMismatchError, match=r"fc1\.weight.*\(4, 5\)"):
        _build(which, model, misshaped)

    if which != "named":  # only a model says which names exist
        extra = Mask.from_dict({**good, "ghost.weight": torch.ones(2, dtype=torch.bool)})
        with pytest.raises(st.ParameterMismatchError, match=r"ghost\.weight") as info:
            _build(which, model, extra)
        assert isinstance(info.value, KeyError)


@pytest.mark.parametrize("cls", [SparseAdamW, SparseSGD])
def test_parameters_without_names_are_refused(cls, make_mlp, make_mask):
    model = make_mlp()
    with pytest.raises(TypeError, match="names"):
        cls(model.parameters(), make_mask(model))


# -- transformers integration -----------------------------------------------------------------
def test_trainer_smoke(tmp_path):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainingArguments,
    )

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(12):
        data.append(
            {
                "input_ids": torch.randint(0, 100, (16,), generator=gen),
                "attention_mask": torch.ones(16, dtype=torch.long),
                "labels": torch.randint(0, 2, (), generator=gen),
            }
        )

    for which in ("sparse", "masked"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = BertForSequenceClassification(config)
        scores = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
        heads = [n for n in scores if n.startswith("classifier.")]
        mask = Mask.top_k(scores, density=0.05, always_train=heads)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        if which == "sparse":
            opt = SparseAdamW(model, mask, lr=1e-3, weight_decay=0.01)
        else:
            opt = MaskedOptimizer(
                torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01), mask, model
            )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        args = TrainingArguments(
            output_dir=str(tmp_path / which),
            max_steps=3,
            per_device_train_batch_size=4,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
        result = trainer.train()
        assert result.global_step == 3

        selected_moved, selected = 0, 0
        for name, p in model.named_parameters():
            sel = mask[name]
            assert torch.equal(p.detach()[~sel], before[name][~sel]), f"{which}: {name} moved"
            selected_moved += int((p.detach()[sel] != before[name][sel]).sum())
            selected += int(sel.sum())
        assert (model.classifier.weight != before["classifier.weight"]).all()
        assert selected_moved >= 0.99 * selected, (which, selected_moved, selected)


@pytest.mark.parametrize("edit", ["in_place", "load_state_dict", "assign_data"])
def test_fast_path_notices_parameters_changed_between_steps(edit, make_mlp, make_mask,
                                                            make_batches):
    """Outside edits between steps are the next step's starting point (flat fast path)."""
    model_a, model_b = make_mlp(seed=20), make_mlp(seed=20)
    mask = make_mask(model_a, density=0.5, seed=21)
    sparse = SparseAdamW(model_a, mask, lr=0.05, weight_decay=0.1)
    dense = MaskedOptimizer(
        torch.optim.AdamW(model_b.parameters(), lr=0.05, weight_decay=0.1, foreach=False),
        mask, model_b,
    )
    batches = make_batches(6)
    for i, (x, y) in enumerate(batches):
        for model, opt in ((model_a, sparse), (model_b, dense)):
            if i == 3:
                with torch.no_grad():
                    if edit == "in_place":
                        model.fc1.weight.mul_(0.5)
                    elif edit == "load_state_dict":
                        state = {k: v * 0.5 for k, v in model.state_dict().items()}
                        model.load_state_dict(state)
                    else:
                        model.fc1.weight.data = model.fc1.weight.data * 0.5
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
    assert sparse._flats, "the fast path did not run"
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
