"""FSDP2 on real transformers models: a tiny Llama and the embedded MiniLM, two gloo ranks.

Tiny Llama (float64, 2 decoder layers, every dim-0 size odd so the shards are uneven), each
decoder layer ``fully_shard``ed, then the root: ``select_distributed`` ("magnitude" and "sam"
on two token batches, each rank feeding its half of every batch) must give the digest of
``st.select`` on the unsharded model with the whole batches; then three SparseAdamW steps on
the sam mask, and ``save_delta`` on rank 0 must write the very file (byte for byte) one process
writes after the same training on the concatenated batches, frozen entries bit-identical.

MiniLM (the embedded BERT classifier, in float64), each encoder layer sharded, then the root:
three SparseAdamW steps on a random mask with the classifier always trained must give the
gathered parameters of one process on the concatenated batches to 1e-12, frozen entries
bit-identical. Why not float32: the gradient of an attention key bias is exactly zero in
theory (softmax ignores a shift shared by all keys), so what backward returns there is rounding
noise, which Adam normalises into steps of size ~lr; two float32 runs that sum the gradient in
another order (one process, or each rank its half then the reduce-scatter) differ there by
~1e-5 (relative 1e-2) after three steps, whatever the optimizer does. In float64 that noise is
~1e-17, far below Adam's epsilon.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from fsdp_helpers import init, outcome, run_ranks
from torch import nn

import sparsetune as st
from sparsetune.integrations.distributed import select_distributed
from sparsetune.integrations.fsdp import save_delta

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)

WORLD = 2
STEPS = 3
LLAMA_VOCAB = 41
SELECT = {  # method -> (density, options)
    "magnitude": (0.02, dict(always_train=["model.norm.weight"])),
    "sam": (0.02, dict(always_train=["model.norm.weight"], max_grad_norm=0.5)),
    "sam_curvature": (0.02, dict(always_train=["model.norm.weight"], num_samples=2,
                                 curvature_method="finite_difference")),
}
HYPER = dict(lr=0.01, weight_decay=0.1)
CLASSIFIER = ["classifier.weight", "classifier.bias"]


# -- tiny Llama -------------------------------------------------------------------------------
def make_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=36, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=LLAMA_VOCAB, max_position_embeddings=16,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).double()


def llama_batches(first: int, count: int, rank: int = 0, world: int = 1) -> list[dict]:
    """Global batches ``first ..`` of 4 sequences of 6 tokens (no labels: next-token loss);
    of ``world`` ranks, rank r takes rows ``[4r/world, 4(r+1)/world)``."""
    per = 4 // world
    out = []
    for step in range(first, first + count):
        ids = torch.randint(0, LLAMA_VOCAB, (4, 6), generator=torch.Generator().manual_seed(step))
        out.append({"input_ids": ids[per * rank: per * rank + per]})
    return out


def train_llama(model: nn.Module, mask: st.Mask, rank: int = 0, world: int = 1) -> None:
    opt = st.SparseAdamW(model, mask, **HYPER)
    for batch in llama_batches(10, STEPS, rank, world):
        opt.zero_grad()
        ids = batch["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()  # equal token counts on every rank
        opt.clip_grad_norm_(1.0)
        opt.step()


def shard_layers(model: nn.Module, layers: nn.ModuleList, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _llama_worker(rank: int, world: int, folder: str) -> None:
    mesh = init(rank, world, folder)
    out: dict = {}
    masks = {}
    for method, (density, options) in SELECT.items():
        model = make_llama()
        model = shard_layers(model, model.model.layers, mesh)
        masks[method] = select_distributed(model, method, density,
                                           data=llama_batches(0, 2, rank, world), **options)
        out[method] = masks[method].digest()
    model = make_llama()
    model = shard_layers(model, model.model.layers, mesh)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_llama(model, masks["sam"], rank, world)
    out["weights"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    out["saved"] = str(save_delta(f"{folder}/sharded.safetensors", model, base, masks["sam"],
                                  method="sam"))
    mlp_mask = st.select(nn.Linear(3, 2), "random", 0.5, progress=False)  # another model's
    out["other_optimizer"] = outcome(lambda: st.SparseAdamW(model, mlp_mask, lr=0.1))
    out["other_delta"] = outcome(lambda: save_delta(f"{folder}/x", model, base, mlp_mask))
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def llama_ranks(tmp_path_factory) -> tuple[list[dict], object]:
    folder = tmp_path_factory.mktemp("fsdp2_llama")
    return run_ranks(_llama_worker, WORLD, folder), folder


def _one_process_mask(method: str) -> st.Mask:
    density, options = SELECT[method]
    return st.select(make_llama(), method, density, data=llama_batches(0, 2), progress=False,
                     **options)


@pytest.mark.parametrize("method", list(SELECT))
def test_llama_sharded_selection_equals_one_process(llama_ranks, method):
    outs, _ = llama_ranks
    expected = _one_process_mask(method)
    assert 0 < expected.num_trainable < expected.num_total
    for out in outs:
        assert out[method] == expected.digest(), method


def test_llama_training_and_delta_equal_one_process(llama_ranks):
    outs, folder = llama_ranks
    mask = _one_process_mask("sam")
    model, base = make_llama(), make_llama()
    train_llama(model, mask)
    for out in outs:
        for name, p in model.named_parameters():
            got = out["weights"][name]
            torch.testing.assert_close(got, p.detach(), rtol=0, atol=1e-12)
            assert torch.equal(got[~mask[name]], base.get_parameter(name)[~mask[name]])
    assert not torch.equal(model.model.norm.weight, base.model.norm.weight)
    assert outs[0]["saved"] == str(folder / "sharded.safetensors") and outs[1]["saved"] == "None"
    # The single-process delta of the model holding the gathered weights: the same file.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(outs[0]["weights"][name])
    one = st.SparseDelta.extract(model, base.state_dict(), mask, method="sam")
    written = one.save(folder / "one_process.safetensors").read_bytes()
    assert (folder / "sharded.safetensors").read_bytes() == written
    loaded = st.SparseDelta.load(folder / "sharded.safetensors")
    assert all(torch.equal(s, mask[n]) for n, s in loaded.support().items())


def test_llama_mask_of_another_model_is_refused_on_every_rank(llama_ranks):
    outs, _ = llama_ranks
    for out in outs:
        for key in ("other_optimizer", "other_delta"):
            assert out[key] == outs[0][key], key  # the same error on every rank
            assert out[key].startswith("ParameterMismatchError: "), out[key]
            assert "mask does not fit FSDPLlamaForCausalLM (21 parameters): names the model " \
                   "lacks: ['weight', 'bias']" in out[key], out[key]


# -- embedded MiniLM --------------------------------------------------------------------------
def make_minilm() -> nn.Module:
    from sparsetune.data import load_pretrained

    model, _ = load_pretrained(None, num_labels=2, seed=0)  # eval mode: no dropout
    return model.double()


def minilm_mask(model: nn.Module) -> st.Mask:
    return st.select(model, "random", 0.005, seed=7, always_train=CLASSIFIER, progress=False)


def minilm_batch(step: int, rank: int = 0, world: int = 1) -> dict:
    """Global batch ``step``: 4 sequences of 12 tokens with a padded tail, 2 labels."""
    gen = torch.Generator().manual_seed(300 + step)
    ids = torch.randint(1000, 30000, (4, 12), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 9:] = attention[3, 7:] = 0
    labels = torch.tensor([0, 1, 1, 0])
    per = 4 // world
    rows = slice(per * rank, per * rank + per)
    return {"input_ids": ids[rows], "attention_mask": attention[rows], "labels": labels[rows]}


def train_minilm(model: nn.Module, mask: st.Mask, rank: int = 0, world: int = 1) -> None:
    opt = st.SparseAdamW(model, mask, lr=1e-3, weight_decay=0.01)
    for step in range(STEPS):
        opt.zero_grad()
        model(**minilm_batch(step, rank, world)).loss.backward()  # mean of equal halves
        opt.step()


def _minilm_worker(rank: int, world: int, folder: str) -> None:
    mesh = init(rank, world, folder)
    model = make_minilm()
    mask = minilm_mask(model)
    model = shard_layers(model, model.bert.encoder.layer, mesh)
    train_minilm(model, mask, rank, world)
    weights = {n: p.full_tensor().detach() for n, p in model.named_parameters()}  # collective
    torch.save({"weights": weights} if rank == 0 else {}, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # 28-42 s on 2 busy cores: MiniLM loads in both ranks and here
def test_minilm_sharded_training_equals_one_process(tmp_path):
    # rank 0's gather; 20-30 s of the ranks' time loading MiniLM on 2 busy cores
    weights = run_ranks(_minilm_worker, WORLD, tmp_path, timeout=120)[0]["weights"]
    model, base = make_minilm(), make_minilm()
    mask = minilm_mask(base)
    train_minilm(model, mask)
    assert set(weights) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(weights[name], p.detach(), rtol=0, atol=1e-12)
        assert torch.equal(weights[name][~mask[name]], base.get_parameter(name)[~mask[name]])
    assert all(not torch.equal(model.get_parameter(n), base.get_parameter(n)) for n in CLASSIFIER)


# -- SparseTrainer ----------------------------------------------------------------------------
def test_sparse_trainer_refuses_fsdp_with_one_clear_error(tmp_path, monkeypatch):
    """accelerate 1.15 builds the optimizer before fully_shard and swaps its parameters (which
    SparseAdamW's state cannot follow), and on the CPU it ignores FSDP and runs DDP: refused,
    before the Trainer's accelerator is built (it would set ACCELERATE_USE_FSDP for the process)."""
    from sparsetune.errors import InvalidArgumentError
    from sparsetune.integrations.fsdp import TRAINER_FSDP_REFUSAL
    from sparsetune.integrations.transformers import SparseTrainer

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)

    def args(**fsdp):
        return transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                              report_to=[], **fsdp)

    fsdp2 = args(fsdp=True, fsdp_config={"version": 2})
    with pytest.raises(InvalidArgumentError) as caught:
        SparseTrainer(model=make_llama(), args=fsdp2, method="random", density=0.1)
    assert str(caught.value) == TRAINER_FSDP_REFUSAL
    assert "swaps its parameters" in TRAINER_FSDP_REFUSAL and "fsdp.save_delta" in str(caught.value)
    with pytest.raises(InvalidArgumentError, match="does not support FSDP"):
        SparseTrainer(make_llama(), fsdp2, method="random", density=0.1)  # positional args
    assert "ACCELERATE_USE_FSDP" not in os.environ
    trainer = SparseTrainer(model=make_llama(), args=args(), method="random", density=0.1)
    assert not trainer.is_fsdp_enabled
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch --use_fsdp`
    with pytest.raises(InvalidArgumentError, match="does not support FSDP"):
        SparseTrainer(model=make_llama(), args=args(), method="random", density=0.1)
