"""Selection progress (issue 22): a tqdm bar per phase, counted in tensors, and the same masks.

The bars are read from what tqdm really writes to stderr: its first line names the phase, the
total and the unit (``scoring tensors:   0%|          | 0/6 [00:00<?, ?tensor/s]``).
"""

from __future__ import annotations

import re

import pytest
import torch

import sparsetune as st
from sparsetune import Mask
from sparsetune.errors import InvalidArgumentError


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 10),
                               torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _data():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g))
            for _ in range(3)]


def _loss(m, b):
    return torch.nn.functional.cross_entropy(m(b[0]), b[1])


def _bars(err: str) -> dict[str, tuple[int, str]]:
    """``desc -> (total, unit)`` of every bar tqdm drew (each draws its 0/total state first)."""
    found = re.findall(r"([a-z][a-z0-9 -]*): +0%\|[^|]*\| 0/(\d+) \[[^]]*\?([a-z]+)/s\]", err)
    return {desc: (int(total), unit) for desc, total, unit in found}


HEAD = ["4.weight", "4.bias"]
DATA = {"data": _data(), "loss_fn": _loss}
# method, density, options, the bars expected: 6 tensors, 4 of them scored (the head always on)
CASES = [
    ("magnitude", 0.1, {"always_train": HEAD},
     {"scoring tensors": (4, "tensor"), "merging top-k": (6, "tensor")}),
    ("magnitude", 0.1, {"targets": [r"^2\."]},  # targets: only those 2 tensors are scored
     {"scoring tensors": (2, "tensor"), "merging top-k": (6, "tensor")}),
    ("random", 0.1, {"always_train": HEAD}, {"sampling tensors": (4, "tensor")}),
    ("random", 0.3, {"scope": "per_tensor"}, {"sampling tensors": (6, "tensor")}),
    ("bitfit", None, {}, {"matching tensors": (6, "tensor")}),
    ("names", None, {"include": r"weight$"}, {"matching tensors": (6, "tensor")}),
    ("sam", 0.1, {"always_train": HEAD, "num_batches": 3, **DATA},
     {"gradients at theta0": (3, "it"), "scoring tensors": (4, "tensor"),
      "merging top-k": (6, "tensor")}),
    ("sam", 0.2, {"scope": "per_tensor", **DATA},
     {"gradients at theta0": (3, "it"), "scoring tensors": (6, "tensor"),
      "merging top-k": (6, "tensor")}),
    ("child_pruning", 0.1, {"num_batches": 2, **DATA},
     {"gradients at theta0": (2, "it"), "scoring tensors": (6, "tensor"),
      "merging top-k": (6, "tensor")}),
    ("lt_sft", 0.1, {"steps": 2, "always_train": HEAD, **DATA},
     {"fine-tuning burn-in": (2, "it"), "scoring tensors": (4, "tensor"),
      "merging top-k": (6, "tensor")}),
]


@pytest.mark.parametrize("method,density,options,bars", CASES)
def test_each_phase_shows_a_bar_over_its_tensors_and_the_mask_is_the_same(
    capsys, method, density, options, bars
):
    args = (method,) if density is None else (method, density)
    capsys.readouterr()
    quiet = st.select(_tiny(), *args, progress=False, **options)
    assert capsys.readouterr().err == ""
    shown = st.select(_tiny(), *args, progress=True, **options)
    assert _bars(capsys.readouterr().err) == bars
    assert shown.digest() == quiet.digest()


def test_every_builtin_method_shows_bars_by_default(capsys):
    capsys.readouterr()
    st.select(_tiny(), "random", 0.1)
    st.select(_tiny(), "bitfit")
    st.select(_tiny(), "sam", 0.1, **DATA)
    err = capsys.readouterr().err
    assert set(_bars(err)) == {"sampling tensors", "matching tensors", "gradients at theta0",
                               "scoring tensors", "merging top-k"}


def test_mask_top_k_is_quiet_unless_asked(capsys):
    scores = {n: p.detach().abs() for n, p in _tiny().named_parameters()}
    capsys.readouterr()
    quiet = Mask.top_k(scores, 0.2)
    assert capsys.readouterr().err == ""
    shown = Mask.top_k(scores, 0.2, progress=True)
    assert _bars(capsys.readouterr().err) == {"scoring tensors": (6, "tensor"),
                                              "merging top-k": (6, "tensor")}
    assert shown == quiet


@pytest.mark.parametrize("method,density", [("random", 0.1), ("bitfit", None),
                                            ("names", None), ("magnitude", 0.1)])
def test_progress_must_be_a_bool(method, density):
    args = (method,) if density is None else (method, density)
    options = {"include": "bias$"} if method == "names" else {}
    with pytest.raises(InvalidArgumentError, match=r"progress must be True or False, got "
                                                   r"progress='yes'"):
        st.select(_tiny(), *args, progress="yes", **options)


def test_top_k_refuses_a_progress_that_is_not_a_bool():
    scores = {"a": torch.arange(4.0)}
    with pytest.raises(InvalidArgumentError, match="progress must be True or False"):
        Mask.top_k(scores, 0.5, progress=1)
