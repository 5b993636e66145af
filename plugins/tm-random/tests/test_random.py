"""Random pruning beyond the conformance suite: the hash, counts per block, the protected prefix,
original order, reproducibility (seeds, samples alone), no global RNG, fused attention, the cap
and configuration errors."""

from __future__ import annotations

import pytest
import torch

import tmcore
from tm_random import RandomPrune, draw_keys, layer_key, splitmix64
from tm_random.draws import GAMMA
from tmcore import InvalidConfigError, ScheduleClampWarning
from tmcore.matching import prune_lowest_in_order
from tmcore.testing import tiny_timm_models

pytest.importorskip("timm")

MASK64 = (1 << 64) - 1


def _mix(z: int) -> int:
    """splitmix64's mix on plain Python integers, the reference for the int64 tensor version."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _output(state: int, i: int) -> int:
    return _mix((state + (i + 1) * GAMMA) & MASK64)


@pytest.fixture
def vit():
    return tiny_timm_models()["vit"]()


def _images(batch=4, seed=3):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(model, x):
    with torch.no_grad(), tmcore.trace(model) as t:
        out = model(x)
    return out, t


def test_splitmix64_matches_the_reference_sequence():
    """The published first outputs of splitmix64 from seed 1234567 (the reference C code)."""
    state, words = 1234567, []
    for _ in range(5):
        state = (state + GAMMA) & MASK64
        words.append(state)
    signed = torch.tensor([w - (1 << 64) if w >> 63 else w for w in words])
    out = [v & MASK64 for v in splitmix64(signed).tolist()]
    assert out == [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ]


def test_int64_words_equal_unsigned_arithmetic_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    z = torch.randint(-(2**63), 2**63 - 1, (4096,), generator=gen, dtype=torch.long)
    z[:4] = torch.tensor([0, -1, -(2**63), 2**63 - 1])  # sign bit set / clear, all ones
    assert [v & MASK64 for v in splitmix64(z).tolist()] == [_mix(v & MASK64) for v in z.tolist()]


def test_draws_are_the_chained_outputs_of_seed_layer_sample_position():
    seed, layer, samples = 2**63 - 5, 3, torch.tensor([0, 7, 2**40])
    draws = draw_keys(layer_key(seed, layer), samples, 6)
    key = _output(seed, layer)
    assert layer_key(seed, layer) & MASK64 == key
    expected = [[_output(_output(key, s), j) >> 26 << 24 | (2**24 - 1 - j) for j in range(6)] for s in samples.tolist()]
    assert draws.tolist() == expected
    assert draws.dtype == torch.long and (draws >= 0).all() and (draws < 2**62).all()
    with pytest.raises(ValueError, match="at most 16777216 tokens"):
        draw_keys(key, samples, 2**24 + 1)


def test_keys_are_distinct_even_where_random_bits_tie():
    """Within a sample no two keys are equal, so topk and a sort drop the same tokens."""
    draws = draw_keys(layer_key(0, 0), torch.arange(8), 4096)
    assert all(len(set(row)) == 4096 for row in draws.tolist())
    assert torch.equal(draws & (2**24 - 1), (2**24 - 1 - torch.arange(4096)).expand(8, -1))


def test_draws_look_uniform():
    u = draw_keys(layer_key(0, 0), torch.arange(64), 197).double() / 2**62  # [64, 197]
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=10, min=0, max=1)
    chi2 = float(((counts - u.numel() / 10) ** 2 / (u.numel() / 10)).sum())
    assert chi2 < 30, chi2  # 9 degrees of freedom: p < 1e-3 beyond 27.9
    # neighbouring samples and positions are not correlated
    assert abs(float(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1])) < 0.05
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.05


def test_prune_keeps_the_prefix_then_the_highest_draws_in_original_order():
    score = torch.tensor([[9, 5, 1, 7, 3, 8, 0], [0, 1, 2, 3, 4, 5, 6]])
    plan = prune_lowest_in_order(score, 3, num_protected=1)
    assert plan.keep.tolist() == [[0, 1, 3, 5], [0, 4, 5, 6]]
    assert plan.valid is None and plan.src.shape[1] == 0
    with pytest.raises(ValueError, match=r"r=6 is outside \[0, 5\]"):
        prune_lowest_in_order(score, 6, num_protected=1)


def test_counts_per_block_prefix_order_and_sizes(vit):
    tmcore.apply(vit, "random", r=8)
    _, t = _run(vit, _images())
    assert t.token_counts == [65, 57, 49, 41, 33]
    assert all(type(c) is int for c in t.token_counts), "a fixed-count plan: no ragged batch"
    assert torch.equal(t.sizes, torch.ones(4, 33, 1, dtype=torch.float64)), "pruning keeps every size 1"
    assert (t.source[:, 0] == 0).all(), "the class token stays first"
    assert ((t.source >= 0).sum(1) == 33).all()
    kept = t.source[t.source >= 0].view(4, 33)  # slots of the surviving tokens, by input position
    assert torch.equal(kept, torch.arange(33).expand(4, 33)), "survivors keep their original order"


def test_each_block_drops_the_lowest_draws(vit):
    """Block 0 drops exactly the 8 patch tokens whose draws for (seed, block 0, sample, position)
    are lowest."""
    tmcore.apply(vit, "random", r=8, seed=5, replace=True)
    tmcore.apply(vit, "random", r=[8], seed=5, replace=True)
    _, t = _run(vit, _images())
    draws = draw_keys(layer_key(5, 0), torch.arange(4), 65)[:, 1:]
    dropped = draws.argsort(dim=1)[:, :8] + 1
    assert (t.source.gather(1, dropped) == -1).all()
    assert ((t.source == -1).sum(1) == 8).all()


def test_same_seed_same_drops_other_seed_other_drops(vit):
    x = _images()
    tmcore.apply(vit, "random", r=8, seed=1)
    out1, t1 = _run(vit, x)
    again, t1b = _run(vit, x)
    assert torch.equal(t1.source, t1b.source) and torch.equal(out1, again)
    fresh = tmcore.apply(tiny_timm_models()["vit"](), "random", r=8, seed=1)
    assert torch.equal(_run(fresh, x)[1].source, t1.source), "a fresh apply with the same seed drops the same"
    tmcore.apply(vit, "random", r=8, seed=2, replace=True)
    _, t2 = _run(vit, x)
    assert not torch.equal(t2.source, t1.source)
    assert (t2.source != t1.source).any(1).all(), "every sample drops other tokens under another seed"


def test_samples_draw_differently_and_alone_as_in_the_batch(vit):
    x = _images(5)
    tmcore.apply(vit, "random", r=8, seed=4)
    runtime = tmcore.get_patch(vit).runtime
    out, t = _run(vit, x)
    same_image = _run(vit, x[:1].expand(5, -1, -1, -1))[1]
    assert len({tuple(row) for row in same_image.source.tolist()}) == 5, "sample numbers draw differently"
    for i in range(5):
        with runtime.numbered_from(i):
            one, ti = _run(vit, x[i : i + 1])
        assert torch.equal(ti.source, t.source[i : i + 1])
        torch.testing.assert_close(one, out[i : i + 1], rtol=1e-12, atol=1e-12)
    assert not torch.equal(_run(vit, x[3:4])[1].source, t.source[3:4]), "alone and unnumbered: sample 0's draws"


def test_global_rng_is_neither_read_nor_advanced(vit):
    x = _images()
    tmcore.apply(vit, "random", r=8)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _, t = _run(vit, x)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)
    assert torch.equal(_run(vit, x)[1].source, t.source)


def test_no_block_reads_attention_inputs(vit):
    tmcore.apply(vit, "random", r=8)
    assert tmcore.get_patch(vit).runtime.layer_needs == (frozenset(),) * 4
    captures = [m._forward_hooks for b in vit.blocks for m in b.attn.modules()]
    assert not any(captures), "no capture hooks: fused attention everywhere"


def test_schedules_and_the_cap(vit):
    tmcore.apply(vit, "random", r=[10, 0, 3])
    assert _run(vit, _images())[1].token_counts == [65, 55, 55, 52, 52]
    tmcore.apply(vit, "random", r=(8, -1), replace=True)  # ToMe's ramp: 16, 10, 5, 0
    assert _run(vit, _images())[1].token_counts == [65, 49, 39, 34, 34]
    with pytest.warns(ScheduleClampWarning, match=r"block 0: r=70 -> 63, block 1: r=70 -> 0"):
        tmcore.apply(vit, "random", r=70, replace=True)
    assert _run(vit, _images())[1].token_counts == [65, 2, 2, 2, 2]


def test_reducer_attributes():
    reg = tmcore.reducers()["random"]
    assert reg.obj is RandomPrune and reg.distribution == "tm-random"
    assert RandomPrune.stochastic and not RandomPrune.merge_only and RandomPrune.requires == frozenset()


@pytest.mark.parametrize(
    "config, message",
    [
        ({}, r"r is required"),
        ({"r": -1}, r"r=-1: must be an int >= 0"),
        ({"r": 4, "seed": -1}, r"seed=-1: must be an int >= 0"),
        ({"r": 4, "seed": True}, r"seed=True: must be an int"),
        ({"r": 4, "seed": 1.0}, r"seed=1.0: must be an int"),
        ({"r": 4, "seed": "1"}, r"seed='1': must be an int"),
        ({"r": 4, "seed": 2**64}, r"does not fit in 64 bits"),
        ({"r": 4, "prop_attn": 1}, r"prop_attn=1: must be True or False"),
        ({"r": 4, "ratio": 0.5}, r"unknown config key 'ratio'"),
    ],
)
def test_bad_config_is_refused_naming_the_field(vit, config, message):
    with pytest.raises(InvalidConfigError, match=message) as err:
        tmcore.apply(vit, "random", **config)
    assert "'random'" in str(err.value)
    assert tmcore.get_patch(vit) is None


def test_save_and_load_round_trip(vit, tmp_path):
    tmcore.apply(vit, "random", r=(6, 0.5), seed=99, prop_attn=True)
    tmcore.save(vit, tmp_path / "random.safetensors")
    fresh = tmcore.load(tiny_timm_models()["vit"](), tmp_path / "random.safetensors")
    assert tmcore.get_patch(fresh).reducer.config.seed == 99
    x = _images()
    with torch.no_grad():
        assert torch.equal(fresh(x), vit(x))


def test_meta_device_draws_shapes_only():
    draws = draw_keys(layer_key(0, 1), torch.arange(3, device="meta"), 10)
    assert draws.shape == (3, 10) and draws.device.type == "meta"
