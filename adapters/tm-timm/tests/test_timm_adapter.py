"""The timm adapter on real timm architectures (random init; no weights install offline)."""

from __future__ import annotations

import threading

import pytest
import torch

import tmcore
from tmcore import IncompatibleVersionError, NoAdapterError, TokenState
from tmcore.testing import AdapterConformance, tiny_timm_models

timm = pytest.importorskip("timm")


def _images(model, batch=2, seed=0):
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "name",
    [
        "deit_small_patch16_224",
        "deit_small_distilled_patch16_224",
        "deit3_small_patch16_224",
        "vit_medium_patch16_reg4_gap_256",
    ],
)
def test_r0_matches_unpatched_and_remove_is_bit_identical(name):
    torch.manual_seed(0)
    model = timm.create_model(name, depth=3).eval()
    x = _images(model)
    with torch.no_grad():
        ref = model(x)
        tmcore.apply(model, "tome", r=0)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)
        tmcore.apply(model, "tome", r=8, replace=True)
        with tmcore.trace(model) as t:
            model(x)
        n = model.patch_embed.num_patches + model.num_prefix_tokens
        assert t.token_counts == [n, n - 8, n - 16, n - 24]
        tmcore.remove(model)
        assert torch.equal(model(x), ref)


def test_describe_finds_the_protected_prefix():
    adapter = tmcore.registry.registry.adapters["timm"].obj()
    cases = {
        "deit_small_patch16_224": (197, 1, "token"),
        "deit_small_distilled_patch16_224": (198, 2, "token"),
        "vit_medium_patch16_reg4_gap_256": (260, 4, "avg"),
    }
    for name, (tokens, protected, pool) in cases.items():
        info = adapter.describe(timm.create_model(name, depth=1))
        assert (info.num_tokens, info.num_protected, info.pool) == (tokens, protected, pool), name


def test_trace_counts_deit_small_r13():
    torch.manual_seed(0)
    model = tmcore.apply(timm.create_model("deit_small_patch16_224").eval(), "tome", r=13)
    with torch.no_grad(), tmcore.trace(model) as t:
        model(_images(model, 1))
    assert t.token_counts == [197, 184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54, 41]
    assert t.sizes.shape == (1, 41, 1) and t.sizes.sum().item() == 197
    assert t.source_matrix().shape == (1, 41, 197)


def test_trace_counts_vit_base_decreasing_schedule():
    torch.manual_seed(0)
    model = tmcore.apply(timm.create_model("vit_base_patch16_224").eval(), "tome", r=(16, -1))
    with torch.no_grad(), tmcore.trace(model) as t:
        model(_images(model, 1))
    assert t.token_counts == [197, 165, 136, 110, 87, 67, 50, 36, 25, 17, 12, 10, 10]


@pytest.mark.parametrize("fused", [True, False])
def test_proportional_attention_equals_duplicated_keys(fused):
    """A token of size s receives the attention of s copies of its key (docs/algorithms.md 1.5, 9.7)."""
    from timm.layers import Attention

    torch.manual_seed(0)
    attn = Attention(16, num_heads=2).double().eval()
    attn.fused_attn = fused
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    sizes = torch.tensor([[1, 3, 1, 2, 4], [2, 1, 1, 5, 1]])
    state = TokenState(num_protected=1, num_input=5, prop_attn=True, trace=None)
    state.size = sizes.unsqueeze(-1).double()
    with torch.no_grad():
        out = attn(x, attn_mask=state.attn_bias(torch.float64))
        for b in range(2):
            index = torch.repeat_interleave(torch.arange(5), sizes[b])
            dup = attn(x[b : b + 1, index])
            first = torch.cat([torch.zeros(1, dtype=torch.long), sizes[b].cumsum(0)[:-1]])
            torch.testing.assert_close(out[b], dup[0, first], rtol=1e-6, atol=1e-8)


def test_fused_and_explicit_attention_agree():
    model = tiny_timm_models()["layerscale_qknorm"]()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    tmcore.apply(model, "tome", r=6)
    with torch.no_grad():
        fused = model(x)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        explicit = model(x)
    torch.testing.assert_close(fused, explicit, rtol=1e-10, atol=1e-10)


def test_average_pool_is_size_weighted():
    model = tiny_timm_models()["reg4_avgpool"]()
    tmcore.apply(model, "tome", r=8)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), tmcore.trace(model) as t:
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
    size = t.sizes[:, 4:]
    expected = model.fc_norm((feats[:, 4:] * size).sum(1) / size.sum(1))
    torch.testing.assert_close(pooled, expected)
    assert not torch.allclose(pooled, model.fc_norm(feats[:, 4:].mean(1)))


def test_autocast_bfloat16_keeps_bias_dtype_in_step():
    torch.manual_seed(0)
    model = tmcore.apply(timm.create_model("deit_tiny_patch16_224", depth=3).eval(), "tome", r=20)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), tmcore.trace(model) as t:
        out = model(_images(model))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert t.token_counts == [197, 177, 157, 137]


