"""Sparse-gradient training (sparsetune.prepare) and step-in-backward: exact in float64.

References: the dense gradient that plain autograd computes, gathered at the mask; the ordinary
dense masked training path (MaskedOptimizer(torch.optim.AdamW) and SparseAdamW/SparseSGD without
prepare) run side by side on a copy of the same float64 model and data.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hs
from torch import nn

import sparsetune as st
from sparsetune import Mask, MaskedOptimizer, SparseAdamW, SparseSGD
from sparsetune.optim import Selection
from sparsetune.sparse_grad import LINEAR_PRODUCTS, plan_of, selected_gradient

TOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two that wait on each other (and deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_mask(model: nn.Module, density: float, seed: int, **fixed: bool) -> Mask:
    """Bernoulli(density) per entry, each partly selected tensor with >= 1 selected and frozen."""
    gen = torch.Generator().manual_seed(seed)
    bits = {}
    for name, p in model.named_parameters():
        if name in fixed:
            bits[name] = torch.full(p.shape, fixed[name], dtype=torch.bool)
            continue
        b = torch.rand(p.shape, generator=gen) < density
        if b.numel() >= 2:
            b.view(-1)[0], b.view(-1)[-1] = True, False
        bits[name] = b
    return Mask.from_dict(bits)


def dense_selected_gradients(model: nn.Module, mask: Mask, loss_fn) -> dict[str, torch.Tensor]:
    """Plain autograd on a copy; each parameter's gradient gathered at its mask."""
    reference = copy.deepcopy(model)
    reference.zero_grad(set_to_none=True)
    loss_fn(reference).backward()
    out = {}
    for name, p in reference.named_parameters():
        if name in mask and bool(mask[name].any()):
            out[name] = Selection(mask[name], p.device).gather(p.grad)
    return out


def assert_selected_gradients_match(model: nn.Module, mask: Mask, expected: dict) -> None:
    for name, p in model.named_parameters():
        if name not in expected:
            assert p.grad is None, f"{name}: a parameter with no selected entry got a gradient"
            continue
        got = selected_gradient(p, Selection(mask[name], p.device).index)
        torch.testing.assert_close(got, expected[name], atol=TOL, rtol=0, msg=name)


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=24, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    return model.to(torch.float64).eval()


def bert_batches(n: int, seed: int = 0, batch: int = 4, length: int = 9) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 60, (batch, length), generator=gen)
        ids[0, 6:] = 0  # padding (id 0 is BERT's padding_idx)
        ids[1, :3] = ids[1, 3:6]  # repeated tokens
        out.append({
            "input_ids": ids,
            "attention_mask": (ids != 0).long(),
            "token_type_ids": (torch.arange(length) >= 5).long().expand(batch, -1).clone(),
            "labels": torch.randint(0, 3, (batch,), generator=gen),
        })
    return out


