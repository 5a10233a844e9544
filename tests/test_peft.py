"""peft adapters and LoRA as sparse tuning of an equivalent model: methods "lora" and "adapter".

References: peft's own ``requires_grad`` flags (peft marks exactly the active adapters' weights
and the ``modules_to_save`` copies trainable), the base model's outputs (equivalence at
initialisation), torch.optim.AdamW on peft's trainable parameters, and ``merge_and_unload``.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import peft
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import sparsetune as st
from sparsetune import data as st_data
from sparsetune.integrations import MissingDependencyError
from sparsetune.integrations.peft import adapter_mask, added_parameter_names, lora_delta

CONFIG = BertConfig(
    vocab_size=60,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    num_labels=3,
)


def tiny_bert(dtype=torch.float64) -> BertForSequenceClassification:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertForSequenceClassification(CONFIG).to(dtype).eval()


def batch(n=5, length=9, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 60, (n, length), generator=gen),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "labels": torch.randint(0, 3, (n,), generator=gen),
    }


def wrap(base, config):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return peft.get_peft_model(copy.deepcopy(base), config).eval()


pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

LORA = dict(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])
CONFIGS = {
    "lora": lambda: peft.LoraConfig(**LORA),
    "dora+embedding": lambda: peft.LoraConfig(
        task_type="SEQ_CLS", r=2, target_modules=["key", "word_embeddings"], use_dora=True
    ),
    "ia3": lambda: peft.IA3Config(
        task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
        feedforward_modules=["output.dense"],
    ),
    "loha": lambda: peft.LoHaConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]),
}
LORA_FAMILY = {"lora", "dora+embedding"}


def expected_split(model) -> tuple[set[str], set[str]]:
    """(added, head) from peft's requires_grad flags: the reference for the mask."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if ".modules_to_save." in n}
    return trainable - head, head


def test_methods_are_registered_by_importing_sparsetune_without_importing_peft():
    code = (
        "import sys, sparsetune as st; from sparsetune.select import method_info; "
        "assert 'lora' in st.METHODS and 'adapter' in st.METHODS, st.METHODS; "
        "assert 'peft' not in sys.modules and 'transformers' not in sys.modules; "
        "assert method_info('lora').family == method_info('adapter').family == 'rule'; "
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mask_selects_exactly_the_added_entries(name):
    model = wrap(tiny_bert(), CONFIGS[name]())
    method = "lora" if name in LORA_FAMILY else "adapter"
    mask = st.select(model, method)
    added, head = expected_split(model)
    assert added, "the configuration added nothing"
    assert set(mask.always_train) == head
    for n in mask:
        assert bool(mask[n].all()) if n in added | head else not bool(mask[n].any()), n
    trainable, total = model.get_nb_trainable_parameters()
    head_entries = sum(model.get_parameter(n).numel() for n in head)
    assert mask.num_selected == trainable - head_entries
    assert mask.num_trainable == trainable
    assert mask.num_total + mask.num_always_trained == total
    if name in LORA_FAMILY:  # every LoRA layer is a peft tuner layer too
        assert st.select(model, "adapter") == mask


def test_only_active_adapters_are_selected():
    model = wrap(tiny_bert(), peft.LoraConfig(**LORA))
    model.add_adapter("other", peft.LoraConfig(task_type="SEQ_CLS", r=3, target_modules=["key"]))
    for active in ("default", "other"):
        model.set_adapter(active)
        mask = st.select(model, "lora")
        added, head = expected_split(model)
        assert {n for n in mask if mask[n].all()} == added | head
        assert all(f".{active}." in n for n in added)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_wrapped_model_is_equivalent_to_the_base_at_initialisation(name):
    base = tiny_bert()
    model = wrap(base, CONFIGS[name]())
    x = {k: v for k, v in batch().items() if k != "labels"}
    torch.testing.assert_close(model(**x).logits, base(**x).logits, rtol=0, atol=1e-12)


def test_lora_on_the_embedded_minilm_computes_the_base_function():
    base, tokenizer = st_data.load_model(2)
    model = wrap(base, peft.LoraConfig(**LORA))
    task = st_data.load_task("rotten_tomatoes", max_examples=64)
    inputs = next(iter(st_data.batches(task.train, tokenizer, batch_size=8, max_length=32)))
    inputs.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits,
                                   rtol=1e-6, atol=1e-6)
    mask = st.select(model, "lora")
    added, head = expected_split(model)
    assert mask.num_selected == sum(model.get_parameter(n).numel() for n in added)
    assert mask.num_selected == 2 * 6 * 2 * (384 * 2)  # 2 modules x 6 layers x (A + B), r = 2
    assert head == {f"base_model.model.{n}".replace("classifier.", "classifier.modules_to_save."
                                                    "default.") for n in st_data.HEAD_PARAMETERS}


