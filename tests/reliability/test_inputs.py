"""One clear line for every bad input to selection (issue 20, "Input checks").

A density is a real number in (0, 1]: strings, bools, None and NaN are refused, never converted,
and a density that buys no entry names the smallest one that buys one. Every argument of
``select`` is checked before any batch is read or any gradient computed: the data and the loss
here raise if touched, so a late check shows up as their AssertionError. ``num_batches`` beyond
the data's length warns once, naming both numbers.
"""

from __future__ import annotations

import importlib
import math
import re
import warnings

import pytest
import torch
from torch import nn

import sparsetune as st
from sparsetune import InvalidArgumentError, Mask, ParameterMismatchError
from sparsetune.select import select_for_task

BAD_TYPES = ["0.5", True, False, None, [0.5], torch.tensor(0.5)]
BAD_VALUES = [float("nan"), float("inf"), 0, 0.0, -0.1, 1.5]


def _model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))  # 44 entries


def _data(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=gen), torch.randint(0, 2, (5,), generator=gen))
            for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


class Untouchable:
    """Data that must not be read: iterating it fails the test."""

    def __iter__(self):
        raise AssertionError("the data was read before the arguments were checked")


def untouchable_loss(model, batch):
    raise AssertionError("loss_fn was called before the arguments were checked")


# -- density: types, values, empty budgets ----------------------------------------------------
@pytest.mark.parametrize("density", BAD_TYPES + BAD_VALUES, ids=repr)
def test_density_is_a_real_number_in_the_unit_interval(density):
    scores = {"w": torch.rand(10)}
    with pytest.raises(InvalidArgumentError, match="density") as info:
        Mask.top_k(scores, density)
    assert repr(density) in str(info.value) or density is None
    with pytest.raises(InvalidArgumentError, match="density"):
        st.select(_model(), "random", density)


@pytest.mark.parametrize("density", ["0.5", True, None, float("nan")], ids=repr)
def test_density_message_names_the_argument_and_the_value(density):
    with pytest.raises(InvalidArgumentError) as info:
        Mask.top_k({"w": torch.rand(10)}, density)
    assert f"density={density!r}" in str(info.value)


def _smallest(message: str) -> float:
    found = re.search(r"smallest density that selects one entry is ([0-9.e-]+)", message)
    assert found, message
    return float(found.group(1))


@pytest.mark.parametrize("entries", [1, 3, 7, 44, 100, 12345])
def test_an_empty_budget_names_the_smallest_density_that_selects_one_entry(entries):
    scores = {"w": torch.rand(entries + 2), "head": torch.rand(3)}
    scores["w"] = scores["w"][:entries]
    tiny = 1e-9
    with pytest.raises(InvalidArgumentError, match="selects no entry") as info:
        Mask.top_k(scores, tiny, always_train=["head"])
    p = _smallest(str(info.value))
    # exactly the budget formula's threshold: p buys one entry, the float below it none
    assert st.budget_size(entries, p) == 1
    assert st.budget_size(entries, math.nextafter(p, 0.0)) == 0
    assert Mask.top_k(scores, p, always_train=["head"]).num_selected == 1


def test_the_smallest_density_accounts_for_decimal_rounding():
    # 1/3 of 3 entries buys 0 (the budget reads p as the decimal 0.3333333333333333)
    assert st.budget_size(3, 1 / 3) == 0
    with pytest.raises(InvalidArgumentError) as info:
        Mask.top_k({"w": torch.rand(3)}, 1 / 3)
    p = _smallest(str(info.value))
    assert p > 1 / 3 and Mask.top_k({"w": torch.rand(3)}, p).num_selected == 1


def test_per_tensor_budget_of_zero_everywhere_is_an_error():
    scores = {"a": torch.rand(10), "b": torch.rand(10)}  # global k = 1, per tensor 0 + 0
    with pytest.raises(InvalidArgumentError, match="per_tensor") as info:
        Mask.top_k(scores, 0.05, scope="per_tensor")
    p = _smallest(str(info.value))
    assert p == 0.1 and Mask.top_k(scores, p, scope="per_tensor").num_selected == 2


def test_select_refuses_an_empty_budget_before_reading_data():
    with pytest.raises(InvalidArgumentError, match="selects no entry") as info:
        st.select(_model(), "sam", 1e-9, data=Untouchable(), loss_fn=untouchable_loss)
    assert _smallest(str(info.value)) == pytest.approx(1 / 44)