# -- gradients equal the dense gradient at the mask -----------------------------------------------
@given(
    out_features=hs.integers(1, 9),
    in_features=hs.integers(2, 9),
    lead=hs.lists(hs.integers(1, 4), min_size=0, max_size=2),
    density=hs.sampled_from([0.05, 0.15, 0.3, 0.6, 0.95]),
    bias=hs.booleans(),
    seed=hs.integers(0, 2**16),
    linear_product=hs.sampled_from(LINEAR_PRODUCTS),
)
def test_linear_sampled_product_equals_dense_gradient(
    out_features, in_features, lead, density, bias, seed, linear_product
):
    """Every way of computing the weight gradient at the mask (k sampled dot products, the
    dense product of the touched rows and columns, the automatic choice) against autograd's
    dense gradient; input and bias gradients too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(in_features, out_features, bias=bias).double()
    bits = {n: torch.rand(p.shape, generator=gen) < density for n, p in layer.named_parameters()}
    bits["weight"].view(-1)[seed % bits["weight"].numel()] = True
    if bits["weight"].all():
        bits["weight"].view(-1)[0] = False
    mask = Mask.from_dict(bits)
    x = torch.randn(*lead, 3, in_features, generator=gen, dtype=torch.float64)
    upstream = torch.randn(*lead, 3, out_features, generator=gen, dtype=torch.float64)

    x_ref = x.clone().requires_grad_()
    expected = dense_selected_gradients(layer, mask, lambda m: (m(x_ref) * upstream).sum())
    with st.prepare(layer, mask, linear_product=linear_product) as handle:
        x_sparse = x.clone().requires_grad_()
        (layer(x_sparse) * upstream).sum().backward()
        assert handle.compact == ["weight"] and layer.weight.grad.is_sparse
        assert_selected_gradients_match(layer, mask, expected)
    torch.testing.assert_close(x_sparse.grad, x_ref.grad, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "rows, cols, expect_rows, expect_cols",
    [(range(0, 300, 97), range(5, 200, 31), True, True),  # a few rows and columns
     (range(300), range(3, 9), False, True),  # every row, six columns
     (range(2, 5), range(200), True, False)],  # three rows, every column
)
def test_blocks_product_gathers_only_the_touched_rows_and_columns(
    rows, cols, expect_rows, expect_cols
):
    """A mask concentrated on a few rows/columns of a wide layer: the automatic choice is the
    dense product of just those rows and columns, and it equals autograd's gradient."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = nn.Linear(200, 300).double()
    bits = torch.zeros(300, 200, dtype=torch.bool)
    rows, cols = list(rows), list(cols)
    pick = torch.rand(len(rows), len(cols), generator=gen) < 0.5
    pick[0, 0] = pick[-1, -1] = True
    bits[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = pick
    mask = Mask.from_dict({"weight": bits, "bias": torch.zeros(300, dtype=torch.bool)})
    x = torch.randn(7, 200, generator=gen, dtype=torch.float64)
    upstream = torch.randn(7, 300, generator=gen, dtype=torch.float64)
    expected = dense_selected_gradients(layer, mask, lambda m: (m(x) * upstream).sum())
    with st.prepare(layer, mask):
        (layer(x) * upstream).sum().backward()
        plan = plan_of(layer.weight)
        assert plan.linear_product == "blocks"
        kept_rows, kept_cols, _ = plan.block_layout()
        assert (kept_rows is not None) == expect_rows and (kept_cols is not None) == expect_cols
        assert_selected_gradients_match(layer, mask, expected)


def test_automatic_choice_takes_the_sampled_product_for_a_wide_sparse_layer():
    """At 0.5% of a 1536 x 384 weight (a MiniLM feed-forward layer) every row and column is
    touched: k dot products cost less than the dense product; at 30% the dense one wins."""
    layer = nn.Linear(384, 1536)
    gen = torch.Generator().manual_seed(0)
    chosen = {}
    for density in (0.005, 0.3):
        bits = torch.rand(1536, 384, generator=gen) < density
        mask = Mask.from_dict({"weight": bits, "bias": torch.zeros(1536, dtype=torch.bool)})
        with st.prepare(layer, mask):
            chosen[density] = plan_of(layer.weight).linear_product
    assert chosen == {0.005: "sampled", 0.3: "blocks"}
    with pytest.raises(st.errors.InvalidArgumentError, match="linear_product must be one of"):
        st.prepare(layer, mask, linear_product="fast")


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_embedding_gradient_equals_dense_gradient(padding_idx, scale_grad_by_freq):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        emb = nn.Embedding(11, 5, padding_idx=padding_idx,
                           scale_grad_by_freq=scale_grad_by_freq).double()
    mask = random_mask(emb, 0.3, seed=1)
    ids = torch.tensor([[1, 2, 2, 7], [2, 10, 1, 1], [0, 3, 2, 5]])  # rows 4, 6, 8, 9 unused
    upstream = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = dense_selected_gradients(emb, mask, lambda m: (m(ids) * upstream).sum())
    with st.prepare(emb, mask):
        (emb(ids) * upstream).sum().backward()
        assert emb.weight.grad.is_sparse
        assert_selected_gradients_match(emb, mask, expected)


def test_whole_tiny_transformer_gradients_equal_dense_gradients():
    model = tiny_bert()
    frozen = ["bert.encoder.layer.0.attention.self.key.weight", "bert.pooler.dense.bias"]
    fixed = {"classifier.bias": True, **dict.fromkeys(frozen, False)}
    mask = random_mask(model, 0.1, seed=3, **fixed)
    batch = bert_batches(1)[0]
    expected = dense_selected_gradients(model, mask, lambda m: m(**batch).loss)
    with st.prepare(model, mask) as handle:
        assert set(handle.frozen) == set(frozen)
        assert {"bert.embeddings.word_embeddings.weight",
                "bert.encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.1.output.dense.weight"} <= set(handle.compact)
        assert handle.fallback == []
        model(**batch).loss.backward()
        assert_selected_gradients_match(model, mask, expected)


def test_real_minilm_gradients_equal_dense_gradients():
    """The embedded MiniLM in float64 (cheap: two short texts), 0.5% random mask, head trained."""
    from sparsetune import data  # installed by the Makefile: a missing model must fail, not skip

    model, tokenizer = data.load_model(2)
    model = model.double()
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    mask = Mask.top_k(scores, 0.005, always_train=data.HEAD_PARAMETERS)
    batch = dict(tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0])
    expected = dense_selected_gradients(model, mask, lambda m: m(**batch).loss)
    covered = {f"{n}.weight" for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Embedding)) and n != "classifier"}
    assert len(covered) == 40  # 6 x 6 + pooler Linear, 3 Embedding
    with st.prepare(model, mask) as handle:
        assert set(handle.compact) == {n for n in covered if bool(mask[n].any())}
        assert handle.fallback == []
        model(**batch).loss.backward()
        assert_selected_gradients_match(model, mask, expected)


