"""Each selection method's config class: its flags, and every option checked before any work."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import sparsetune as st
from sparsetune.select import (
    METHODS,
    MethodConfig,
    MethodInfo,
    method_info,
    method_options,
    method_spec,
    register_method,
)
from sparsetune.select.methods import BUILTIN, LtSftConfig, SamConfig


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


class _Untouchable:
    """Data that fails if anyone reads it: bad options must be refused before any work."""

    def __iter__(self):
        raise AssertionError("data was read before the options were checked")


def _loss(model, batch):
    raise AssertionError("the loss was computed before the options were checked")


def test_every_builtin_is_a_frozen_config_registered_under_its_name():
    for spec in BUILTIN:
        assert method_spec(spec.name) is spec and spec.name in METHODS
        assert issubclass(spec, MethodConfig) and dataclasses.is_dataclass(spec)
        assert method_options(spec.name) == {f.name for f in dataclasses.fields(spec)}
        info = method_info(spec.name)
        assert (info.family, info.needs_data, info.uses_density) == (
            spec.family, spec.uses_data, spec.uses_density
        )
    config = SamConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_batches = 3  # type: ignore[misc]


def test_flags_say_what_a_method_needs():
    burn_in = {m for m in METHODS if method_spec(m).trains_burn_in}
    assert burn_in == {"lt_sft", "diff_pruning"}
    counts = {m: method_spec(m).count_option for m in METHODS}
    assert counts["sam"] == counts["child_pruning"] == counts["sam_curvature"] == "num_batches"
    assert counts["lt_sft"] == counts["diff_pruning"] == "steps"
    assert counts["random"] is counts["bitfit"] is counts["magnitude"] is None
    assert {m for m in METHODS if method_spec(m).all_reducible} == {"sam", "child_pruning"}
    magnitude = method_spec("magnitude")
    assert not magnitude().needs_data and magnitude(burn_in_steps=2).needs_data
    assert LtSftConfig().needs_data and LtSftConfig().steps == 100


@pytest.mark.parametrize(
    ("method", "option", "value"),
    [
        ("magnitude", "burn_in_steps", -1),
        ("magnitude", "lr", 0.0),
        ("child_pruning", "num_batches", 0),
        ("child_pruning", "max_grad_norm", -1.0),
        ("lt_sft", "steps", 0),
        ("lt_sft", "lr", -1e-3),
        ("diff_pruning", "l0_weight", -1.0),
        ("diff_pruning", "init_log_alpha", float("nan")),
        ("sam", "progress", "yes"),
        ("sam", "head_warmup_steps", -2),
        ("sam", "head_warmup_lr", 0.0),
        ("sam_curvature", "curvature_method", "hessian"),
        ("sam_curvature", "num_samples", 0),
        ("sam_curvature", "floor", -1.0),
        ("sam_curvature", "floor_fraction", float("inf")),
        ("names", "include", "("),
    ],
)
def test_a_bad_option_is_refused_before_any_work_naming_option_and_value(method, option, value):
    spec = method_spec(method)
    density = 0.5 if spec.uses_density else None
    with pytest.raises(st.InvalidArgumentError, match=option) as err:
        st.select(_model(), method, density, data=_Untouchable(), loss_fn=_loss,
                  **{option: value})
    assert repr(value)[:6] in str(err.value)
    with pytest.raises(st.InvalidArgumentError, match=option):
        spec(**{option: value})


def test_precomputed_curvature_refuses_probe_options_up_front():
    with pytest.raises(st.InvalidArgumentError, match="precomputed"):
        st.select(_model(), "sam_curvature", 0.5, data=_Untouchable(), loss_fn=_loss,
                  curvature={}, num_samples=4)


def test_registered_builders_get_only_the_options_given():
    seen = {}

    def builder(model, density, scope, always_train, *, data, loss_fn, seed, **options):
        seen.update(options)
        return st.Mask.full(model)

    info = MethodInfo("test_only_full", "rule", False, False, "everything")
    register_method("test_only_full", info, builder, options=("alpha", "beta"))
    try:
        mask = st.select(_model(), "test_only_full", alpha=3)
        assert mask.density == 1.0 and seen == {"alpha": 3}
        assert method_info("test_only_full") is info
        assert method_options("test_only_full") == {"alpha", "beta"}
        with pytest.raises(st.InvalidArgumentError, match=r"does not take options \['gamma'\]"):
            st.select(_model(), "test_only_full", gamma=1)
        with pytest.raises(st.InvalidArgumentError, match="already registered"):
            register_method("test_only_full", info, builder)
    finally:  # no public way to unregister: other tests iterate over METHODS
        from sparsetune.select import registry

        del registry._REGISTRY["test_only_full"]