def test_two_threads_give_the_sequential_results():
    model = tmcore.apply(tiny_timm_models()["deit_distilled"](), "tome", r=5)
    inputs = [
        torch.randn(n, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) for n in (1, 4)
    ]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    barrier, results, errors = threading.Barrier(2), [[], []], []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(25):
                    barrier.wait()
                    results[i].append(model(inputs[i]))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for i in range(2):
        for out in results[i]:
            assert torch.equal(out, expected[i])


def test_incompatible_timm_version_is_refused(monkeypatch):
    import tmcore.adapter

    model = tiny_timm_models()["vit"]()
    monkeypatch.setattr(tmcore.adapter.metadata, "version", lambda name: "1.1.0")
    with pytest.raises(IncompatibleVersionError, match=r"supports timm>=1\.0,<1\.1, but timm==1\.1\.0 is installed"):
        tmcore.apply(model, "tome", r=2)
    monkeypatch.setattr(tmcore.adapter.metadata, "version", lambda name: "0.9.16")
    with pytest.raises(IncompatibleVersionError, match="timm==0.9.16"):
        tmcore.apply(model, "tome", r=2)
    assert tmcore.get_patch(model) is None
    monkeypatch.setattr(tmcore.adapter.metadata, "version", lambda name: "1.0.32.dev0+local")
    tmcore.apply(model, "tome", r=2)  # a development build inside the range is supported


def test_unsupported_timm_models_are_named():
    from timm.models.vision_transformer import ResPostBlock, VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, block_fn=ResPostBlock)
    with pytest.raises(NoAdapterError, match=r"block 0 is a ResPostBlock.*Supported: timm VisionTransformer"):
        tmcore.apply(model, "tome", r=2)
    assert all("forward" not in m.__dict__ for m in model.modules())
    pooled = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, global_pool="map", class_token=False
    )
    with pytest.raises(NoAdapterError, match="attention pooling"):
        tmcore.apply(pooled, "tome", r=2)
    with pytest.raises(NoAdapterError, match=r"timm\.models\.resnet\.ResNet"):
        tmcore.apply(timm.create_model("resnet10t"), "tome", r=2)


def test_caller_attention_masks_are_refused():
    model = tmcore.apply(tiny_timm_models()["vit"](), "tome", r=2)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(tmcore.TmcoreError, match="attn_mask"):
        model.forward_features(x, attn_mask=torch.zeros(1, 1, 65, 65, dtype=torch.float64))


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=4).eval()
    tmcore.apply(model, "tome", r=16)
    x = _images(model)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_layer_inputs_match_an_explicit_attention(monkeypatch):
    """keys / cls_attn / attn / values as a reducer sees them equal a hand computation from the
    block's own weights, with the log(size) bias from the previous merge included."""
    from tmcore import BaseReducer, bipartite_soft_matching
    from tmcore.registry import Registration, registry

    seen = []

    class Recorder(BaseReducer):
        name = "recorder"
        requires = frozenset({"keys", "cls_attn", "attn", "values"})
        prop_attn = True

        def score(self, layer, inputs, state):
            size = None if state.size is None else state.size.clone()
            seen.append((inputs.keys, inputs.cls_attn, inputs.attn, inputs.values, size))
            return inputs.keys

        def match(self, layer, scores, state):
            return bipartite_soft_matching(scores, 6, state.num_protected)

    registry.ensure_loaded()
    monkeypatch.setitem(registry.reducers, "recorder", Registration("recorder", Recorder, "tests", "0"))
    model = tmcore.apply(tiny_timm_models()["layerscale_qknorm"](), "recorder")
    normed = []
    for blk in model.blocks:
        blk.norm1.register_forward_hook(lambda m, a, out: normed.append(out))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
        for layer in (0, 1):
            attn, y = model.blocks[layer].attn, normed[layer]
            b, n, c = y.shape
            q, k, v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(q), attn.k_norm(k)
            logits = (q * attn.scale) @ k.transpose(-1, -2)
            keys, cls_attn, probs, values, size = seen[layer]
            if layer:
                logits = logits + size.log()[:, None, None, :, 0]
            expected = logits.softmax(-1)
            torch.testing.assert_close(keys, k.mean(1))
            torch.testing.assert_close(probs, expected)
            torch.testing.assert_close(cls_attn, expected[:, :, 0])
            torch.testing.assert_close(values, v)


