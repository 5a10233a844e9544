"""select_distributed with a fine-tuning burn-in (lt_sft, magnitude with burn_in_steps) on an
FSDP2 model == one process's select: 2 gloo ranks on the CPU.

Each rank feeds its rows of every global batch; the sharded burn-in (AdamW on each rank's
shards) must reach the parameters one process reaches on the global batches (float64, 1e-12),
the mask must be the one-process mask (digest) on every rank, and afterwards every rank's
shards must be bit-identical to before, with no gradient and no optimizer left behind. With
``offload`` ("cpu", "disk": theta0 and AdamW's moments of the local shards in the burn-in's
store) the trained shards and the mask must be bit-identical to those without. Bad data (ranks
running out at different steps, a one-shot iterator read twice), a bad offload and the methods
still refused raise one error on every rank, and the ranks stay in step. The tiny Llama of
test_fsdp2_models.py (marked slow) checks the same masks and restore on a real model.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
from fsdp_helpers import batch, init, make_model, outcome, rows, run_ranks, shard
from torch import nn

import sparsetune as st
from sparsetune.integrations.distributed import select_distributed
from sparsetune.integrations.fsdp_burn_in import sharded_burned_in
from sparsetune.optim.sharded import local, process_group
from sparsetune.select.methods.base import MethodInfo
from sparsetune.select.methods.burn_in import finetuned_values
from sparsetune.select.registry import register_method

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)

WORLD = 2
HEAD = ["4.bias"]
NUM_BATCHES = 3
BURN_IN = dict(steps=5, lr=1e-2)  # more steps than batches: the data is read twice
CASES = {  # name -> (method, density, options)
    "lt_sft": ("lt_sft", 0.3, dict(always_train=HEAD, **BURN_IN)),
    "lt_sft_per_tensor": ("lt_sft", 0.5, dict(scope="per_tensor", steps=2, lr=1e-3, seed=4)),
    "lt_sft_targets": ("lt_sft", 0.2, dict(targets=["0", "2"], steps=3, lr=3e-2)),
    "magnitude_burn_in": ("magnitude", 0.3, dict(always_train=HEAD, burn_in_steps=4, lr=3e-2)),
    "magnitude_burn_in_per_tensor": ("magnitude", 0.4, dict(scope="per_tensor", burn_in_steps=2,
                                                            lr=0.1)),
    # offload: theta0 and AdamW's moments of the local shards off the shards (same mask)
    "lt_sft_disk": ("lt_sft", 0.3, dict(always_train=HEAD, offload="disk", **BURN_IN)),
    "lt_sft_cpu": ("lt_sft", 0.3, dict(always_train=HEAD, offload="cpu", **BURN_IN)),
    "magnitude_burn_in_disk": ("magnitude", 0.3, dict(always_train=HEAD, burn_in_steps=4,
                                                      lr=3e-2, offload="disk")),
}
OFFLOADED = {"lt_sft_disk": "lt_sft", "lt_sft_cpu": "lt_sft",
             "magnitude_burn_in_disk": "magnitude_burn_in"}  # -> the same case without offload


def loss_fn(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(data[0]), data[1])


def data(rank: int | None = None, world: int = 1) -> list:
    """The global batches (rank None) or rank ``rank``'s rows of each."""
    steps = [batch(step) for step in range(NUM_BATCHES)]
    if rank is None:
        return steps
    return [(x[rows(rank, world)], y[rows(rank, world)]) for x, y in steps]


def _optimizers() -> int:
    gc.collect()
    return sum(isinstance(o, torch.optim.Optimizer) for o in gc.get_objects())


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: local(p.detach()).clone() for n, p in model.named_parameters()}


