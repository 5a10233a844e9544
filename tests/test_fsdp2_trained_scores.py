"""select_distributed on an FSDP2 model == one process's select, for the methods that train
before they score: ``sam`` with a head warm-up (``head_warmup_steps``) and ``diff_pruning``.
2 gloo ranks on the CPU.

The model is a tiny float64 classifier without dropout (dim-0 sizes 6, 5, 3: uneven shards);
its head, the last Linear, is ``always_train``. Each rank feeds its rows of every global batch
(mean cross-entropy, equal parts: the gradient FSDP2 reduce-scatters is that of the mean loss
over the global batch). The mask (digest) must be the one of ``st.select`` on the unsharded
model with the global batches, on every rank, and the model must come back bit for bit (its
shards, no gradient, its modes and ``requires_grad`` flags). Bad input raises one error on
every rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from fsdp_helpers import init, outcome, rows, run_ranks, shard
from torch import nn

import sparsetune as st
from sparsetune.integrations.distributed import select_distributed
from sparsetune.integrations.fsdp_diff_pruning import sharded_diff_pruning_scores
from sparsetune.optim.sharded import local, process_group
from sparsetune.select.methods.projection import diff_pruning_scores

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)

WORLD = 2
HEAD = ["4.weight", "4.bias"]
NUM_BATCHES = 3
WARMUP = dict(always_train=HEAD, head_warmup_steps=4, head_warmup_lr=0.1)  # data read twice
DIFF = dict(steps=5, lr=0.05, l0_weight=1e-3, init_log_alpha=1.0, seed=2)  # data read twice
CASES = {  # name -> (method, density, options)
    "sam_warmup": ("sam", 0.3, dict(max_grad_norm=None, **WARMUP)),
    "sam_warmup_clipped_per_tensor": ("sam", 0.4, dict(scope="per_tensor", max_grad_norm=0.05,
                                                       num_batches=2, **WARMUP)),
    "sam_warmup_frozen": ("sam", 0.3, dict(always_train=["4.bias"], head_warmup_steps=2,
                                           head_warmup_lr=0.3, seed=3)),
    "sam_curvature_warmup": ("sam_curvature", 0.3, dict(curvature_method="finite_difference",
                                                        num_samples=2, max_grad_norm=None,
                                                        **WARMUP)),
    "diff_pruning": ("diff_pruning", 0.3, dict(always_train=HEAD, **DIFF)),
    "diff_pruning_per_tensor": ("diff_pruning", 0.4, dict(scope="per_tensor", steps=3, lr=0.1,
                                                          l0_weight=0.0, init_log_alpha=0.5,
                                                          seed=7)),
    "diff_pruning_frozen": ("diff_pruning", 0.2, dict(targets=["0", "2"], steps=2, lr=0.02,
                                                      l0_weight=1e-2, seed=1)),
}
FROZEN = {"sam_warmup_frozen": ["0.bias"],  # parameters that do not require grad
          "diff_pruning_frozen": ["2.bias"]}
EVAL = ("sam_warmup", "diff_pruning")  # cases run on a model in eval mode (training sets train)


def make_model(case: str = "") -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                              nn.Linear(5, 3)).to(torch.float64)
    for name in FROZEN.get(case, ()):
        model.get_parameter(name).requires_grad_(False)
    if case in EVAL:
        model.eval()
    return model


def loss_fn(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(data[0]), data[1])


def data(rank: int | None = None, world: int = 1) -> list:
    """The global batches (rank None) or rank ``rank``'s rows of each."""
    steps = []
    for step in range(NUM_BATCHES):
        gen = torch.Generator().manual_seed(200 + step)
        steps.append((torch.randn(8, 4, generator=gen, dtype=torch.float64),
                      torch.randint(0, 3, (8,), generator=gen)))
    if rank is None:
        return steps
    return [(x[rows(rank, world)], y[rows(rank, world)]) for x, y in steps]


