"""targets= in peft's vocabulary: module-name suffixes and "all-linear", next to regexes.

Reference: peft itself. A LoRA user's ``target_modules`` names the modules peft adapts
(``check_target_module_exists`` for a list, ``_maybe_include_all_linear_layers`` for
"all-linear"); sparsetune's targets are those modules' weights, the tensors LoRA adapts.
"""

from __future__ import annotations

import pytest
import torch

import sparsetune as st
from sparsetune.select import target_names

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import (  # noqa: E402
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)


def _model(kind: str) -> torch.nn.Module:
    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "gpt2":
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                eos_token_id=0))
        if kind == "qwen2":  # q, k and v projections with biases
            return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, tie_word_embeddings=kind == "llama_tied"))


def _peft_modules(model, target_modules) -> set[str]:
    config = peft.LoraConfig(target_modules=target_modules)
    config = _maybe_include_all_linear_layers(config, model)
    return {n for n, _ in model.named_modules() if n and check_target_module_exists(config, n)}


def _weights(model, modules: set[str]) -> list[str]:
    """The parameter names of those modules' weights (a tied weight under its first name)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    wanted = {by_id[id(m.weight)] for n, m in model.named_modules() if n in modules}
    return [n for n in by_id.values() if n in wanted]


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "gpt2"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["o_proj", "down_proj"], ["c_attn"],
                                     ["mlp", "c_fc"], "all-linear", "ALL-LINEAR"])
def test_module_names_and_all_linear_cover_the_weights_of_the_modules_peft_adapts(kind, targets):
    model = _model(kind)
    modules = _peft_modules(model, targets)
    layers = {n for n in modules if getattr(model.get_submodule(n), "weight", None) is not None}
    keys = [targets] if isinstance(targets, str) else targets
    if any(not _peft_modules(model, [k]) & layers for k in keys if k.lower() != "all-linear"):
        # a key naming no layer (none there, or only containers): peft refuses it too
        with pytest.raises(st.ParameterMismatchError, match="matches no trainable parameter"):
            target_names(model, targets)
        return
    names = target_names(model, targets)
    assert names == _weights(model, layers)
    assert all(n.endswith(".weight") for n in names)  # LoRA adapts weights, not biases


def test_all_linear_leaves_out_the_output_head_tied_or_not():
    untied, tied, gpt2 = _model("llama"), _model("llama_tied"), _model("gpt2")
    assert "lm_head.weight" in dict(untied.named_parameters())
    assert "lm_head.weight" not in target_names(untied, "all-linear")
    for model in (tied, gpt2):  # the head is the embedding: neither is a linear target
        names = target_names(model, "all-linear")
        assert not any("embed" in n or "wte" in n for n in names)
    conv1d = transformers.pytorch_utils.Conv1D
    assert {n for n in target_names(gpt2, "all-linear")} == {
        f"{n}.weight" for n, m in gpt2.named_modules() if isinstance(m, conv1d)}


def test_a_tied_module_name_is_the_one_parameter_under_its_first_name():
    gpt2 = _model("gpt2")
    assert target_names(gpt2, ["lm_head"]) == ["transformer.wte.weight"]
    assert target_names(gpt2, ["lm_head", "wte"]) == ["transformer.wte.weight"]


def test_regexes_keep_their_meaning_and_mix_with_module_names():
    model = _model("qwen2")
    # a regex covers whatever it matches, biases too; an identifier is a module's weight
    assert target_names(model, r"q_proj\.") == [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
        "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.bias"]
    assert target_names(model, "q_proj") == [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    mixed = target_names(model, ["v_proj", r"layers\.1\.self_attn\.q_proj\.bias$"])
    assert mixed == ["model.layers.0.self_attn.v_proj.weight",
                     "model.layers.1.self_attn.q_proj.bias",
                     "model.layers.1.self_attn.v_proj.weight"]
    # a dotted module path is a regex (peft reads it as a suffix): weight and bias
    assert target_names(model, ["self_attn.k_proj"]) == [
        n for n, _ in model.named_parameters() if "self_attn.k_proj" in n]


def test_select_places_the_budget_on_lora_targets_of_a_llama():
    model = _model("qwen2")
    mask = st.select(model, "random", 0.01, seed=0, targets=["q_proj", "v_proj"])
    touched = {n for n, t in mask.items() if t.any()}
    assert touched and touched <= set(target_names(model, ["q_proj", "v_proj"]))
    assert mask.num_selected == st.budget_size(mask.num_total, 0.01)
    assert st.select(model, "magnitude", 0.01, targets="all-linear") == st.select(
        model, "magnitude", 0.01, targets=target_names(model, "all-linear"))


def test_module_name_errors_say_what_the_rule_is():
    model = _model("llama")
    with pytest.raises(st.ParameterMismatchError, match=r"no module is named 'nope'.*regex"):
        target_names(model, ["q_proj", "nope"])
    with pytest.raises(st.ParameterMismatchError, match=r"LlamaAttention.*no trainable weight"):
        target_names(model, ["self_attn"])
    with pytest.raises(st.InvalidArgumentError, match="must be a string"):
        target_names(model, ["q_proj", 3])
    with pytest.raises(st.InvalidArgumentError, match="only always_train"):
        st.select(model, "random", 0.01, targets="lm_head", always_train=["lm_head.weight"])
    frozen = _model("llama")
    for p in frozen.model.layers.parameters():
        p.requires_grad_(False)
    with pytest.raises(st.ParameterMismatchError, match="matches no trainable parameter"):
        target_names(frozen, ["q_proj"])
    with pytest.raises(st.ParameterMismatchError, match="'all-linear' matches no trainable"):
        target_names(frozen, "all-linear")  # what is left is the head
