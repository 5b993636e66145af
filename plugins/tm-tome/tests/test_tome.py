"""ToMe's configuration surface: validation, defaults, schedules and the 50 % cap."""

from __future__ import annotations

import pytest
import torch

import tmcore
from tmcore import AlreadyAppliedError, InvalidConfigError, NoAdapterError, NotAppliedError, ScheduleClampWarning
from tmcore.testing import tiny_timm_models


@pytest.fixture
def vit():
    return tiny_timm_models()["vit"]()


@pytest.mark.parametrize(
    "r, message",
    [
        (-1, r"r=-1: must be an int >= 0"),
        (2.5, r"r=2.5: must be an int >= 0"),
        (True, r"r=True"),
        ("13", r"r='13'"),
        ([1, -2], r"r=\[1, -2\]"),
        ((4, 2.0), r"r=\(4, 2.0\)"),
        ((4,), r"r=\(4,\)"),
    ],
)
def test_bad_r_is_refused_naming_field_value_and_allowed(vit, r, message):
    with pytest.raises(InvalidConfigError, match=message) as err:
        tmcore.apply(vit, "tome", r=r)
    assert "(r, inflect)" in str(err.value)
    assert tmcore.get_patch(vit) is None


def test_missing_r_and_unknown_key(vit):
    with pytest.raises(InvalidConfigError, match="r is required"):
        tmcore.apply(vit, "tome")
    with pytest.raises(
        InvalidConfigError, match=r"unknown config key 'ratio' \(value 0.9\).*Allowed keys: r \("
    ) as err:
        tmcore.apply(vit, "tome", r=4, ratio=0.9)
    assert "prop_attn" in str(err.value)


def test_list_longer_than_the_model(vit):
    with pytest.raises(
        InvalidConfigError,
        match=r"invalid config for reducer .tome.: r=\[1, 1, 1, 1, 1\] has 5 entries for a model with 4 blocks",
    ):
        tmcore.apply(vit, "tome", r=[1, 1, 1, 1, 1])


def test_second_apply_needs_replace(vit):
    tmcore.apply(vit, "tome", r=2)
    with pytest.raises(AlreadyAppliedError, match="already carries reducer 'tome'.*replace=True"):
        tmcore.apply(vit, "tome", r=3)
    tmcore.apply(vit, "tome", r=3, replace=True)
    assert tmcore.get_patch(vit).reducer.config.r == 3


def test_failed_replace_keeps_the_old_patch(vit):
    tmcore.apply(vit, "tome", r=2)
    with pytest.raises(InvalidConfigError):
        tmcore.apply(vit, "tome", r=-3, replace=True)
    assert tmcore.get_patch(vit).reducer.config.r == 2


def test_model_no_adapter_handles():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(
        NoAdapterError, match=r"torch\.nn\.modules\.container\.Sequential.*timm \(tm-timm\): timm VisionTransformer"
    ):
        tmcore.apply(model, "tome", r=2)
    with pytest.raises(NoAdapterError, match="takes a torch.nn.Module"):
        tmcore.apply("vit", "tome", r=2)


def test_remove_and_trace_need_a_patched_model(vit):
    with pytest.raises(NotAppliedError, match="tmcore.remove needs a model patched"):
        tmcore.remove(vit)
    with pytest.raises(NotAppliedError, match="tmcore.trace"):
        with tmcore.trace(vit):
            pass


def test_the_cap_warns_at_apply(vit):
    with pytest.warns(ScheduleClampWarning, match="block 0: r=40 -> 32"):
        tmcore.apply(vit, "tome", r=40)
    with torch.no_grad(), tmcore.trace(vit) as t:
        vit(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert t.token_counts == [65, 33, 17, 9, 5]


def test_prop_attn_defaults_follow_the_original(vit):
    tmcore.apply(vit, "tome", r=2)
    assert tmcore.get_patch(vit).reducer.prop_attn is True
    vit.pretrained_cfg = {"tag": "mae"}
    tmcore.apply(vit, "tome", r=2, replace=True)
    assert tmcore.get_patch(vit).reducer.prop_attn is False
    tmcore.apply(vit, "tome", r=2, prop_attn=True, replace=True)
    assert tmcore.get_patch(vit).reducer.prop_attn is True


def test_save_and_load_round_trip(vit, tmp_path):
    tmcore.apply(vit, "tome", r=(4, -1), prop_attn=False)
    tmcore.save(vit, tmp_path / "tome.safetensors")
    fresh = tiny_timm_models()["vit"]()
    tmcore.load(fresh, tmp_path / "tome.safetensors")
    red = tmcore.get_patch(fresh).reducer
    assert red.config.r == (4, -1.0) and red.config.prop_attn is False
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(fresh(x), vit(x))


def test_unmerge_with_a_distillation_token():
    """The original's unmerge assumes [unm, dst]; ours follows the plan, distillation token too."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 5, generator=gen)
    plan = tmcore.bipartite_soft_matching(torch.randn(2, 12, 4, generator=gen), 4, num_protected=2)
    y, size = tmcore.merge_weighted(x, plan)
    back = tmcore.unmerge(y, plan)
    assert torch.equal(back[:, :2], x[:, :2])  # class and distillation token
    dest = tmcore.plan.destinations(plan)
    assert torch.equal(back, y.gather(1, dest.unsqueeze(-1).expand(-1, -1, 5)))
    alone = (size.squeeze(-1) == 1).gather(1, dest)
    torch.testing.assert_close(back[alone], x[alone])
