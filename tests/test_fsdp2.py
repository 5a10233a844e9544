"""SparseAdamW / SparseSGD under FSDP2 (fully_shard): two gloo processes on the CPU.

One spawn trains the sharded model on each rank's half of every batch and saves the gathered
parameters and per-rank state; the tests compare them with one process on the concatenated
batches, in float64. Layer sizes split unevenly over two ranks (5 rows: 3 + 2; 3 rows: 2 + 1;
1 row: 1 + 0, an empty shard).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparsetune as st

try:
    import transformers  # noqa: F401

    HAVE_TRANSFORMERS = True
except ImportError:
    HAVE_TRANSFORMERS = False

WORLD = 2
STEPS = 5
DENSITY = 0.4
HEAD = ["4.bias"]  # always trained: a fully selected parameter
MAX_NORM = 0.05  # small enough that every step clips
OPTIMIZERS = {
    "adamw": (st.SparseAdamW, dict(lr=0.05, weight_decay=0.1)),
    "adamw_forloop": (st.SparseAdamW, dict(lr=0.05, weight_decay=0.1, impl="forloop",
                                           decay_to="init")),
    "sgd": (st.SparseSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
}

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)


def make_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)
        ).double()


def make_llama() -> nn.Module:
    """One decoder layer; every dim-0 size (41, 36, 37) splits unevenly over two ranks."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=36, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=41, max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).double()


def tokens(step: int) -> torch.Tensor:
    """The global batch of a step: 4 sequences of 6 tokens, rank r takes rows 2r, 2r + 1."""
    return torch.randint(0, 41, (4, 6), generator=torch.Generator().manual_seed(200 + step))