def test_gradient_accumulation_and_a_layer_called_twice(make_mlp):
    """Two backward passes accumulate; a Linear used twice in one forward gets both terms."""
    model = make_mlp(seed=4)
    mask = random_mask(model, 0.5, seed=5)

    def loss_fn(m, x):
        hidden = torch.tanh(m.fc1(x))
        return (m.fc2(hidden) ** 2).sum() + (m.fc1(x) ** 3).sum()  # fc1 used twice

    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    expected = dense_selected_gradients(model, mask, lambda m: sum(loss_fn(m, x) for x in xs))
    with st.prepare(model, mask):
        for x in xs:
            loss_fn(model, x).backward()
        assert_selected_gradients_match(model, mask, expected)


# -- training equals the dense masked path --------------------------------------------------------
def _train(model, opt, batches, clip=None):
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        if clip == "torch":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        elif clip == "selected":
            opt.clip_grad_norm_(0.05)
        opt.step()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_twenty_training_steps_equal_the_dense_masked_path(kind):
    model = tiny_bert(seed=1)
    mask = random_mask(model, 0.15, seed=7, **{"classifier.weight": True})
    batches = bert_batches(20, seed=8)
    theta0 = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    if kind == "adamw":
        hyper = dict(lr=0.01, weight_decay=0.1)
        dense = MaskedOptimizer(torch.optim.AdamW(reference.parameters(), **hyper,
                                                  foreach=False), mask, reference)
    else:
        hyper = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
        dense = MaskedOptimizer(torch.optim.SGD(reference.parameters(), **hyper,
                                                foreach=False), mask, reference)
    _train(reference, dense, batches)
    handle = st.prepare(model, mask)
    opt = (SparseAdamW if kind == "adamw" else SparseSGD)(model, mask, **hyper)
    _train(model, opt, batches)
    handle.remove()
    for (name, p), q, p0 in zip(model.named_parameters(), reference.parameters(),
                                theta0.parameters()):
        torch.testing.assert_close(p, q, atol=TOL, rtol=0, msg=name)
        frozen = ~mask[name]
        assert torch.equal(p[frozen], p0[frozen]), f"{name}: a frozen entry moved"
        if bool(mask[name].any()):
            assert not torch.equal(p, p0), f"{name}: no selected entry moved"


