"""EViT beyond the conformance suite: the kept tokens are the top-k of an explicitly computed class
attention, the fused token is EViT's weighted sum, logits equal a reference written from EViT's
code path, counts per block, default blocks, and configuration errors."""

from __future__ import annotations

import math

import pytest
import torch

import tmcore
from tm_topk import TopK, default_layers, evit_plan, fuse_weighted_sum, keep_count
from tmcore import InvalidConfigError, UnsupportedModelError
from tmcore.testing import tiny_timm_models
from tmcore.testing.reference import float64_timm, vit_forward

timm = pytest.importorskip("timm")


@pytest.fixture
def vit():
    return tiny_timm_models()["vit"]()


def _images(batch=4, seed=3):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(model, x):
    with torch.no_grad(), tmcore.trace(model) as t:
        out = model(x)
    return out, t


def evit_reference_forward(model, images, keep_rate, layers, fuse):
    """EViT's block (evit.py, ``Attention.forward`` / ``Block.forward``) on a timm ViT, written from
    its code path: ``left_tokens = ceil(keep_rate * (N - 1))``, no change when that is ``N - 1``;
    ``cls_attn = attn[:, :, 0, 1:].mean(1)``; ``topk(sorted=True)``; the extra token is
    ``sum(non_topk * non_topk_attn)``; ``cat([cls, x_others, extra])``."""

    def reduce(layer, x, size, keys, attn, values):
        n = x.shape[1]
        left = math.ceil(keep_rate * (n - 1))
        if layer not in layers or left == n - 1:
            return x, size
        cls_attn = attn[:, :, 0, 1:].mean(dim=1)  # [B, N - 1]
        _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
        non_cls = x[:, 1:]
        x_others = non_cls.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if not fuse:
            return torch.cat([x[:, :1], x_others], dim=1), size
        others = torch.ones_like(cls_attn, dtype=torch.bool).scatter_(1, idx, False)  # the complement
        extra = (non_cls * (cls_attn * others).unsqueeze(-1)).sum(dim=1, keepdim=True)
        return torch.cat([x[:, :1], x_others, extra], dim=1), size

    return model.forward_head(vit_forward(model, images, reduce, attention=True)[0])


@pytest.mark.parametrize("keep_rate", [0.7, 0.5])
@pytest.mark.parametrize("fuse", [True, False])
def test_model_equals_evit_reference(keep_rate, fuse):
    model, images = float64_timm("deit_small_patch16_224", depth=4, img_size=112)
    layers = default_layers(4)
    with torch.no_grad():
        ref = evit_reference_forward(model, images, keep_rate, layers, fuse)
        tmcore.apply(model, "topk", keep_rate=keep_rate, fuse_token=fuse)
        out = model(images)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_kept_tokens_are_the_top_k_of_the_explicit_class_attention(vit):
    """Block 1's class attention computed by hand from its q and k (softmax over all keys, mean
    over heads); a brute-force sort picks the k kept tokens and their order; the rest are fused."""
    captured = []
    block = vit.blocks[1]
    handle = block.attn.qkv.register_forward_hook(lambda m, a, out: captured.append(out))
    x = _images()
    for fuse in (True, False):
        captured.clear()
        tmcore.apply(vit, "topk", keep_rate=0.6, layers=[1], fuse_token=fuse, replace=True)
        _, t = _run(vit, x)
        b, n, _ = captured[0].shape
        h = block.attn.num_heads
        q, k, _ = captured[0].reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * block.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0].mean(dim=1)  # [B, N]
        left = math.ceil(0.6 * (n - 1))
        for i in range(b):
            ranked = sorted(range(1, n), key=lambda j: (-float(attn[i, j]), j))
            top, rest = ranked[:left], ranked[left:]
            assert t.source[i, 0] == 0, "the class token stays first"
            assert t.source[i, top].tolist() == list(range(1, left + 1)), "kept: top-k by descending attention"
            assert (t.source[i, rest] == (left + 1 if fuse else -1)).all()
        assert t.token_counts == [65, 65, 1 + left + fuse, 1 + left + fuse, 1 + left + fuse]
    handle.remove()