def make_mask(model: nn.Module, always_train=HEAD) -> st.Mask:
    return st.select(model, "random", DENSITY, seed=3, always_train=always_train)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: 8 examples, rank r takes rows 4r .. 4r + 3."""
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(8, 4, generator=gen, dtype=torch.float64),
            torch.randn(8, 1, generator=gen, dtype=torch.float64))


def _outcome(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _sharded(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train_llama(mesh, rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = make_llama()
    mask = make_mask(model, ["lm_head.weight"])
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = st.SparseAdamW(model, mask, lr=0.01, weight_decay=0.1)
    for step in range(STEPS):
        ids = tokens(step)[2 * rank: 2 * rank + 2]
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
    return {
        "weights": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
        "counts": {n: opt.selection(p).count for n, p in model.named_parameters()},
    }


def _worker(rank: int, world: int, folder: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from sparsetune.integrations.distributed import select_distributed

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    out: dict = {}
    mask = make_mask(make_model())
    for key, (cls, hyper) in OPTIMIZERS.items():
        model = _sharded(mesh)
        opt = cls(model, mask, **hyper)
        norms = []
        for step in range(STEPS):
            x, y = batch(step)
            rows = slice(4 * rank, 4 * rank + 4)
            opt.zero_grad()
            nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
            norms.append(opt.clip_grad_norm_(MAX_NORM))
            opt.step()
        out[key] = {
            "weights": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
            "norms": torch.stack(norms),
            "counts": {n: opt.selection(p).count for n, p in model.named_parameters()},
            "state": opt.state_dict()["state"],  # this rank's: its shard's entries only
        }
    if HAVE_TRANSFORMERS:
        out["llama"] = _train_llama(mesh, rank)
    saved = opt.state_dict()
    other = {**saved, "sparsetune": {**saved["sparsetune"], "shard": [1 - rank, world]}}
    out["load_own"] = _outcome(lambda: opt.load_state_dict(copy.deepcopy(saved)))
    out["load_other"] = _outcome(lambda: opt.load_state_dict(other))
    out["step_in_backward"] = _outcome(lambda: opt.step_in_backward())
    replicated = make_model()
    replicated[0].weight = nn.Parameter(distribute_tensor(replicated[0].weight.detach(), mesh,
                                                          [Replicate()]))
    out["replicated"] = _outcome(lambda: st.SparseAdamW(replicated, mask))
    from torch.distributed.fsdp import fully_shard

    partial = make_model()
    fully_shard(partial[0], mesh=mesh)  # the other layers stay plain tensors
    out["partial"] = _outcome(lambda: st.SparseSGD(partial, mask, lr=0.1))
    columns = nn.Sequential(nn.Linear(4, 2))  # FSDP2 sharding the weight on dim 1: refused
    columns_mask = st.select(columns, "random", 0.5, progress=False)
    fully_shard(columns, mesh=mesh, shard_placement_fn=lambda p: Shard(p.dim() - 1))
    out["dim1"] = _outcome(lambda: st.SparseAdamW(columns, columns_mask))
    out["dim1_select"] = _outcome(lambda: select_distributed(columns, "magnitude", 0.3))
    out["masked"] = _outcome(lambda: st.MaskedOptimizer(
        torch.optim.AdamW(model.parameters()), mask, model))
    out["prepare"] = _outcome(lambda: st.prepare(model, mask))
    out["attach"] = _outcome(lambda: st.attach(model, mask))
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("fsdp2")
    mp.spawn(_worker, args=(WORLD, str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _one_process(key: str) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, list]:
    cls, hyper = OPTIMIZERS[key]
    model = make_model()
    base = copy.deepcopy(model)
    opt = cls(model, make_mask(model), **hyper)
    norms = []
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()  # mean over 8 = FSDP2's mean of means
        norms.append(opt.clip_grad_norm_(MAX_NORM))
        opt.step()
    return model, base, opt, norms


@pytest.mark.parametrize("key", list(OPTIMIZERS))
def test_fsdp2_training_equals_one_process_on_the_concatenated_batches(ranks, key):
    model, base, _, norms = _one_process(key)
    mask = make_mask(base)
    for out in ranks:
        result = out[key]
        torch.testing.assert_close(result["norms"], torch.stack(norms), rtol=1e-12, atol=0)
        assert bool((result["norms"] > MAX_NORM).all())  # every step clipped
        for name, p in model.named_parameters():
            torch.testing.assert_close(result["weights"][name], p.detach(), rtol=0, atol=1e-12)
            frozen = ~mask[name]
            assert torch.equal(result["weights"][name][frozen], base.get_parameter(name)[frozen])


@pytest.mark.parametrize("key", list(OPTIMIZERS))
def test_each_rank_keeps_state_for_its_shard_only(ranks, key):
    model, base, opt, _ = _one_process(key)
    for name, p in model.named_parameters():
        assert sum(out[key]["counts"][name] for out in ranks) == opt.selection(p).count
    assert sum(sum(out[key]["counts"].values()) for out in ranks) == make_mask(base).num_trainable
    moment = "momentum_buffer" if key == "sgd" else "exp_avg"
    for out in ranks:
        sizes = [s[moment].numel() for s in out[key]["state"].values() if moment in s]
        assert sum(sizes) == sum(out[key]["counts"].values())
    # The 1-row layer's shard on rank 1 is empty.
    assert ranks[1][key]["counts"]["4.weight"] == 0 and ranks[1][key]["counts"]["4.bias"] == 0


def test_unsupported_sharded_uses_raise_clearly(ranks):
    for rank, out in enumerate(ranks):
        assert out["load_own"] == "no error"
        assert out["load_other"].startswith("StateMismatchError")
        assert f"saved by rank, world [{1 - rank}, 2]" in out["load_other"]
        assert out["step_in_backward"].startswith("InvalidArgumentError")
        assert "FSDP2" in out["step_in_backward"]
        assert out["replicated"].startswith("InvalidArgumentError")
        assert "(Shard(0),)" in out["replicated"]
        for key in ("dim1", "dim1_select"):
            assert out[key].startswith("InvalidArgumentError"), out[key]
            assert "(Shard(0),)" in out[key] and "Shard(dim=1)" in out[key], out[key]
        assert out["partial"].startswith("InvalidArgumentError: SparseSGD: some parameters are")
        assert out["masked"].startswith("InvalidArgumentError: MaskedOptimizer does not support")
        for who in ("prepare", "attach"):  # not yet: one clear line each
            assert out[who].startswith("InvalidArgumentError: "), who
            assert "does not support sharded parameters" in out[who], who


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="needs transformers")
def test_fsdp2_tiny_llama_equals_one_process(ranks):
    model = make_llama()
    base = copy.deepcopy(model)
    mask = make_mask(model, ["lm_head.weight"])
    opt = st.SparseAdamW(model, mask, lr=0.01, weight_decay=0.1)
    for step in range(STEPS):
        ids = tokens(step)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()  # equal token counts per rank
        opt.clip_grad_norm_(1.0)
        opt.step()
    for out in ranks:
        for name, p in model.named_parameters():
            got = out["llama"]["weights"][name]
            torch.testing.assert_close(got, p.detach(), rtol=0, atol=1e-12)
            assert torch.equal(got[~mask[name]], base.get_parameter(name)[~mask[name]])
    assert sum(sum(out["llama"]["counts"].values()) for out in ranks) == mask.num_trainable
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