def _state(model: nn.Module) -> tuple:
    return ({n: local(p.detach()).clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [m.training for m in model.modules()])


def _restored(model: nn.Module, before: tuple) -> bool:
    values, flags, modes = _state(model)
    return (all(torch.equal(values[n], before[0][n]) for n in values) and flags == before[1]
            and modes == before[2] and all(p.grad is None for p in model.parameters()))


def _worker(rank: int, world: int, folder: str) -> None:
    mesh = init(rank, world, folder)
    out: dict = {"restored": {}}
    for case, (method, density, options) in CASES.items():
        model = shard(make_model(case), mesh)
        before = _state(model)
        mask = select_distributed(model, method, density, data=data(rank, world),
                                  loss_fn=loss_fn, **options)
        out[case] = mask.digest()
        out["restored"][case] = _restored(model, before)
    # the scores themselves: each rank's rows of the gate logits
    model = shard(make_model(), mesh)
    params = dict(model.named_parameters())
    before = _state(model)
    scores = sharded_diff_pruning_scores(model, params, loss_fn, data(rank, world),
                                         device=torch.device("cpu"),
                                         group=process_group(params.values()), **DIFF)
    out["scores"] = {n: t.clone() for n, t in scores.items()}
    out["scores_restored"] = _restored(model, before)
    out["no_head"] = outcome(lambda: select_distributed(
        model, "sam", 0.3, data=data(rank, world), loss_fn=loss_fn, head_warmup_steps=2))
    out["one_shot"] = outcome(lambda: select_distributed(
        model, "sam", 0.3, data=iter(data(rank, world)), loss_fn=loss_fn, **WARMUP))
    uneven = data(rank, world)[: 1 + (rank == world - 1)]  # the last rank has one more batch
    out["uneven"] = outcome(lambda: select_distributed(
        model, "sam", 0.3, data=uneven, loss_fn=loss_fn, **WARMUP))
    out["diff_uneven"] = outcome(lambda: select_distributed(
        model, "diff_pruning", 0.3, data=uneven, loss_fn=loss_fn, steps=3))
    out["diff_bad_l0"] = outcome(lambda: select_distributed(
        model, "diff_pruning", 0.3, data=data(rank, world), loss_fn=loss_fn, l0_weight=-1.0))
    out["curvature"] = outcome(lambda: select_distributed(
        model, "sam_curvature", 0.3, data=data(rank, world), loss_fn=loss_fn, **WARMUP))
    out["bad_restored"] = _restored(model, before)
    out["after_errors"] = select_distributed(model, "sam", 0.3, data=data(rank, world),
                                             loss_fn=loss_fn, **WARMUP).digest()
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("fsdp2_trained_scores"))


def _one_process(case: str, **changes) -> st.Mask:
    method, density, options = CASES[case]
    return st.select(make_model(case), method, density, progress=False, data=data(),
                     loss_fn=loss_fn, **{**options, **changes})


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_selection_equals_one_process(ranks, case):
    expected = _one_process(case)
    assert 0 < expected.num_trainable < expected.num_total + expected.num_always_trained
    for out in ranks:
        assert out[case] == expected.digest(), case
        assert out["restored"][case], case  # shards, flags, modes as found; no gradient
    if CASES[case][0] == "sam":  # the warm-up changed the mask
        assert _one_process(case, head_warmup_steps=0).digest() != expected.digest(), case


def test_sharded_diff_pruning_scores_equal_one_process(ranks):
    expected = diff_pruning_scores(make_model(), loss_fn, data(), **DIFF)
    for name, value in expected.items():
        rows_by_rank = [out["scores"][name] for out in ranks]  # Shard(0): rows in rank order
        torch.testing.assert_close(torch.cat(rows_by_rank), value, rtol=0, atol=1e-12)
    assert all(out["scores_restored"] for out in ranks)
    spread = torch.cat([t.reshape(-1) for t in expected.values()])
    assert float(spread.max() - spread.min()) > 0.05  # the loss moved the logits apart


def test_bad_input_raises_on_every_rank(ranks):
    for out in ranks:
        for key in ("no_head", "one_shot", "uneven", "diff_uneven", "diff_bad_l0",
                    "curvature"):
            assert out[key] == ranks[0][key], key  # the same error on every rank
        assert out["no_head"].startswith("InvalidArgumentError: rank 0: head_warmup_steps "
                                         "trains the always_train parameters"), out["no_head"]
        assert out["one_shot"].startswith("InvalidArgumentError: rank 0: head_warmup_steps "
                                          "reads data twice"), out["one_shot"]
        assert out["uneven"].startswith("InvalidArgumentError: rank 0: the ranks reached the "
                                        "end of their data at different steps of the head "
                                        "warm-up"), out["uneven"]
        assert out["diff_uneven"].startswith("InvalidArgumentError: rank 0: the ranks reached "
                                             "the end of their data at different steps of diff "
                                             "pruning (step 1"), out["diff_uneven"]
        assert out["diff_bad_l0"].startswith("InvalidArgumentError: rank 0: l0_weight must be"), \
            out["diff_bad_l0"]
        assert "sam_curvature with curvature_method='hutchinson' is not supported on a " \
               "sharded (FSDP2) model" in out["curvature"], out["curvature"]
        assert out["bad_restored"]
        assert out["after_errors"] == st.select(make_model(), "sam", 0.3, data=data(),
                                                loss_fn=loss_fn, progress=False,
                                                **WARMUP).digest()