@pytest.mark.parametrize("wrapper", ["sparse_adamw", "masked"])
def test_masked_optimizers_train_a_peft_model_like_adamw_on_its_trainable_parameters(wrapper):
    model = wrap(tiny_bert(), peft.LoraConfig(**LORA))
    with torch.no_grad():  # B != 0, so that A gets gradients from the first step
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    reference = copy.deepcopy(model)
    before = copy.deepcopy(model)
    mask = st.select(model, "lora")
    hyper = dict(lr=0.05, weight_decay=0.1)
    if wrapper == "sparse_adamw":
        opt = st.SparseAdamW(model, mask, **hyper)
    else:
        inner = torch.optim.AdamW(model.parameters(), foreach=False, **hyper)
        opt = st.MaskedOptimizer(inner, mask, model)
    ref_opt = torch.optim.AdamW(
        [p for p in reference.parameters() if p.requires_grad], foreach=False, **hyper
    )
    for step in range(4):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(**batch(seed=step)).loss.backward()
            o.step()
    for (n, p), q, b in zip(model.named_parameters(), reference.parameters(),
                            before.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=n)
        if not mask[n].any():
            assert torch.equal(p, b), n
        else:
            assert not torch.equal(p, b), n


def test_lora_delta_is_what_merge_and_unload_writes():
    base = tiny_bert()
    model = wrap(base, peft.LoraConfig(lora_alpha=4, **LORA))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    delta = lora_delta(model)
    merged = copy.deepcopy(model).merge_and_unload()
    rebuilt = delta.apply_to(copy.deepcopy(base))
    for (n, p), (m, q) in zip(rebuilt.named_parameters(), merged.named_parameters(), strict=True):
        assert n == m
        if not n.startswith("classifier."):  # the head is replaced by its copy, not merged
            assert torch.equal(p, q), n
    # Dense change: scaling * B A on each adapted weight, and nothing else.
    dense = delta.to_dense()
    layer = model.base_model.model.bert.encoder.layer[1].attention.self.query
    expected = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * (4 / 2)
    torch.testing.assert_close(dense["bert.encoder.layer.1.attention.self.query.weight"],
                               expected.detach(), rtol=1e-12, atol=1e-12)
    assert set(delta.names) == {f"bert.encoder.layer.{i}.attention.self.{m}.weight"
                                for i in (0, 1) for m in ("query", "value")}
    assert delta.num_entries == 4 * 16 * 16


def test_lora_refuses_models_without_lora_layers():
    with pytest.raises(st.InvalidArgumentError, match="no LoRA layers"):
        st.select(wrap(tiny_bert(), CONFIGS["ia3"]()), "lora")
    with pytest.raises(st.InvalidArgumentError, match="no peft tuner layers"):
        st.select(tiny_bert(), "adapter")
    with pytest.raises(st.InvalidArgumentError, match="no LoRA layer"):
        lora_delta(tiny_bert())
    with pytest.raises(st.InvalidArgumentError, match="DoRA"):
        lora_delta(wrap(tiny_bert(), CONFIGS["dora+embedding"]()))


def test_trainable_base_parameters_must_be_named():
    model = wrap(tiny_bert(), peft.LoraConfig(bias="all", **LORA))
    with pytest.raises(st.InvalidArgumentError, match="bias='all'"):
        st.select(model, "lora")
    biases = [n for n, p in model.named_parameters()
              if p.requires_grad and n.endswith("bias") and "modules_to_save" not in n]
    mask = st.select(model, "lora", always_train=biases)
    assert set(biases) <= set(mask.always_train)


def test_rule_methods_take_no_density_and_check_their_kind():
    model = wrap(tiny_bert(), peft.LoraConfig(**LORA))
    with pytest.raises(st.InvalidArgumentError, match="takes no density"):
        st.select(model, "lora", density=0.1)
    with pytest.raises(st.InvalidArgumentError, match="kind must be one of"):
        added_parameter_names(model, "prefix")
    with pytest.raises(st.InvalidArgumentError, match="lacks"):
        adapter_mask(model, "lora", always_train=["no.such.parameter"])


def test_missing_peft_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(MissingDependencyError, match="pip install peft"):
        st.select(tiny_bert(), "lora")