def test_select_for_task_checks_density_before_loading(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model or data was loaded before density was checked")

    monkeypatch.setattr(st.data, "load_pretrained", no_load)
    monkeypatch.setattr(importlib.import_module("sparsetune.select.offline"), "load_task_spec",
                        no_load)
    for density in ["0.5", True, float("nan")]:
        with pytest.raises(InvalidArgumentError, match="density"):
            select_for_task("random", density)
    with pytest.raises(InvalidArgumentError, match="needs a density"):
        select_for_task("random")
    with pytest.raises(InvalidArgumentError, match="takes no density"):
        select_for_task("bitfit", 0.1)


# -- every argument of select, before any work ------------------------------------------------
HEAD = ["2.weight", "2.bias"]
BAD_CALLS = {
    "density str": ("sam", {"density": "0.5"}, InvalidArgumentError),
    "density bool": ("sam", {"density": True}, InvalidArgumentError),
    "density nan": ("sam", {"density": float("nan")}, InvalidArgumentError),
    "density > 1": ("sam", {"density": 2.0}, InvalidArgumentError),
    "density missing": ("sam", {"density": None}, InvalidArgumentError),
    "density empty budget": ("child_pruning", {"density": 1e-9}, InvalidArgumentError),
    "density over targets": ("sam", {"density": 0.9, "targets": r"^2\.bias$"},
                             InvalidArgumentError),
    "scope": ("sam", {"scope": "local"}, InvalidArgumentError),
    "seed": ("lt_sft", {"seed": "0"}, InvalidArgumentError),
    "loss_fn": ("sam", {"loss_fn": 42}, InvalidArgumentError),
    "data not iterable": ("sam", {"data": 3}, InvalidArgumentError),
    "always_train unknown": ("sam", {"always_train": ["nope.weight"]}, ParameterMismatchError),
    "targets no match": ("sam", {"targets": "nope"}, ParameterMismatchError),
    "targets bad regex": ("sam", {"targets": "("}, InvalidArgumentError),
    "targets only head": ("sam", {"targets": r"^2\.", "always_train": HEAD},
                          InvalidArgumentError),
    "unknown option": ("sam", {"nope": 1}, InvalidArgumentError),
    "num_batches": ("sam", {"num_batches": 0}, InvalidArgumentError),
    "max_grad_norm": ("child_pruning", {"max_grad_norm": -1.0}, InvalidArgumentError),
    "progress": ("sam", {"progress": "yes"}, InvalidArgumentError),
    "head_warmup_steps": ("sam", {"head_warmup_steps": -1}, InvalidArgumentError),
    "curvature_method": ("sam_curvature", {"curvature_method": "nope"}, InvalidArgumentError),
    "steps": ("lt_sft", {"steps": 0}, InvalidArgumentError),
    "lr": ("diff_pruning", {"lr": -1.0}, InvalidArgumentError),
    "burn_in_steps": ("magnitude", {"burn_in_steps": -1}, InvalidArgumentError),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_every_argument_of_select_is_checked_before_any_work(case):
    method, bad, error = BAD_CALLS[case]
    kwargs = {"density": 0.1, "data": Untouchable(), "loss_fn": untouchable_loss, **bad}
    density = kwargs.pop("density")
    with pytest.raises(error) as info:
        st.select(_model(), method, density, **kwargs)
    assert "before the arguments were checked" not in str(info.value)


# -- num_batches beyond the data --------------------------------------------------------------
@pytest.mark.parametrize("method", ["sam", "child_pruning", "sam_curvature"])
def test_num_batches_beyond_the_data_warns_once_naming_both_numbers(method):
    extra = {"num_samples": 1} if method == "sam_curvature" else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = st.select(_model(), method, 0.25, data=_data(4), loss_fn=_loss, num_batches=600,
                         progress=False, **extra)
    short = [w for w in caught if "num_batches" in str(w.message)]
    assert len(short) == 1, [str(w.message) for w in caught]
    assert issubclass(short[0].category, UserWarning)
    assert "600" in str(short[0].message) and "4" in str(short[0].message)
    quiet = st.select(_model(), method, 0.25, data=_data(4), loss_fn=_loss, progress=False,
                      **extra)
    assert mask == quiet  # every batch was used, as without num_batches


@pytest.mark.parametrize("num_batches", [None, 2, 4])
def test_num_batches_within_the_data_is_silent_and_reads_no_extra_batch(num_batches):
    pulled = []

    class Counting:
        def __iter__(self):
            for i, batch in enumerate(_data(4)):
                pulled.append(i)
                yield batch

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.select(_model(), "sam", 0.25, data=Counting(), loss_fn=_loss,
                  num_batches=num_batches, progress=False)
    assert len(pulled) == (4 if num_batches is None else num_batches)