def _restored(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return (all(torch.equal(local(p.detach()), before[n]) for n, p in model.named_parameters())
            and all(p.grad is None for p in model.parameters()))


def _worker(rank: int, world: int, folder: str) -> None:
    mesh = init(rank, world, folder)
    out: dict = {"restored": {}, "optimizers": _optimizers()}
    for case, (method, density, options) in CASES.items():
        model = shard(make_model(), mesh)
        if case == "lt_sft":
            model.eval()  # the burn-in trains in train mode; the mode must come back
        before = _snapshot(model)
        mask = select_distributed(model, method, density, data=data(rank, world),
                                  loss_fn=loss_fn, **options)
        out[case] = mask.digest()
        out["restored"][case] = _restored(model, before) and model.training == (case != "lt_sft")
    out["optimizers_after"] = _optimizers()
    # The burned-in parameters themselves, gathered inside the burn-in.
    model = shard(make_model(), mesh)
    params = dict(model.named_parameters())
    before = _snapshot(model)
    with sharded_burned_in(model, params, loss_fn, data(rank, world), seed=0,
                           device=torch.device("cpu"), group=process_group(params.values()),
                           **BURN_IN) as initial:
        out["burned_in"] = {n: p.full_tensor().detach().clone() for n, p in params.items()}
        out["theta0_is_local"] = all(torch.equal(initial[n], before[n]) for n in params)
    for offload in ("cpu", "disk"):  # the same trained shards, bit for bit, and theta0
        with sharded_burned_in(model, params, loss_fn, data(rank, world), seed=0,
                               device=torch.device("cpu"), group=process_group(params.values()),
                               offload=offload, **BURN_IN) as initial:
            out[f"burned_in_{offload}"] = {n: p.full_tensor().detach().clone()
                                           for n, p in params.items()}
            out[f"theta0_is_local_{offload}"] = all(torch.equal(initial[n], before[n])
                                                    for n in params)
        out[f"restored_{offload}"] = _restored(model, before)
    out["bad_offload"] = outcome(lambda: select_distributed(
        model, "lt_sft", 0.3, data=data(rank, world), loss_fn=loss_fn, offload="gpu"))
    # Bad data and refused methods: one error on every rank, the ranks still in step.
    uneven = data(rank, world)[: 2 + (rank == world - 1)]  # the last rank has one more batch
    out["uneven"] = outcome(lambda: select_distributed(model, "lt_sft", 0.3, data=uneven,
                                                      loss_fn=loss_fn, steps=4))
    out["one_shot"] = outcome(lambda: select_distributed(
        model, "magnitude", 0.3, data=iter(data(rank, world)), loss_fn=loss_fn,
        burn_in_steps=NUM_BATCHES + 1))
    out["no_data"] = outcome(lambda: select_distributed(model, "lt_sft", 0.3, loss_fn=loss_fn))
    out["bad_lr"] = outcome(lambda: select_distributed(model, "lt_sft", 0.3, lr=-1.0,
                                                      data=data(rank, world), loss_fn=loss_fn))
    out["sam_curvature"] = outcome(lambda: select_distributed(
        model, "sam_curvature", 0.3, data=data(rank, world), loss_fn=loss_fn))
    register_method("fsdp_test_rule", MethodInfo("fsdp_test_rule", "rule", False, False,
                                                 "a test rule"), lambda *args, **kwargs: None)
    out["registered"] = outcome(lambda: select_distributed(model, "fsdp_test_rule"))
    out["bad_restored"] = _restored(model, before)
    out["after_errors"] = select_distributed(model, "lt_sft", 0.3, data=data(rank, world),
                                             loss_fn=loss_fn, **BURN_IN).digest()
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("fsdp2_burn_in"))


def _one_process(case: str) -> st.Mask:
    method, density, options = CASES[case]
    return st.select(make_model(), method, density, progress=False, data=data(),
                     loss_fn=loss_fn, **options)


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_burn_in_selection_equals_one_process(ranks, case):
    expected = _one_process(case)
    assert 0 < expected.num_trainable < expected.num_total + expected.num_always_trained
    for out in ranks:
        assert out[case] == expected.digest(), case
        assert out["restored"][case], case  # shards bit-identical, no grad, mode put back
    if case in OFFLOADED:  # the same mask as without offload, on every rank
        assert out[case] == out[OFFLOADED[case]], case
    if case.startswith("magnitude"):  # the burn-in changed the mask
        plain = st.select(make_model(), "magnitude", CASES[case][1], progress=False,
                          **{k: v for k, v in CASES[case][2].items()
                             if k not in ("burn_in_steps", "lr", "offload")})
        assert plain.digest() != expected.digest()