def test_clipping_over_selected_entries_equals_the_dense_path():
    """opt.clip_grad_norm_ on compact gradients == torch's clip over the masked dense gradients
    (frozen entries' gradients zeroed first, so both norms cover the selected entries)."""
    model = tiny_bert(seed=2)
    mask = random_mask(model, 0.2, seed=9)
    batches = bert_batches(6, seed=10)
    reference = copy.deepcopy(model)
    dense = SparseAdamW(reference, mask, lr=0.01)
    norms = []
    for batch in batches:
        dense.zero_grad()
        reference(**batch).loss.backward()
        for name, p in reference.named_parameters():
            if p.grad is not None:
                p.grad.mul_(mask[name])
        norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05))
        dense.step()
    with st.prepare(model, mask):
        opt = SparseAdamW(model, mask, lr=0.01)
        for batch, norm in zip(batches, norms):
            opt.zero_grad()
            model(**batch).loss.backward()
            with pytest.raises(NotImplementedError):  # torch cannot clip sparse gradients
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            got = opt.clip_grad_norm_(0.05)
            torch.testing.assert_close(got, norm, atol=TOL, rtol=0)
            assert float(norm) > 0.05  # the clipping did something
            opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=TOL, rtol=0, msg=name)


# -- remove() and errors --------------------------------------------------------------------------
def test_remove_restores_the_model_exactly():
    model = tiny_bert(seed=3)
    mask = random_mask(model, 0.1, seed=11)
    batch = bert_batches(1, seed=12)[0]
    modules_before = list(model.named_modules())
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        logits_before = model(**batch).logits
    handle = st.prepare(model, mask)
    assert any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits_before)  # forward unchanged
    model(**batch).loss.backward()
    handle_compact = list(handle.compact)
    grads = {n: p.grad for n, p in model.named_parameters() if n in handle_compact}
    assert handle_compact and all(g.is_sparse for g in grads.values())
    handle.remove()
    handle.remove()  # twice is harmless
    assert list(model.named_modules()) == modules_before
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits_before)
    for name in handle_compact:  # pending compact gradients became dense, zero when frozen
        grad = dict(model.named_parameters())[name].grad
        assert not grad.is_sparse
        assert torch.equal(grad, grads[name].to_dense())
        assert not bool(grad[~mask[name]].any())


def test_uncovered_layer_falls_back_with_a_warning(make_convnet):
    net = make_convnet()
    mask = random_mask(net, 0.4, seed=13)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    expected = dense_selected_gradients(net, mask, lambda m: m(x).pow(2).sum())
    with pytest.warns(st.SparseGradientFallbackWarning, match=r"0\.weight \(Conv2d\)"):
        handle = st.prepare(net, mask)
    assert handle.fallback == ["0.weight"] and handle.compact == ["3.weight"]
    net(x).pow(2).sum().backward()
    assert not net[0].weight.grad.is_sparse and net[3].weight.grad.is_sparse
    assert_selected_gradients_match(net, mask, expected)
    handle.remove()


def test_weight_used_outside_its_forward_gets_a_warning_and_stays_exact():
    attention = nn.MultiheadAttention(6, 2).double()  # uses out_proj.weight functionally
    mask = random_mask(attention, 0.3, seed=14)
    x = torch.randn(4, 1, 6, dtype=torch.float64)
    expected = dense_selected_gradients(attention, mask, lambda m: m(x, x, x)[0].sum())
    with pytest.warns(st.SparseGradientFallbackWarning, match=r"in_proj_weight \(Multihead"):
        handle = st.prepare(attention, mask)
    with handle:
        assert handle.compact == ["out_proj.weight"]
        attention(x, x, x)[0].sum().backward()
        with pytest.warns(st.SparseGradientFallbackWarning, match="outside its module"):
            assert_selected_gradients_match(attention, mask, expected)


