"""Config forms and their errors, the identity, the search's pieces and a short search."""

from __future__ import annotations

import json

import pytest
import torch

import tm_diffrate
import tmcore
from tm_diffrate.ops import ste_min
from tmcore.registry import registry
from tmcore.testing import tiny_timm_models


@pytest.fixture
def vit():
    model = tiny_timm_models()["vit"]()  # 4 blocks, 65 tokens, float64
    return model, registry.adapter_for(model).example_inputs(model)


def counts(model, inputs):
    with torch.no_grad(), tmcore.trace(model) as t:
        model(**inputs)
    return t.token_counts


@pytest.mark.parametrize(
    "config, message",
    [
        ({}, "no schedule; give the kept counts"),
        ({"prune": [60, 50, 40, 30]}, "merge is missing"),
        ({"schedule": "keep-all", "prune": 3, "merge": 3}, "2 schedules"),
        (
            {"prune": [60, 50, 40], "merge": [60, 50, 40, 30]},
            r"prune=\[60, 50, 40\] has 3 entries for a model with 4 blocks",
        ),
        ({"prune": [60, 50, 40, 1], "merge": 30}, r"keeps 1 token\(s\) .* allowed: counts >= 2"),
        ({"prune": [60, 0, 40, 30], "merge": 30}, "prune=.*entry 1"),
        ({"schedule": "deit-x-1.0"}, "schedule='deit-x-1.0': must be one of 'keep-all'"),
        ({"schedule_file": "/nonexistent.json"}, "no such file"),
    ],
)
def test_bad_configs_are_refused(vit, config, message):
    model, _ = vit
    with pytest.raises(tmcore.InvalidConfigError, match=message):
        tmcore.apply(model, "diffrate", **config)
    assert tmcore.get_patch(model) is None


def test_keep_all_is_the_identity_without_reordering(vit):
    model, x = vit
    with torch.no_grad():
        ref = model.forward_features(**{"x": x["x"]})
        tmcore.apply(model, "diffrate", schedule="keep-all")
        out = model.forward_features(x["x"])
    assert torch.equal(out, ref)


def test_every_block_reorders_even_without_removal(vit):
    model, x = vit
    tmcore.apply(model, "diffrate", prune=65, merge=[65, 65, 65, 64])
    with torch.no_grad(), tmcore.trace(model) as t:
        model(**x)
    assert t.token_counts == [65, 65, 65, 65, 64]
    assert not torch.equal(t.source[:, :64], torch.arange(64).expand(3, 64))  # positions moved
    assert (t.source[:, 0] == 0).all()


def test_ste_min_passes_gradients_to_both_counts():
    n = torch.tensor(10.0, requires_grad=True)
    a, b = torch.tensor(7.0, requires_grad=True), torch.tensor(5.0, requires_grad=True)
    out = ste_min(n, a, b)
    out.backward()
    assert float(out.detach()) == 5.0 and float(a.grad) == 1.0 and float(b.grad) == 1.0 and n.grad is None


def test_search_moves_towards_target_and_writes_a_loadable_file(vit, tmp_path):
    model, x = vit
    torch.manual_seed(0)
    images = x["x"].repeat(2, 1, 1, 1)
    data = [(images + 0.1 * torch.randn_like(images), torch.randint(0, 7, (6,))) for _ in range(12)]
    out = tmp_path / "searched.safetensors"
    tmcore.apply(model, "diffrate", schedule="keep-all", search=True)
    start = float(tm_diffrate.flops(tm_diffrate.get_reducer(model), tmcore.bench.flop_model(model))) / 1e6
    target = 0.5 * start  # well below the uniform start: the FLOPs term must pull the counts down
    history = tm_diffrate.search(
        model, data, target, lr=0.05, min_lr=0.01, lam=50.0, flops_unit=1e6, out=out, progress=False
    )
    assert history.steps == 12
    assert history.gflops[-1] < history.gflops[0]
    assert abs(history.gflops[-1] * 1e3 - target) < abs(history.gflops[0] * 1e3 - target)
    assert history.loss[-1] < history.loss[0]
    # the model now carries the searched schedule
    reducer = tm_diffrate.get_reducer(model)
    assert not reducer.config.search and list(reducer.prune_kept) == history.prune
    model.eval()
    assert counts(model, x)[1:] == history.tokens
    # the file loads back onto a fresh model; the card is a schedule_file too
    fresh = tiny_timm_models()["vit"]()
    tmcore.load(fresh, out)
    assert counts(fresh, x)[1:] == history.tokens
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["prune"] == history.prune and card["merge"] == history.merge
    other = tiny_timm_models()["vit"]()
    tmcore.apply(other, "diffrate", schedule_file=str(out.with_suffix(".json")))
    assert counts(other, x)[1:] == history.tokens


def test_search_arguments_are_checked(vit):
    model, x = vit
    with pytest.raises(tmcore.InvalidConfigError, match="target_flops=-1"):
        tm_diffrate.search(model, [], -1)
    with pytest.raises(tmcore.InvalidConfigError, match="epochs=0"):
        tm_diffrate.search(model, [], 1.0, epochs=0)


def test_search_logits_round_trip_through_save(vit, tmp_path):
    model, _ = vit
    tmcore.apply(model, "diffrate", schedule="keep-all", search=True)
    reducer = tm_diffrate.get_reducer(model)
    with torch.no_grad():
        reducer.prune_logits[2, 3] = 4.0
    tmcore.save(model, tmp_path / "s.safetensors")
    fresh = tiny_timm_models()["vit"]()
    tmcore.load(fresh, tmp_path / "s.safetensors")
    assert torch.equal(tm_diffrate.get_reducer(fresh).prune_logits, reducer.prune_logits.detach())
    assert tm_diffrate.get_reducer(fresh).searched_schedule() == reducer.searched_schedule()


def test_masked_softmax_self_loop_is_softmax_with_policy():
    """tmcore's `masked_softmax` with ``self_loop`` and ``eps=1e-6`` equals the official
    ``softmax_with_policy`` (its structure written out here); without it a switched-off query
    does not attend to itself."""
    from tmcore.state import masked_softmax

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    policy = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 1, 1, 1, 0]], dtype=torch.float64)
    weight = policy.reshape(2, 1, 1, 6)
    eye = torch.eye(6, dtype=torch.float64).view(1, 1, 6, 6)
    weight = weight + (1.0 - weight) * eye
    e = (logits - logits.max(dim=-1, keepdim=True)[0]).exp() * weight
    expected = (e + 1e-6 / 6) / (e.sum(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(masked_softmax(logits, policy, eps=1e-6, self_loop=True), expected, rtol=0, atol=1e-15)
    plain = masked_softmax(logits, policy, eps=1e-6)
    assert plain[0, 0, 2, 2] < 1e-6 < expected[0, 0, 2, 2]
