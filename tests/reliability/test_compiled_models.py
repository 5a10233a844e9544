"""``torch.compile(model)`` is accepted wherever a model is taken (issue 20, "Optimizer contract").

A compiled model names its parameters ``_orig_mod.NAME``; sparsetune reads it through the module
it wraps, so masks, optimizers, sparse gradients and deltas use (and store) the plain names and
give the same results as on the plain model. ``backend="eager"`` keeps these tests fast: it runs
dynamo's tracing (what changes the names) without a compiler.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsetune as st
from sparsetune import Mask, SparseDelta
from sparsetune._checks import unwrap_compiled

HEAD = ["2.weight", "2.bias"]


def _model(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="eager")


def _data(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 6, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (5,), generator=gen)) for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _plain_names(mask: Mask) -> bool:
    return not any("_orig_mod" in n for n in mask)


def test_unwrap_compiled_gives_the_module_it_wraps():
    model = _model()
    assert unwrap_compiled(model) is model
    assert unwrap_compiled(_compiled(model)) is model
    assert unwrap_compiled("not a module") == "not a module"


@pytest.mark.parametrize("method, options", [
    ("random", {}), ("magnitude", {}), ("sam", {}), ("child_pruning", {}),
    ("lt_sft", {"steps": 2}), ("sam_curvature", {"num_samples": 1}),
])
def test_masks_selected_on_a_compiled_model_equal_the_plain_models(method, options):
    data = {"data": _data(), "loss_fn": _loss, "progress": False} if method not in (
        "random", "magnitude") else {}
    plain = st.select(_model(), method, 0.2, always_train=HEAD, **data, **options)
    compiled = _compiled(_model())
    mask = st.select(compiled, method, 0.2, always_train=HEAD, targets=r"^0\.", **data,
                     **options) if method != "sam_curvature" else None
    assert mask is None or _plain_names(mask)
    mask = st.select(compiled, method, 0.2, always_train=HEAD, **data, **options)
    assert _plain_names(mask)
    assert mask == plain
    mask.check(_model())  # it loads into the plain model


def test_mask_builders_files_and_checks_take_a_compiled_model(tmp_path):
    model = _model()
    compiled = _compiled(model)
    assert Mask.full(compiled) == Mask.full(model) and _plain_names(Mask.full(compiled))
    assert Mask.empty(compiled, always_train=HEAD) == Mask.empty(model, always_train=HEAD)
    mask = st.select(model, "random", 0.3)
    assert mask.check(compiled) is mask
    mask.save(tmp_path / "m.safetensors", model=compiled)
    assert Mask.load(tmp_path / "m.safetensors", model=model) == mask
    assert Mask.load(tmp_path / "m.safetensors", model=compiled) == mask


def _train(optimizer_cls, model: nn.Module, forward: nn.Module, mask: Mask, **kwargs):
    opt = optimizer_cls(forward, mask, lr=0.05, **kwargs)
    for batch in _data(4):
        opt.zero_grad()
        _loss(forward, batch).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer_cls", [st.SparseAdamW, st.SparseSGD])
def test_sparse_optimizers_on_a_compiled_model_equal_the_plain_model(optimizer_cls):
    mask = st.select(_model(), "random", 0.3, always_train=HEAD)
    kwargs = {"momentum": 0.9} if optimizer_cls is st.SparseSGD else {}
    plain = _model()
    expected = _train(optimizer_cls, plain, plain, mask, **kwargs)
    model = _model()
    got = _train(optimizer_cls, model, _compiled(model), mask, **kwargs)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(got[n], p) for n, p in _model().named_parameters())


def test_prepare_takes_a_compiled_model():
    mask = st.select(_model(), "random", 0.3, always_train=HEAD)
    results = []
    for compile_it in (False, True):
        model = _model()
        forward = _compiled(model) if compile_it else model
        handle = st.prepare(forward, mask)
        try:
            _loss(forward, _data(1)[0]).backward()
            results.append({n: p.grad.to_dense().clone() for n, p in model.named_parameters()})
        finally:
            handle.remove()
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], msg=name)


def test_deltas_extract_and_apply_through_a_compiled_model():
    mask = st.select(_model(), "random", 0.3, always_train=HEAD)
    base = _model()
    base_state = {n: t.clone() for n, t in base.state_dict().items()}
    tuned = copy.deepcopy(base)
    _train(st.SparseAdamW, tuned, tuned, mask)
    expected = SparseDelta.extract(tuned, base_state, mask)
    delta = SparseDelta.extract(_compiled(tuned), base_state, mask)
    assert delta.names == expected.names and not any("_orig_mod" in n for n in delta.names)
    fresh = _model()
    delta.apply_to(_compiled(fresh))
    for (name, p), q in zip(fresh.named_parameters(), tuned.parameters(), strict=True):
        assert torch.equal(p, q), name
    expected.revert_from(_compiled(fresh))
    for (name, p), q in zip(fresh.named_parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_sparse_trainer_takes_a_compiled_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sparsetune.integrations.transformers import SparseTrainer

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 50, (8,), generator=gen),
             "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.randint(0, 2, (), generator=gen)} for _ in range(8)]
    head = ["classifier.weight", "classifier.bias"]

    def bert():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return transformers.BertForSequenceClassification(config)

    def train(model, out, compile_it):
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
            report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="steps", save_steps=2,
            seed=0, remove_unused_columns=False)  # the Trainer reads a compiled forward as **kw
        trainer = SparseTrainer(model=_compiled(model) if compile_it else model, args=args,
                                train_dataset=data, method="sam", density=0.05,
                                always_train=head, selection_batches=2,
                                selection_options={"progress": False})
        trainer.train()
        return trainer

    plain, compiled = bert(), bert()
    expected = train(plain, tmp_path / "plain", False)
    got = train(compiled, tmp_path / "compiled", True)
    assert got.sparse_mask == expected.sparse_mask and _plain_names(got.sparse_mask)
    for (name, p), q in zip(compiled.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    saved = Mask.load(tmp_path / "compiled" / "checkpoint-2" / "sparse_mask.safetensors")
    assert saved == expected.sparse_mask


def test_masked_optimizer_takes_a_compiled_model():
    mask = st.select(_model(), "random", 0.3, always_train=HEAD)
    runs = []
    for compile_it in (False, True):
        model = _model()
        opt = st.MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), mask,
                                 _compiled(model) if compile_it else model)
        for batch in _data():
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in runs[0]:
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=0, atol=0, msg=name)
