"""Decoder LLMs end to end, on tiny shapes (issue 22): Llama (tied and untied embeddings), GPT-2
(Conv1D layers, tied lm_head/wte), Qwen2 and Mistral.

Every applicable method selects with the default loss (causal LM on token batches, no labels),
training with SparseAdamW and under ``st.prepare`` moves only the mask (frozen entries bit-
identical), and the extracted delta rebuilds the tuned model bit for bit from a fresh base.
Models run in float64 so that prepare's sparse gradients can be held to the dense ones tightly.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import sparsetune as st
from sparsetune._loss import is_causal_lm, transformers_loss
from sparsetune.select import method_spec

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attn_implementation="eager")
    if kind in ("llama", "llama_tied"):
        return transformers.LlamaConfig(**common, tie_word_embeddings=kind == "llama_tied")
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=False)
    if kind == "mistral":
        return transformers.MistralConfig(**common, tie_word_embeddings=False)
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                   n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                   attn_implementation="eager")


def _model(kind: str, seed: int = 0) -> torch.nn.Module:
    config = _config(kind)
    cls = (transformers.GPT2LMHeadModel if kind == "gpt2"
           else transformers.AutoModelForCausalLM._model_mapping[type(config)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).double()


def _batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Token batches without labels, the second row right-padded."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (2, 8), generator=gen)
        attention = torch.ones_like(ids)
        attention[1, 5:] = 0
        out.append({"input_ids": ids.masked_fill(attention == 0, 0), "attention_mask": attention})
    return out


KINDS = ["llama", "llama_tied", "gpt2", "qwen2", "mistral"]
OPTIONS = {
    "names": {"include": r"(layers|h)\.0\."},
    "child_pruning": {"num_batches": 2}, "sam": {"num_batches": 2},
    "sam_curvature": {"num_batches": 1, "num_samples": 2},  # hutchinson: not per-example
    "lt_sft": {"steps": 2}, "diff_pruning": {"steps": 2},
}
PEFT_ONLY = ("lora", "adapter")  # they select the adapters of a peft model: tests/test_peft.py


def mask_names(model):
    return [n for n, _ in model.named_parameters()]


def _state(model):
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}


# -- the default loss: next-token prediction, no labels needed ---------------------------------
def test_default_loss_of_a_causal_lm_is_next_token_cross_entropy_over_unpadded_tokens():
    model = _model("llama").eval()
    [batch] = _batches(1)
    kept = {k: v.clone() for k, v in batch.items()}
    loss = transformers_loss(model, batch)
    logits = model(**batch).logits
    targets = batch["input_ids"][:, 1:]
    valid = batch["attention_mask"][:, 1:] == 1
    # transformers takes the cross-entropy of the logits in float32
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1][valid].float(), targets[valid])
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)
    assert batch.keys() == kept.keys() and all(torch.equal(batch[k], kept[k]) for k in kept)
    # labels given by the caller are used as they are
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, :3] = batch["input_ids"][:, :3]
    given = transformers_loss(model, {**batch, "labels": labels})
    torch.testing.assert_close(given, model(**batch, labels=labels).loss)
    assert not torch.allclose(given, loss)


def test_only_causal_lms_get_labels_built_for_them():
    assert is_causal_lm(_model("gpt2")) and is_causal_lm(_model("qwen2"))
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=2))
    assert not is_causal_lm(bert)
    with pytest.raises(st.InvalidArgumentError, match="returned no loss"):
        transformers_loss(bert, {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    with pytest.raises(st.InvalidArgumentError, match="input_ids"):
        transformers_loss(_model("llama"), {"inputs_embeds": torch.zeros(1, 4, 32)})


# -- every method, every model -----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_every_method_selects_on_a_decoder_with_the_default_loss(kind):
    model = _model(kind)
    data = _batches()
    before = _state(model)
    for method in st.METHODS:
        spec = method_spec(method)
        density = 0.05 if spec.uses_density else None
        if method in PEFT_ONLY:
            continue
        if spec.optimizer is not None:  # per-step methods are optimizers, not masks
            with pytest.raises(st.InvalidArgumentError):
                st.select(model, method, density, data=data)
            continue
        if method == "bitfit" and not any(n.endswith("bias") for n in mask_names(model)):
            with pytest.raises(st.InvalidArgumentError, match="bias"):  # Llama, Mistral
                st.select(model, method)
            continue
        mask = st.select(model, method, density, data=data, seed=2, **OPTIONS.get(method, {}))
        mask.check(model, complete=True)
        assert mask.num_selected > 0, method
        if spec.uses_density:
            assert mask.num_selected == st.budget_size(mask.num_total, 0.05), method
    after = _state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_peft_methods_on_a_lora_llama_and_the_default_loss_through_peft(task_type):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type=task_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = peft.get_peft_model(_model("llama"), config)
    assert is_causal_lm(model)  # PeftModel or PeftModelForCausalLM around a LlamaForCausalLM
    lora = st.select(model, "lora")
    assert lora == st.select(model, "adapter")
    assert {n for n, t in lora.items() if t.any()} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    mask = st.select(model, "sam", 0.5, data=_batches(2), num_batches=2)  # lora_A/B only
    assert mask.num_selected == st.budget_size(mask.num_total, 0.5)


# -- training, prepare, delta ------------------------------------------------------------------
def _train(model, mask, data, sparse: bool):
    opt = st.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st.SparseGradientFallbackWarning)
        handle = st.prepare(model, mask) if sparse else None
    try:
        for batch in data:
            opt.zero_grad()
            transformers_loss(model, batch).backward()
            opt.step()
    finally:
        if handle is not None:
            handle.remove()
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_train_with_sparse_adamw_and_prepare_then_ship_the_delta(kind):
    base = _model(kind)
    data = _batches(3, seed=4)
    gpt2 = kind == "gpt2"
    # peft's vocabulary: every Linear/Conv1D weight but the head, and the (maybe tied) embedding
    targets = ["all-linear", "wte" if gpt2 else "embed_tokens"]
    head = ["transformer.ln_f.weight" if gpt2 else "model.norm.weight"]
    mask = st.select(base, "sam", 0.05, data=data, num_batches=2, targets=targets,
                     always_train=head)
    embedding = "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"
    assert mask[embedding].any()
    theta0 = _state(base)
    dense = _train(copy.deepcopy(base), mask, data, sparse=False)
    sparse = _train(copy.deepcopy(base), mask, data, sparse=True)
    for tuned in (dense, sparse):
        for name, p in tuned.named_parameters():
            frozen = ~mask[name]
            assert torch.equal(p.detach()[frozen], theta0[name][frozen]), name
        moved = sum(int((p.detach() != theta0[n]).sum()) for n, p in tuned.named_parameters())
        assert moved > 0
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    delta = st.SparseDelta.extract(dense, theta0, mask, method="sam")
    fresh = delta.apply_to(_model(kind))
    for (name, a), b in zip(dense.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    if kind in ("gpt2", "llama_tied"):  # the tie survives training and the delta
        assert fresh.get_output_embeddings().weight is fresh.get_input_embeddings().weight


def test_gpt2_ties_lm_head_and_wte_as_one_parameter_in_the_mask():
    model = _model("gpt2")
    mask = st.select(model, "sam", 0.05, data=_batches(2), num_batches=2)
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "lm_head.weight" not in mask
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "transformer.wte.weight" in mask


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_per_example_curvature_of_a_causal_lm_uses_the_next_token_loss(kind):
    """sam_curvature with a per-example method (ggn) replaces the default loss by its
    OutputLoss: for a causal LM that is the shifted next-token loss, equal to the model's own
    (which transformers computes in float32 even for a float64 model: hence rtol 1e-6)."""
    from sparsetune.curvature import OutputLoss

    model = _model(kind)
    for batch in _batches(2):
        torch.testing.assert_close(OutputLoss.causal_lm()(model, batch).double(),
                                   transformers_loss(model, batch).double(), rtol=1e-6, atol=0)
        labelled = {**batch, "labels": batch["input_ids"].masked_fill(
            batch["attention_mask"] == 0, -100)}
        torch.testing.assert_close(OutputLoss.causal_lm()(model, labelled).double(),
                                   model(**labelled).loss.double(), rtol=1e-6, atol=0)
    mask = st.select(model, "sam_curvature", 0.05, data=_batches(1), num_batches=1,
                     curvature_method="ggn", seed=0)
    assert mask.num_selected == st.budget_size(mask.num_total, 0.05)