def test_soft_mask_attention_composes_the_attention_submodules(monkeypatch):
    """Training mode with a reducer that has ``soft_step``: attention runs as the masked
    softmax of tmcore.state (mask multiplies each key's weight), the probabilities reach the
    reducer, the mask gets gradients, pooling ignores masked tokens."""
    from tmcore import BaseReducer
    from tmcore.registry import Registration, registry
    from tmcore.state import masked_softmax

    seen, gate = [], torch.tensor([1.0] * 40 + [0.0] * 28, dtype=torch.float64, requires_grad=True)

    class SoftRecorder(BaseReducer):
        name = "soft_recorder"
        requires = frozenset({"keys", "attn"})
        prop_attn = True
        merge_only = False

        def match(self, layer, scores, state):
            return None

        def soft_step(self, layer, x, inputs, state):
            seen.append((inputs.attn, inputs.keys, state.mask, None if state.size is None else state.size.clone()))
            state.mask = state.mask * gate
            state.size = torch.full_like(x[..., :1], 2.0)
            return x

    registry.ensure_loaded()
    monkeypatch.setitem(registry.reducers, "soft_recorder", Registration("soft_recorder", SoftRecorder, "tests", "0"))
    model = tmcore.apply(tiny_timm_models()["reg4_avgpool"](), "soft_recorder")
    normed, projected, fused_calls = [], [], []
    for blk in model.blocks:
        blk.norm1.register_forward_hook(lambda m, a, out: normed.append(out))
        blk.attn.proj.register_forward_hook(lambda m, a, out: projected.append(out))
        blk.attn.register_forward_hook(lambda m, a, out: fused_calls.append(1))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.train()
    with tmcore.trace(model) as t:
        out = model(x)
    assert not fused_calls and len(seen) == 4
    attn, y = model.blocks[1].attn, normed[1]
    b, n, c = y.shape
    q, k, v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-1, -2) + torch.log(seen[1][3])[:, None, None, :, 0]
    probs = masked_softmax(logits, gate.expand(b, n))
    torch.testing.assert_close(seen[1][0], probs)
    torch.testing.assert_close(seen[1][1], k.mean(1))
    torch.testing.assert_close(projected[1], attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c)))
    assert [m.shape for m in t.masks] == [(2, 68)] * 4 and t.token_counts[-1].tolist() == [40, 40]
    feats = model.forward_features(x)
    pooled = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pooled, model.fc_norm(feats[:, 4:40].mean(1)))
    out.sum().backward()
    assert gate.grad is not None and gate.grad[40:].abs().sum() > 0, "the mask of removed keys gets gradients"
    steps = len(seen)
    model.eval()
    with torch.no_grad():
        model(x)
    # eval: no soft_step; the reducer reads 'attn', so attention stays explicit (computed once)
    assert not fused_calls and len(seen) == steps


@pytest.mark.parametrize(
    "reducer, config, fused",
    [("tome", {"r": 4}, True), ("ltmp", {"prune_threshold": 0.004}, False), ("ltmp", {}, True)],
)
def test_fused_attention_unless_the_reducer_reads_the_probabilities(reducer, config, fused):
    """SDPA stays in use; a reducer that reads the full attention ('attn', LTMP where its prune
    threshold can fire) gets it from one explicit attention instead of the fused one plus a
    recomputation; LTMP's default prune threshold (0) cannot fire, so it keeps SDPA."""
    if reducer not in tmcore.reducers():
        pytest.skip(f"{reducer} not installed")
    model = tmcore.apply(tiny_timm_models()["vit"](), reducer, **config).eval()
    calls = []
    for blk in model.blocks:
        blk.attn.register_forward_hook(lambda m, a, out: calls.append(1))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert len(calls) == (len(model.blocks) if fused else 0)


def test_per_block_needs_decide_hooks_and_explicit_attention(monkeypatch):
    """A block captures and computes only what the reducer's ``needs(layer)`` names: no hooks
    where it needs nothing, fused attention wherever it does not read the full matrix."""
    from tmcore import BaseReducer
    from tmcore.registry import Registration, registry

    per_block = [frozenset(), frozenset({"keys"}), frozenset({"keys", "attn"}), frozenset({"cls_attn", "values"})]
    seen = {}

    class PerBlock(BaseReducer):
        name = "per_block"
        requires = frozenset({"keys", "cls_attn", "attn", "values"})

        def needs(self, layer):
            return per_block[layer]

        def score(self, layer, inputs, state):
            seen[layer] = {name: getattr(inputs, name).shape for name in sorted(inputs.needs)}

        def match(self, layer, scores, state):
            return None

    registry.ensure_loaded()
    monkeypatch.setitem(registry.reducers, "per_block", Registration("per_block", PerBlock, "tests", "0"))
    model = tmcore.apply(tiny_timm_models()["vit"](), "per_block")
    hooked = [
        {name for name in ("qkv", "q_norm", "k_norm") if getattr(blk.attn, name)._forward_hooks} for blk in model.blocks
    ]
    assert hooked == [set(), {"k_norm"}, {"k_norm", "q_norm"}, {"k_norm", "q_norm", "qkv"}]
    fused = []
    for i, blk in enumerate(model.blocks):
        blk.attn.register_forward_hook(lambda m, a, out, i=i: fused.append(i))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert fused == [0, 1, 3], "only the block that reads the full attention computes it explicitly"
    assert seen == {
        0: {},
        1: {"keys": (2, 65, 16)},
        2: {"attn": (2, 3, 65, 65), "keys": (2, 65, 16)},
        3: {"cls_attn": (2, 3, 65), "values": (2, 3, 65, 16)},
    }


class TestTimmAdapterConformance(AdapterConformance):
    adapter = "timm"