def test_fused_token_is_the_attention_weighted_sum():
    gen = torch.Generator().manual_seed(0)
    b, n, c, p = 3, 12, 5, 1
    attn = torch.rand(b, n, generator=gen, dtype=torch.float64).softmax(dim=1)
    x = torch.randn(b, n, c, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 4, (b, n, 1), generator=gen).double()
    plan = evit_plan(attn, 0.5, p, fuse=True)
    out, new_size = fuse_weighted_sum(x, plan, size)
    k = keep_count(0.5, n - p)
    for i in range(b):
        ranked = sorted(range(p, n), key=lambda j: (-float(attn[i, j]), j))
        top, rest = ranked[:k], ranked[k:]
        assert torch.equal(out[i, 0], x[i, 0]) and torch.equal(out[i, 1 : k + 1], x[i, top]), "kept tokens exact"
        fused = sum(attn[i, j] * x[i, j] for j in rest)
        torch.testing.assert_close(out[i, k + 1], fused, rtol=1e-12, atol=1e-12)
        assert new_size[i, k + 1, 0] == size[i, rest].sum(), "the fused token's size is the sum of its sizes"
    # the core's weighted mean would give sum(a x) / sum(a): a different token (EViT's is not normalised)
    mean, _ = tmcore.merge_tokens(x, plan, size)
    assert not torch.allclose(mean[:, k + 1], out[:, k + 1])


def test_gradients_reach_the_attention_through_the_fused_token():
    """EViT's extra token multiplies by the (differentiable) attention: so does ours."""
    attn = torch.rand(2, 9, dtype=torch.float64).softmax(dim=1).requires_grad_()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    plan = evit_plan(attn, 0.5, 1, fuse=True)
    out, _ = fuse_weighted_sum(x, plan, None)
    out[:, -1].sum().backward()  # the fused token only
    rest = plan.src.new_ones(2, 9, dtype=torch.bool)
    rest[:, 0] = False
    rest.scatter_(1, plan.keep[:, 1:-1], False)  # kept tokens get no gradient
    torch.testing.assert_close(attn.grad[rest].view(2, -1), x.sum(-1)[rest].view(2, -1))
    assert (attn.grad[~rest] == 0).all()


def test_keep_count_is_evits_ceil():
    assert keep_count(0.7, 196) == 138  # DeiT-S: 196 patches
    assert keep_count(0.14, 50) == 8  # 0.14 * 50 = 7.000000000000001 in double precision, as in EViT
    assert keep_count(1.0, 50) == 50 and keep_count(1e-9, 50) == 1
    # per-sample counts of a padded batch are the same doubles
    attn = torch.rand(2, 61, dtype=torch.float64)
    plan = evit_plan(attn, 0.14, 1, fuse=False, valid=torch.arange(61) < torch.tensor([[61], [51]]))
    assert plan.valid.sum(1).tolist() == [1 + keep_count(0.14, 60), 1 + 8]


def test_counts_on_deit_small_at_the_defaults():
    model = timm.create_model("deit_small_patch16_224").eval()
    tmcore.apply(model, "topk")
    _, t = _run(model, torch.randn(2, 3, 224, 224))
    # 196 -> 138 + fused, 139 -> 98 + fused, 99 -> 70 + fused
    assert t.token_counts == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 3
    assert all(type(c) is int for c in t.token_counts), "a fixed-count plan: no ragged batch"
    assert tmcore.get_patch(model).runtime.layer_needs == tuple(
        frozenset({"cls_attn"}) if i in (3, 6, 9) else frozenset() for i in range(12)
    )
    tmcore.apply(model, "topk", fuse_token=False, replace=True)
    _, t = _run(model, torch.randn(2, 3, 224, 224))
    assert t.token_counts == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 3


def test_fusion_conserves_sizes_and_pruning_keeps_them(vit):
    tmcore.apply(vit, "topk", keep_rate=0.5)
    _, t = _run(vit, _images())
    torch.testing.assert_close(t.sizes.sum(1), torch.full((4, 1), 64.0 + 1, dtype=torch.float64))
    assert (t.source >= 0).all(), "every token survives inside some output"
    tmcore.apply(vit, "topk", keep_rate=0.5, fuse_token=False, replace=True)
    _, t = _run(vit, _images())
    assert torch.equal(t.sizes, torch.ones_like(t.sizes))