def test_sharded_burn_in_reaches_the_one_process_parameters(ranks):
    expected = finetuned_values(make_model(), loss_fn, data(), **BURN_IN)
    for out in ranks:
        assert out["theta0_is_local"]
        for name, value in expected.items():
            torch.testing.assert_close(out["burned_in"][name], value, rtol=0, atol=1e-12)
    assert not torch.equal(expected["0.weight"], make_model().get_parameter("0.weight"))


def test_offloaded_sharded_burn_in_is_bit_identical(ranks):
    for out in ranks:
        for offload in ("cpu", "disk"):
            assert out[f"theta0_is_local_{offload}"] and out[f"restored_{offload}"], offload
            for name, value in out["burned_in"].items():
                assert torch.equal(out[f"burned_in_{offload}"][name], value), (offload, name)
        assert out["bad_offload"].startswith("InvalidArgumentError: rank 0: offload must be "
                                             "one of None, 'cpu', 'disk'"), out["bad_offload"]


def test_no_optimizer_outlives_the_burn_in(ranks):
    for out in ranks:
        assert out["optimizers_after"] == out["optimizers"]


def test_bad_data_and_refused_methods_raise_on_every_rank(ranks):
    for out in ranks:
        for key in ("uneven", "one_shot", "no_data", "bad_lr", "bad_offload", "sam_curvature",
                    "registered"):
            assert out[key] == ranks[0][key], key  # the same error on every rank
        assert out["uneven"].startswith("InvalidArgumentError: rank 0: the ranks reached the "
                                        "end of their data at different steps of the fine-tuning "
                                        "burn-in (step 2")
        assert out["one_shot"].startswith("InvalidArgumentError: rank 0: data yielded no batch "
                                          "for the fine-tuning burn-in after its first pass")
        assert out["no_data"].startswith("InvalidArgumentError: rank 0: method 'lt_sft' needs "
                                          "data")
        assert "lr" in out["bad_lr"] and out["bad_lr"].startswith("InvalidArgumentError")
        assert "sam_curvature with curvature_method='hutchinson' is not supported on a " \
               "sharded (FSDP2) model" in out["sam_curvature"], out["sam_curvature"]
        assert "'fsdp_test_rule' is a registered method" in out["registered"], out["registered"]
        assert out["bad_restored"]
        assert out["after_errors"] == st.select(make_model(), "lt_sft", 0.3, data=data(),
                                                loss_fn=loss_fn, progress=False,
                                                **BURN_IN).digest()


# -- tiny Llama (float64, each decoder layer sharded, then the root) ---------------------------
LLAMA = {  # name -> (method, density, options)
    "llama_lt_sft": ("lt_sft", 0.02, dict(always_train=["model.norm.weight"], steps=3, lr=1e-3)),
    "llama_magnitude_burn_in": ("magnitude", 0.02, dict(burn_in_steps=2, lr=1e-2)),
}


def _llama_worker(rank: int, world: int, folder: str) -> None:
    from test_fsdp2_models import llama_batches, make_llama, shard_layers

    mesh = init(rank, world, folder)
    out: dict = {}
    for case, (method, density, options) in LLAMA.items():
        model = make_llama()
        model = shard_layers(model, model.model.layers, mesh)
        before = _snapshot(model)
        out[case] = select_distributed(model, method, density,
                                       data=llama_batches(0, 2, rank, world), **options).digest()
        out[f"{case}_restored"] = _restored(model, before)
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def llama_ranks(tmp_path_factory) -> list[dict]:
    pytest.importorskip("transformers")
    return run_ranks(_llama_worker, WORLD, tmp_path_factory.mktemp("fsdp2_burn_in_llama"))


@pytest.mark.slow  # ~12 s: transformers imported by two spawned ranks
@pytest.mark.parametrize("case", list(LLAMA))
def test_llama_sharded_burn_in_selection_equals_one_process(llama_ranks, case):
    from test_fsdp2_models import llama_batches, make_llama

    method, density, options = LLAMA[case]
    expected = st.select(make_llama(), method, density, data=llama_batches(0, 2),
                         progress=False, **options)
    assert 0 < expected.num_trainable < expected.num_total
    for out in llama_ranks:
        assert out[case] == expected.digest(), case
        assert out[f"{case}_restored"], case  # shards bit-identical, no gradient left
