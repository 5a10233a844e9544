"""sparsetune.prepare in bfloat16 and float16, and under bf16 autocast, on every device.

References: the float64 dense gradient of the same model (its 16-bit weights and inputs
converted exactly to float64), gathered at the mask. Errors are relative over all selected
values at once: ||g - ref|| / ||ref||, g the selected gradient values of every compact weight.
Bounds: 1e-2 (bfloat16), 2e-3 (float16) for the values in ``.grad``; the float32 values that
``selected_gradient(..., dtype=torch.float32)`` returns are the products of exact 16-bit
operands with float32 accumulation, so a single Linear's are held to 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsetune as st
from sparsetune import Mask
from sparsetune.optim import Selection
from sparsetune.sparse_grad import plan_of, selected_gradient

HALVES = [torch.bfloat16, torch.float16]
BOUND = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}
FP32_BOUND = 1e-5  # a single Linear's float32 values: exact operands, float32 sums


def relative_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[n].double() - ref[n].double()).norm() ** 2) for n in ref)
    den = sum(float(ref[n].double().norm() ** 2) for n in ref)
    return (num / den) ** 0.5


def reference_gradients(model: nn.Module, mask: Mask, loss_fn) -> dict[str, torch.Tensor]:
    """float64 dense autograd on a float64 copy of ``model``, gathered at the mask."""
    ref = copy.deepcopy(model).double()
    loss_fn(ref, torch.float64).backward()
    return {n: Selection(mask[n], p.device).gather(p.grad) for n, p in ref.named_parameters()
            if p.grad is not None and n in mask and bool(mask[n].any())}


def compact_gradients(model: nn.Module, mask: Mask, dtype: torch.dtype | None = None) -> dict:
    return {n: selected_gradient(p, Selection(mask[n], p.device).index, dtype=dtype)
            for n, p in st.sparse_grad.compact_parameters(model)}


def sparse_mask(shape: tuple[int, int], density: float, seed: int = 0) -> Mask:
    bits = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density
    return Mask.from_dict({"weight": bits})


def linear_loss(x: torch.Tensor, upstream: torch.Tensor):
    """(layer(x) * upstream).sum() in the dtype asked for (exact: the inputs are 16-bit)."""
    return lambda m, dtype: (m(x.to(dtype)) * upstream.to(dtype)).sum()


@pytest.fixture(scope="module")
def wide_layer() -> tuple[nn.Linear, Mask, torch.Tensor, torch.Tensor]:
    """A 4096 x 4096 Linear (float32), its p = 1e-4 mask (k ~ 1700, the issue's failing case),
    16 tokens of input and an upstream gradient."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = nn.Linear(4096, 4096, bias=False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 4096, generator=gen)
    upstream = torch.randn(2, 8, 4096, generator=gen)
    return layer, sparse_mask((4096, 4096), 1e-4), x, upstream


def check_linear(layer, mask, x, upstream, dtype, product, device) -> str:
    """prepare() on ``layer`` in ``dtype`` with ``product``: .grad within BOUND[dtype], the
    float32 values within FP32_BOUND; returns the product the plan used."""
    layer = copy.deepcopy(layer).to(device=device, dtype=dtype)
    x, upstream = x.to(device=device, dtype=dtype), upstream.to(device=device, dtype=dtype)
    loss_fn = linear_loss(x, upstream)
    ref = reference_gradients(layer, mask, loss_fn)
    with st.prepare(layer, mask, linear_product=product):
        loss_fn(layer, dtype).backward()
        assert layer.weight.grad.is_sparse and layer.weight.grad.dtype == dtype
        err = relative_error(compact_gradients(layer, mask), ref)
        err32 = relative_error(compact_gradients(layer, mask, torch.float32), ref)
        used = plan_of(layer.weight).linear_product
    assert err <= BOUND[dtype], f"{dtype} {product}: relative error {err:.2e}"
    assert err32 <= max(FP32_BOUND, BOUND[dtype]), f"{dtype} {product}: float32 {err32:.2e}"
    return used


# -- a wide layer: the sampled product in 16 bits --------------------------------------------------
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("product", ["sampled", "blocks", "auto"])
def test_wide_linear_in_16_bits_equals_the_float64_gradient(
    wide_layer, dtype, product, device
):
    """4096 x 4096 at p = 1e-4 in bf16/fp16: each product, and the cost model's own choice
    (the sampled one: every row and column is touched, k dot products cost least)."""
    used = check_linear(*wide_layer, dtype, product, device)
    assert_choice(used, product, device)


def assert_choice(used: str, product: str, device: torch.device) -> None:
    """A forced product is used as asked; "auto" picks "sampled" on CPU (the CPU cost table)
    and, elsewhere, whichever product that device's table prices lowest (any that runs)."""
    from sparsetune.sparse_grad import LINEAR_PRODUCTS

    if product != "auto":
        assert used == product
    elif device.type == "cpu":
        assert used == "sampled"
    else:
        assert used in LINEAR_PRODUCTS


@pytest.mark.parametrize("product", ["sampled", "blocks"])
def test_chunked_float32_products_equal_the_float64_gradient(monkeypatch, product, device):
    """Chunks of a few tokens (the float32 copies of the operands are cut into many pieces)."""
    from sparsetune.sparse_grad import products

    monkeypatch.setattr(products, "CHUNK_ELEMENTS", 300)  # 2 tokens of 64 + 48 columns
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        layer = nn.Linear(48, 64, bias=False)
    gen = torch.Generator().manual_seed(4)
    x, upstream = torch.randn(7, 48, generator=gen), torch.randn(7, 64, generator=gen)
    for dtype in HALVES:
        check_linear(layer, sparse_mask((64, 48), 0.2), x, upstream, dtype, product, device)


# -- a whole model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama() -> tuple[nn.Module, Mask, torch.Tensor]:
    """LlamaForCausalLM from a config (hidden 64, 2 layers, vocab 128), float32; a 10% mask
    over every Linear weight (attention, MLP, lm_head), nothing else; a batch of token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linear) == 2 * 7 + 1
    gen = torch.Generator().manual_seed(2)
    bits = {n: torch.rand(p.shape, generator=gen) < 0.1 if n in linear
            else torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, Mask.from_dict(bits), ids


@pytest.mark.parametrize("dtype", HALVES)
def test_tiny_llama_in_16_bits_equals_the_float64_gradient(tiny_llama, dtype, device):
    """Every Linear of a Llama in bf16/fp16, with each product and the automatic choice."""
    base, mask, ids = tiny_llama
    ids = ids.to(device)

    def loss_fn(m, _dtype):
        return m(input_ids=ids, labels=ids).loss

    start = copy.deepcopy(base).to(device=device, dtype=dtype)
    ref = reference_gradients(start, mask, loss_fn)
    for product in ("sampled", "blocks", "auto"):
        model = copy.deepcopy(start)
        with st.prepare(model, mask, linear_product=product) as handle:
            assert len(handle.compact) == 15 and handle.fallback == []
            loss_fn(model, dtype).backward()
            err = relative_error(compact_gradients(model, mask), ref)
            err32 = relative_error(compact_gradients(model, mask, torch.float32), ref)
        assert err <= BOUND[dtype], f"{dtype} {product}: relative error {err:.2e}"
        assert err32 <= BOUND[dtype], f"{dtype} {product}: float32 values {err32:.2e}"


# -- gradient accumulation in float32 ------------------------------------------------------------
@pytest.mark.parametrize("product", ["sampled", "blocks"])
def test_accumulating_two_micro_batches_in_bf16_keeps_float32_sums(product, device):
    """The second micro-batch's gradient is below half a bf16 ulp of the first's: summed in
    bf16 it would vanish. The selected values equal the float32 sum of the two passes (the
    float64 reference to float32 rounding), and ``.grad`` holds that sum rounded to bf16."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        layer = nn.Linear(48, 64, bias=False).to(device=device, dtype=torch.bfloat16)
    mask = sparse_mask((64, 48), 0.2, seed=6)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, 48, generator=gen).to(device=device, dtype=torch.bfloat16)
    upstream = torch.randn(9, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    small = upstream * 2.0**-12  # exact in bf16; its gradient is 2^-12 times the first's
    first = reference_gradients(layer, mask, linear_loss(x, upstream))["weight"]
    second = reference_gradients(layer, mask, linear_loss(x, small))["weight"]
    index = Selection(mask["weight"], device).index
    with st.prepare(layer, mask, linear_product=product):
        for up in (upstream, small):
            linear_loss(x, up)(layer, torch.bfloat16).backward()
        got = selected_gradient(layer.weight, index, dtype=torch.float32)
        grad = selected_gradient(layer.weight, index)
        flat = torch.empty(index.numel(), dtype=torch.float32, device=device)
        selected_gradient(layer.weight, index, out=flat)  # a float32 buffer gets them too
    expected = first + second
    assert got.dtype == torch.float32
    assert relative_error({"w": got}, {"w": expected}) <= FP32_BOUND
    torch.testing.assert_close(flat, got, atol=0, rtol=0)
    torch.testing.assert_close(grad, got.to(torch.bfloat16), atol=0, rtol=0)
    bf16_sum = first.to(torch.bfloat16) + second.to(torch.bfloat16)
    assert relative_error({"w": bf16_sum}, {"w": expected}) > 100 * FP32_BOUND  # what is saved


def test_float32_sums_survive_zero_grad_autograd_grad_and_an_outside_write(device):
    """``zero_grad(set_to_none=False)`` restarts the sum; ``torch.autograd.grad`` leaves it
    alone; a write to ``.grad`` from outside (clipping) makes ``.grad`` the truth again."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        layer = nn.Linear(24, 32, bias=False).to(device=device, dtype=torch.bfloat16)
    mask = sparse_mask((32, 24), 0.3, seed=9)
    gen = torch.Generator().manual_seed(10)
    losses = [linear_loss(torch.randn(5, 24, generator=gen).to(device, torch.bfloat16),
                          torch.randn(5, 32, generator=gen).to(device, torch.bfloat16))
              for _ in range(3)]
    index = Selection(mask["weight"], device).index
    ref = [reference_gradients(layer, mask, loss)["weight"] for loss in losses]

    def fp32():
        return selected_gradient(layer.weight, index, dtype=torch.float32)

    with st.prepare(layer, mask):
        opt = st.SparseSGD(layer, mask, lr=0.1)
        losses[0](layer, torch.bfloat16).backward()
        opt.zero_grad(set_to_none=False)
        losses[1](layer, torch.bfloat16).backward()
        assert relative_error({"w": fp32()}, {"w": ref[1]}) <= FP32_BOUND
        x = torch.ones(5, 24, dtype=torch.bfloat16, device=device, requires_grad=True)
        torch.autograd.grad(layer(x).sum(), [x])  # never reaches .grad
        assert relative_error({"w": fp32()}, {"w": ref[1]}) <= FP32_BOUND
        layer.weight.grad._values().mul_(0.5)  # as clip_grad_norm_ does
        torch.testing.assert_close(fp32(), layer.weight.grad._values().float())
        losses[2](layer, torch.bfloat16).backward()
        expected = ref[1].to(torch.bfloat16).double() * 0.5 + ref[2]
        assert relative_error({"w": fp32()}, {"w": expected}) <= 4e-3  # halved in bf16


# -- bf16 autocast with float32 parameters ---------------------------------------------------------
def test_bf16_autocast_with_float32_parameters(wide_layer, device):
    """Under autocast the gradient arrives in bf16 although the weight is float32: the wide
    layer's product (sampled) runs with float32 sums, and ``.grad`` is float32."""
    layer, mask, x, upstream = wide_layer
    layer = copy.deepcopy(layer).to(device)
    x, upstream = x.to(device), upstream.to(device)
    rounded = copy.deepcopy(layer).to(torch.bfloat16)  # what autocast multiplies
    ref = reference_gradients(rounded, mask, linear_loss(x.bfloat16(), upstream.bfloat16()))
    with st.prepare(layer, mask):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        (out * upstream.bfloat16()).sum().backward()
        assert_choice(plan_of(layer.weight).product_for(device.type, torch.bfloat16), "auto",
                      device)
        assert layer.weight.grad.dtype == torch.float32
        err = relative_error(compact_gradients(layer, mask), ref)
    assert err <= FP32_BOUND, f"relative error {err:.2e}"


# -- where each product can run ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("product", ["sampled", "blocks", "auto"])
def test_every_dtype_runs_with_every_product(dtype, product, device):
    """LINEAR_SUPPORT lists every (product, device type, dtype) here, and the path chosen for
    each runs and is exact to the dtype's bound."""
    from sparsetune.sparse_grad import LINEAR_SUPPORT, linear_support

    for name in ("sampled", "blocks"):
        assert (name, device.type, dtype) in LINEAR_SUPPORT
        assert linear_support(name, device.type, dtype) == LINEAR_SUPPORT[name, device.type, dtype]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        layer = nn.Linear(384, 1536, bias=False)  # density 0.5%: auto chooses "sampled"
    gen = torch.Generator().manual_seed(12)
    x, upstream = torch.randn(6, 384, generator=gen), torch.randn(6, 1536, generator=gen)
    used = check_linear(layer, sparse_mask((1536, 384), 0.005), x, upstream, dtype, product,
                        device)
    assert_choice(used, product, device)


def test_the_cost_model_never_picks_a_product_that_cannot_run():
    """On a device type without ``sampled_addmm`` the automatic choice is the blocks product
    even where the sampled one would cost less; forcing the sampled one there fails clearly."""
    from sparsetune.sparse_grad import linear_support
    from sparsetune.sparse_grad.plan import Plan

    selected = torch.rand(1536, 384, generator=torch.Generator().manual_seed(13)) < 0.005
    plan = Plan("w", selected, torch.device("cpu"))
    assert plan.product_for("cpu", torch.bfloat16) == "sampled"
    for dtype in [*HALVES, torch.float32]:
        assert linear_support("sampled", "mps", dtype) is None
        assert linear_support("blocks", "mps", dtype) is not None
        assert plan.product_for("mps", dtype) == "blocks"
    forced = Plan("w", selected, torch.device("cpu"), "sampled")
    with pytest.raises(st.errors.InvalidArgumentError, match=r"cannot compute .* on mps"):
        forced.product_for("mps", torch.bfloat16)


@pytest.mark.parametrize(
    ("optimizer", "impl"),
    [("SparseAdamW", "flat"), ("SparseAdamW", "foreach"), ("SparseAdamW", "forloop"),
     ("SparseSGD", "foreach"), ("SparseSGD", "forloop")],
)
def test_the_optimizer_steps_on_the_float32_sums(optimizer, impl, device):
    """A bf16 layer in sparse-gradient mode, two micro-batches, fp32 masters: the master equals
    the torch optimizer (AdamW / SGD) run in fp32 on the selected values and fed the
    float32-accumulated gradient, not its bf16 rounding."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        layer = nn.Linear(48, 64, bias=False).to(device=device, dtype=torch.bfloat16)
    mask = sparse_mask((64, 48), 0.2, seed=12)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(9, 48, generator=gen).to(device=device, dtype=torch.bfloat16)
    upstream = torch.randn(9, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    index = Selection(mask["weight"], device).index
    reference = layer.weight.detach().reshape(-1).index_select(0, index).float().requires_grad_()
    lr = 1e-3 if optimizer == "SparseAdamW" else 1.0
    opt = getattr(st, optimizer)(layer, mask, lr=lr, weight_decay=0.0, impl=impl)
    torch_opt = (torch.optim.AdamW if optimizer == "SparseAdamW" else torch.optim.SGD)(
        [reference], lr=lr, weight_decay=0.0)
    with st.prepare(layer, mask):
        for _ in range(2):  # two steps: AdamW's second step depends on the gradient's size
            opt.zero_grad()
            for up in (upstream, upstream * 2.0**-12):
                linear_loss(x, up)(layer, torch.bfloat16).backward()
            summed = selected_gradient(layer.weight, index, dtype=torch.float32)
            rounded = selected_gradient(layer.weight, index).float()
            assert not torch.equal(summed, rounded)  # the bf16 .grad lost the second one
            opt.step()
            reference.grad = summed.clone()
            torch_opt.step()
    master = opt.state[layer.weight]["master"]
    torch.testing.assert_close(master, reference.detach(), atol=0, rtol=1e-6)
    torch.testing.assert_close(layer.weight.detach().reshape(-1).index_select(0, index),
                               master.to(torch.bfloat16), atol=0, rtol=0)
