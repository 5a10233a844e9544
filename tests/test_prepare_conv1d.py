"""sparsetune.prepare on transformers' Conv1D (GPT-2): compact gradients, not the dense fallback.

Conv1D holds W as (in, out) and computes y = x W + b, so its weight gradient is x^T g, the
Linear product with x and g swapped. GPT-2's lm_head shares its weight with wte (one parameter,
used by an Embedding and a Linear): both contributions land in one compact gradient.
References: float64 dense autograd on a float64 copy (16-bit weights converted exactly), gathered
at the mask; relative error over all selected values at once.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import sparsetune as st
from sparsetune import Mask, SparseAdamW
from sparsetune.optim import Selection
from sparsetune.sparse_grad import SparseGradientFallbackWarning, plan_of, selected_gradient

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

BOUND = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(config)


def random_mask(model: torch.nn.Module, density: float, seed: int) -> Mask:
    gen = torch.Generator().manual_seed(seed)
    bits = {}
    for name, p in model.named_parameters():
        b = torch.rand(p.shape, generator=gen) < density
        b.view(-1)[0], b.view(-1)[-1] = True, False  # every tensor partly selected
        bits[name] = b
    return Mask.from_dict(bits)


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def relative_error(got: dict, ref: dict) -> float:
    num = sum(float((got[n].double() - ref[n].double()).norm() ** 2) for n in ref)
    den = sum(float(ref[n].double().norm() ** 2) for n in ref)
    return (num / den) ** 0.5


def selected(model: torch.nn.Module, mask: Mask) -> dict[str, torch.Tensor]:
    return {n: selected_gradient(p, Selection(mask[n], p.device).index)
            for n, p in model.named_parameters() if p.grad is not None}


def reference(model: torch.nn.Module, mask: Mask, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model).double()
    lm_loss(ref, ids).backward()
    return {n: Selection(mask[n], p.device).gather(p.grad) for n, p in ref.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_gradients_at_the_mask_equal_the_float64_dense_ones(dtype):
    model = tiny_gpt2().to(dtype)
    assert model.lm_head.weight is model.transformer.wte.weight
    mask = random_mask(model, 0.05, seed=1)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    ref = reference(model, mask, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparseGradientFallbackWarning)
        handle = st.prepare(model, mask)
    with handle:
        conv = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
        assert len(conv) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 layers
        assert {f"{n}.weight" for n in conv} <= set(handle.compact)
        assert "transformer.wte.weight" in handle.compact  # wte and lm_head: one parameter
        assert handle.fallback == []
        lm_loss(model, ids).backward()
        for name in [*(f"{n}.weight" for n in conv), "transformer.wte.weight"]:
            grad = model.get_parameter(name).grad
            assert grad.is_sparse and grad.dtype == dtype, name
        got = selected(model, mask)
    assert set(got) == set(ref)
    err = relative_error(got, ref)
    assert err <= BOUND[dtype], f"{dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("product", ["sampled", "blocks", "sddmm", "auto"])
def test_conv1d_weight_gradient_in_float64_with_every_product(product):
    """x^T g at the mask, to float64 rounding; the plan is laid over W's (in, out) shape."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        layer = Conv1D(48, 20).double()  # nf = 48 outputs, nx = 20 inputs: W is (20, 48)
    gen = torch.Generator().manual_seed(4)
    bits = torch.rand(20, 48, generator=gen) < 0.2
    mask = Mask.from_dict({"weight": bits, "bias": torch.ones(48, dtype=torch.bool)})
    x = torch.randn(3, 5, 20, dtype=torch.float64, generator=gen, requires_grad=True)
    upstream = torch.randn(3, 5, 48, dtype=torch.float64, generator=gen)
    dense = copy.deepcopy(layer)
    x_ref = x.detach().clone().requires_grad_(True)
    (dense(x_ref) * upstream).sum().backward()
    with st.prepare(layer, mask, linear_product=product):
        out = layer(x)
        torch.testing.assert_close(out, dense(x_ref), rtol=0, atol=1e-12)
        (out * upstream).sum().backward()
        assert plan_of(layer.weight).shape == (20, 48)
        got = selected_gradient(layer.weight, Selection(bits, "cpu").index)
    torch.testing.assert_close(got, dense.weight.grad[bits], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    with torch.no_grad():  # untracked: the module's own forward
        torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=0)


def test_gpt2_sparse_adamw_with_prepare_keeps_frozen_entries_bit_identical():
    model = tiny_gpt2(seed=5)
    mask = random_mask(model, 0.05, seed=6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dense_model = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(7))
    opt, dense_opt = SparseAdamW(model, mask, lr=1e-2), SparseAdamW(dense_model, mask, lr=1e-2)
    with st.prepare(model, mask):
        for _ in range(2):
            for m, o in ((model, opt), (dense_model, dense_opt)):
                o.zero_grad()
                lm_loss(m, ids).backward()
                o.step()
    for (name, p), q in zip(model.named_parameters(), dense_model.parameters()):
        frozen = ~mask[name]
        assert torch.equal(p.detach()[frozen], before[name][frozen]), name
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-6, msg=name)
