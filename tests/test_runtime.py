"""The runtime and the per-layer inputs: per-block needs, the class-token row, one-way imports."""

from __future__ import annotations

import typing

import pytest
import torch

import tmcore
from tmcore import BaseReducer, LayerInputs, ModelInfo, PluginError, Runtime, TokenState


def _qkv(b=2, h=3, n=9, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("with_bias", [False, True])
def test_cls_attn_is_row_zero_of_the_full_attention(with_bias):
    """The class row from one query equals row 0 of the full matrix, size bias included."""
    q, k, v = _qkv()
    bias = None
    if with_bias:
        size = torch.randint(1, 6, (2, 9, 1)).double()
        bias = size.log().transpose(1, 2).unsqueeze(1)  # [B, 1, 1, N], as TokenState.attn_bias builds it
    inputs = LayerInputs({"q": q, "k": k, "v": v}, bias, 0.5)
    torch.testing.assert_close(inputs.cls_attn, inputs.attn[:, :, 0], rtol=1e-14, atol=1e-14)
    logits = (q * 0.5) @ k.transpose(-1, -2) + (0 if bias is None else bias)
    torch.testing.assert_close(inputs.attn, logits.softmax(-1), rtol=1e-14, atol=1e-14)


def test_inputs_outside_the_blocks_needs_are_an_error():
    q, k, v = _qkv()
    inputs = LayerInputs({"q": q, "k": k, "v": v}, None, 0.5, frozenset({"keys"}))
    assert inputs.keys.shape == (2, 9, 4)
    for name in ("cls_attn", "attn", "values"):
        with pytest.raises(RuntimeError, match=f"read '{name}' in a block whose needs"):
            getattr(inputs, name)


class _PerLayer(BaseReducer):
    name = "per_layer"
    requires = frozenset({"keys", "values"})

    def needs(self, layer):
        return [frozenset(), frozenset({"keys"}), frozenset({"keys", "values"})][layer]

    def match(self, layer, scores, state):
        return None


def _info(layers=3):
    return ModelInfo(family="test", num_layers=layers, num_tokens=10, num_protected=1, class_token=True)


def test_runtime_asks_each_blocks_needs_once():
    runtime = Runtime(_PerLayer(tmcore.ReducerConfig(), _info()), _info())
    assert runtime.layer_needs == (frozenset(), frozenset({"keys"}), frozenset({"keys", "values"}))


def test_needs_beyond_requires_is_a_plugin_error():
    class Greedy(_PerLayer):
        requires = frozenset({"keys"})

    with pytest.raises(PluginError, match=r"block 2 needs \['values'\].*`requires`"):
        Runtime(Greedy(tmcore.ReducerConfig(), _info()), _info())


class _Live(_PerLayer):
    """Needs narrowed per forward, as LTMP's thresholds do: the runtime asks ``live_needs``."""

    live = (frozenset(), frozenset(), frozenset({"keys"}))
    seen: list

    def live_needs(self):
        return self.live

    def score(self, layer, inputs, state):
        self.seen.append((layer, inputs.needs, inputs.tokens.shape))
        return None


def test_live_needs_narrow_each_forward_and_are_checked_once_per_new_tuple():
    reducer = _Live(tmcore.ReducerConfig(), _info())
    reducer.seen = []
    runtime = Runtime(reducer, _info())
    x = torch.zeros(2, 10, 4)
    state = runtime.enter(0, x)
    assert tuple(runtime.block_needs(i, state) for i in range(3)) == reducer.live
    for layer in range(3):
        runtime.step(layer, x, state, None, 1.0)
    assert reducer.seen == [(0, frozenset(), (2, 10, 4)), (1, frozenset(), (2, 10, 4)), (2, {"keys"}, (2, 10, 4))]

    class Soft(_Live):
        def soft_step(self, layer, x, inputs, state):
            return x

    soft = Runtime(Soft(tmcore.ReducerConfig(), _info()), _info())
    state = soft.enter(0, x, training=True)  # soft-mask training reads what the blocks declared
    assert tuple(soft.block_needs(i, state) for i in range(3)) == soft.layer_needs

    reducer.live = (frozenset(), frozenset({"values"}), frozenset({"keys"}))  # block 1 declared keys only
    with pytest.raises(PluginError, match=r"live_needs\(\) returned .*'values'.*one subset of needs\(layer\)"):
        runtime.enter(0, x)


def test_default_score_reads_keys_only_where_needed():
    reducer = _PerLayer(tmcore.ReducerConfig(), _info())
    q, k, v = _qkv()
    state = TokenState(1, 9, False, None)
    assert reducer.score(0, LayerInputs({}, None, 1.0, reducer.needs(0)), state) is None
    scores = reducer.score(1, LayerInputs({"k": k}, None, 1.0, reducer.needs(1)), state)
    torch.testing.assert_close(scores.metric, k.mean(1))


def test_core_modules_import_one_way_and_annotations_resolve():
    """plan, tracing -> state -> reducer -> runtime -> adapter / api: no module imports one
    above it, so every public annotation resolves at runtime."""
    import tmcore.plan
    import tmcore.state
    import tmcore.tracing

    for module, forbidden in [
        (tmcore.plan, ("tmcore.state", "tmcore.reducer", "tmcore.runtime")),
        (tmcore.tracing, ("tmcore.state", "tmcore.reducer", "tmcore.runtime")),
        (tmcore.state, ("tmcore.reducer", "tmcore.runtime", "tmcore.adapter")),
    ]:
        source = open(module.__file__).read()
        for name in forbidden:
            assert f"from {name} import" not in source and f"import {name}" not in source, (module, name)
    for obj in (Runtime.__init__, Runtime.step, TokenState.__init__, tmcore.trace, tmcore.Adapter.patch):
        typing.get_type_hints(obj)
