"""The sparse delta of an FSDP2 model, gathered on rank 0: two gloo processes on the CPU.

The ranks train the sharded tiny MLP (dim-0 sizes 5, 3, 1: uneven shards, an empty one) with
SparseAdamW on their halves of each batch, then extract the delta; the file rank 0 writes must
be byte for byte the file one process writes for the unsharded model holding the same
(gathered) weights, and the training itself must match one process on the whole batches.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from fsdp_helpers import batch, init, make_model, outcome, rows, run_ranks, shard
from torch import nn

import sparsetune as st
from sparsetune.integrations.fsdp import extract_delta, save_delta

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)

WORLD = 2
STEPS = 3
HEAD = ["4.bias"]
INFO = {"task": "toy"}


def make_mask(model: nn.Module, seed: int = 3) -> st.Mask:
    return st.select(model, "random", 0.4, seed=seed, always_train=HEAD)


def with_buffer(model: nn.Module) -> nn.Module:
    """A buffer the training changes (a step counter), so the delta records one."""
    model.register_buffer("seen", torch.zeros((), dtype=torch.int64))
    return model


def _worker(rank: int, world: int, folder: str) -> None:
    mesh = init(rank, world, folder)
    mask = make_mask(make_model())
    model = shard(with_buffer(make_model()), mesh)
    sharded_base = {n: p.detach().clone() for n, p in model.named_parameters()}
    sharded_base["seen"] = model.seen.clone()
    full_base = with_buffer(make_model()).state_dict()
    opt = st.SparseAdamW(model, mask, lr=0.05, weight_decay=0.1)
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rows(rank, world)]), y[rows(rank, world)]).backward()
        opt.step()
        model.seen += 1
    out: dict = {
        "weights": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
        "saved": str(save_delta(f"{folder}/sharded_base.safetensors", model, sharded_base, mask,
                                method="random", info=INFO)),
        "full_base": str(save_delta(f"{folder}/full_base.safetensors", model, full_base, mask,
                                    method="random", info=INFO)),
        "on_rank_1": str(extract_delta(model, full_base, mask, dst=1)),
    }
    # Bad input: the same error on every rank, no hang.
    out["plain_extract"] = outcome(lambda: st.SparseDelta.extract(model, full_base, mask))
    other = st.Mask.from_names({"weight": torch.zeros(3)}, ["weight"])
    out["other_model"] = outcome(lambda: extract_delta(model, full_base, other))
    own = make_mask(make_model(), seed=3 + rank)  # rank 1 holds another mask
    out["different_masks"] = outcome(lambda: extract_delta(model, full_base, own))
    out["optimizer_masks"] = outcome(lambda: st.SparseAdamW(model, own, lr=0.1))
    out["bad_dst"] = outcome(lambda: extract_delta(model, full_base, mask, dst=2))
    no_buffer = {n: t for n, t in full_base.items() if n != "seen"}
    out["no_buffer"] = outcome(lambda: extract_delta(model, no_buffer, mask))
    if rank == 1:  # a frozen entry of rank 1's shard moves: rank 0 must learn of it too
        frozen = (~mask["0.weight"][3:]).nonzero()[0]
        model[0].weight.to_local().data[tuple(frozen)] += 1.0
    out["moved_outside"] = outcome(lambda: extract_delta(model, full_base, mask))
    out["moved_lenient"] = str(extract_delta(model, full_base, mask, strict=False))
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], object]:
    folder = tmp_path_factory.mktemp("fsdp2_delta")
    return run_ranks(_worker, WORLD, folder), folder


def _reference(weights: dict, folder) -> bytes:
    """The file one process writes for the unsharded model holding ``weights``."""
    model = with_buffer(make_model())
    base = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
        model.seen += STEPS
    delta = st.SparseDelta.extract(model, base, make_mask(make_model()), method="random",
                                   info=INFO)
    return delta.save(folder / "one_process.safetensors").read_bytes()


def test_rank_0_writes_the_single_process_delta_file(ranks):
    outs, folder = ranks
    expected = _reference(outs[0]["weights"], folder)
    assert (folder / "sharded_base.safetensors").read_bytes() == expected
    assert (folder / "full_base.safetensors").read_bytes() == expected
    assert outs[0]["saved"] == str(folder / "sharded_base.safetensors")
    assert outs[1]["saved"] == "None" and outs[1]["full_base"] == "None"  # rank 1 writes nothing
    assert outs[0]["on_rank_1"] == "None" and outs[1]["on_rank_1"].startswith("SparseDelta(")


def test_sharded_delta_reproduces_one_process_training(ranks):
    _, folder = ranks
    delta = st.SparseDelta.load(folder / "sharded_base.safetensors")
    mask = make_mask(make_model())
    support = delta.support()
    assert set(support) == set(mask)
    assert all(torch.equal(support[n], mask[n]) for n in mask)
    assert delta.buffers["seen"].tuned.item() == STEPS
    model = make_model()
    opt = st.SparseAdamW(model, mask, lr=0.05, weight_decay=0.1)
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    rebuilt = delta.apply_to(with_buffer(make_model()))  # the fingerprint is the base's
    for name, p in model.named_parameters():
        torch.testing.assert_close(rebuilt.get_parameter(name), p.detach(), rtol=0, atol=1e-12)


def test_bad_input_raises_the_same_error_on_every_rank(ranks):
    outs, _ = ranks
    expected = {
        "plain_extract": "InvalidArgumentError: SparseDelta.extract does not support sharded",
        "other_model": "ParameterMismatchError: rank 0: mask does not fit FSDPSequential",
        "different_masks": "StateMismatchError: the ranks hold different masks",
        "optimizer_masks": "StateMismatchError: SparseAdamW: the ranks hold different masks",
        "bad_dst": "InvalidArgumentError: rank 0: dst must be a rank of the model's mesh",
        "no_buffer": "ParameterMismatchError: rank 0: base_state_dict lacks the model's buffers",
        "moved_outside": "BaseModelMismatchError: rank 0: the model differs from the base "
                         "outside the mask in ['0.weight (1 entries)']",
    }
    for key, start in expected.items():
        for out in outs:
            assert out[key].startswith(start), (key, out[key])
    assert outs[0]["moved_lenient"].startswith("SparseDelta(")