@pytest.mark.parametrize(
    "depth, layers", [(12, [3, 6, 9]), (4, [1, 2, 3]), (24, [6, 12, 18]), (6, [1, 3, 4]), (2, [0, 1]), (1, [0])]
)
def test_default_layers(depth, layers):
    assert default_layers(depth) == layers


def test_only_the_listed_blocks_need_class_attention(vit):
    tmcore.apply(vit, "topk", layers=[2])
    assert tmcore.get_patch(vit).runtime.layer_needs == (frozenset(), frozenset(), frozenset({"cls_attn"}), frozenset())
    hooked = [any(m._forward_hooks for m in b.attn.modules()) for b in vit.blocks]
    assert hooked == [False, False, True, False], "capture hooks in the reducing block only"
    tmcore.apply(vit, "topk", keep_rate=1, replace=True)
    assert tmcore.get_patch(vit).runtime.layer_needs == (frozenset(),) * 4, "keep_rate 1 reads nothing"
    x = _images()
    with torch.no_grad():
        ref = tmcore.remove(vit)(x)
        assert torch.equal(tmcore.apply(vit, "topk", keep_rate=1.0, layers=[0, 1, 2, 3])(x), ref)


def test_a_model_without_a_class_token_is_refused():
    model = tiny_timm_models()["reg4_avgpool"]()
    with pytest.raises(UnsupportedModelError, match=r"'topk' .*no class token"):
        tmcore.apply(model, "topk")


@pytest.mark.parametrize(
    "config, message",
    [
        ({"layers": [1, 2, 4]}, r"layers=\[1, 2, 4\]: block\(s\) \[4\] out of range for a model with 4 blocks; "),
        ({"layers": [12]}, r"allowed: 0 to 3"),
        ({"layers": [1, 1]}, r"layers=\[1, 1\]: must be None .*; block\(s\) \[1\] listed more than once"),
        ({"layers": [1.0, 2]}, r"layers=\[1.0, 2\]: must be None \(the default blocks\) or a list of distinct"),
        ({"layers": [True]}, r"layers=\[True\]: must be None"),
        ({"layers": [-1]}, r"layers=\[-1\]: must be None"),
        ({"layers": "1,2"}, r"layers='1,2': must be None"),
        ({"layers": 3}, r"layers=3: must be None"),
        ({"keep_rate": 0}, r"keep_rate=0: must be a finite number in \(0, 1\]"),
        ({"keep_rate": 1.5}, r"keep_rate=1.5: must be a finite number in \(0, 1\]"),
        ({"keep_rate": math.nan}, r"keep_rate=nan: must be a finite number"),
        ({"keep_rate": True}, r"keep_rate=True: must be a finite number"),
        ({"keep_rate": "0.7"}, r"keep_rate='0.7': must be a finite number"),
        ({"fuse_token": 1}, r"fuse_token=1: must be True or False"),
        ({"prop_attn": "no"}, r"prop_attn='no': must be True or False"),
        ({"ratio": 0.7}, r"unknown config key 'ratio'"),
    ],
)
def test_bad_config_is_refused_naming_the_field(vit, config, message):
    with pytest.raises(InvalidConfigError, match=message) as err:
        tmcore.apply(vit, "topk", **config)
    assert "'topk'" in str(err.value)
    assert tmcore.get_patch(vit) is None


def test_reducer_attributes():
    reg = tmcore.reducers()["topk"]
    assert reg.obj is TopK and reg.distribution == "tm-topk"
    assert TopK.requires == {"cls_attn"} and TopK.requires_class_token and TopK.merge_only


def test_save_and_load_round_trip(vit, tmp_path):
    x = _images()
    for config in ({"keep_rate": 0.6}, {"keep_rate": 0.5, "layers": [0, 3], "fuse_token": False}):
        tmcore.apply(vit, "topk", replace=True, **config)
        tmcore.save(vit, tmp_path / "topk.safetensors")
        fresh = tmcore.load(tiny_timm_models()["vit"](), tmp_path / "topk.safetensors")
        assert tmcore.get_patch(fresh).reducer.config == tmcore.get_patch(vit).reducer.config
        with torch.no_grad():
            assert torch.equal(fresh(x), vit(x))