def test_errors_are_clear(make_mlp):
    model = make_mlp(seed=5)
    mask = random_mask(model, 0.5, seed=15)
    with pytest.raises(st.InvalidArgumentError, match=r"nn\.Module"):
        st.prepare(mask, model)
    partial = Mask.from_dict({"fc1.weight": mask["fc1.weight"]})
    with pytest.raises(st.ParameterMismatchError, match=r"fc2\.weight"):
        st.prepare(model, partial)
    handle = st.prepare(model, mask)
    with pytest.raises(st.InvalidArgumentError, match="already in sparse-gradient mode"):
        st.prepare(model, mask)
    model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    masked = MaskedOptimizer(torch.optim.AdamW(model.parameters()), mask, model)
    with pytest.raises(st.InvalidArgumentError, match="needs dense gradients"):
        masked.step()
    other = random_mask(model, 0.5, seed=16)
    with pytest.raises(st.ParameterMismatchError, match="other entries than the mask"):
        SparseAdamW(model, other).step()
    handle.remove()


# -- step-in-backward -----------------------------------------------------------------------------
@pytest.mark.parametrize("sparse_gradients", [False, True])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_step_in_backward_equals_the_ordinary_step(kind, sparse_gradients):
    model = tiny_bert(seed=4)
    mask = random_mask(model, 0.15, seed=17, **{"classifier.weight": True})
    batches = bert_batches(8, seed=18)
    reference = copy.deepcopy(model)

    def build(m):
        if kind == "adamw":
            return SparseAdamW(m, mask, lr=0.01, weight_decay=0.1)
        return SparseSGD(m, mask, lr=0.05, momentum=0.9, weight_decay=0.1)

    ordinary = build(reference)
    _train(reference, ordinary, batches)
    handle = st.prepare(model, mask) if sparse_gradients else None
    opt = build(model)
    with opt.step_in_backward():
        for batch in batches:
            model(**batch).loss.backward()
            assert all(p.grad is None for p in model.parameters()), "gradients were kept"
            opt.step()  # finds no gradient: does nothing
    if handle is not None:
        handle.remove()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=TOL, rtol=0, msg=name)
    for p, q in zip(model.parameters(), reference.parameters()):
        for key, value in ordinary.state[q].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(opt.state[p][key], value, atol=TOL, rtol=0)
            else:
                assert opt.state[p][key] == value
    model(**batches[0]).loss.backward()  # after remove(): gradients are kept again
    assert model.classifier.weight.grad is not None


def test_no_warning_on_a_clean_run():
    model = tiny_bert(seed=5)
    mask = random_mask(model, 0.1, seed=19)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with st.prepare(model, mask):
            opt = SparseAdamW(model, mask, lr=0.01)
            _train(model, opt, bert_batches(2, seed=20))


def test_zero_grad_without_set_to_none_then_backward(make_mlp):
    model = make_mlp(seed=6)
    mask = random_mask(model, 0.5, seed=21)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    expected = dense_selected_gradients(model, mask, lambda m: m(x).pow(2).sum())
    with st.prepare(model, mask):
        opt = SparseSGD(model, mask, lr=0.1)
        model(x * 3).pow(2).sum().backward()
        opt.zero_grad(set_to_none=False)  # sparse gradients are emptied, not freed
        model(x).pow(2).sum().backward()
        assert_selected_gradients_match(model, mask, expected)


def test_selected_gradient_converts_to_the_dtype_asked_for(make_mlp):
    """``dtype`` (or a float32 ``out``) converts dense and compact gradients alike; a 64-bit
    weight has no float32 accumulator, so its values are just converted."""
    model = make_mlp(seed=7)
    mask = random_mask(model, 0.5, seed=23)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(24))
    with st.prepare(model, mask) as handle:
        model(x).pow(2).sum().backward()
        for name, p in model.named_parameters():
            if not bool(mask[name].any()):
                continue
            index = Selection(mask[name], p.device).index
            exact = selected_gradient(p, index)
            assert exact.dtype == torch.float64
            assert (name in handle.compact) == p.grad.is_sparse
            as32 = selected_gradient(p, index, dtype=torch.float32)
            torch.testing.assert_close(as32, exact.float(), atol=0, rtol=0)
            out = torch.empty(exact.numel(), dtype=torch.float32)
            selected_gradient(p, index, out=out)
            torch.testing.assert_close(out, as32, atol=0, rtol=0)
