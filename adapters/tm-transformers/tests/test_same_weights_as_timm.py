"""One ViT, two libraries: a tiny timm VisionTransformer converted to transformers'
ViTForImageClassification gives the same logits unpatched and under every installed reducer's
example configs (float64), so both adapters put the same reduction in the same place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tmcore

timm = pytest.importorskip("timm")
tf = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::tmcore.ScheduleClampWarning")


def _copy(dst: nn.Module, src: nn.Module | None = None, weight: torch.Tensor | None = None, bias=None) -> None:
    """Copy a Linear / LayerNorm / Conv2d, or explicit weight and bias tensors, into ``dst``."""
    with torch.no_grad():
        dst.weight.copy_(src.weight if src is not None else weight)
        dst.bias.copy_(src.bias if src is not None else bias)


def timm_to_transformers(vit: nn.Module) -> nn.Module:
    """``ViTForImageClassification`` with the weights of a timm ``VisionTransformer`` (class
    token, token pooling, no LayerScale / QK-norm)."""
    c, heads = vit.embed_dim, vit.blocks[0].attn.num_heads
    config = tf.ViTConfig(
        hidden_size=c,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=heads,
        intermediate_size=vit.blocks[0].mlp.fc1.out_features,
        image_size=vit.patch_embed.img_size[0],
        patch_size=vit.patch_embed.patch_size[0],
        num_labels=vit.num_classes,
        layer_norm_eps=vit.norm.eps,
        hidden_act="gelu",  # exact (erf) GELU, as timm's nn.GELU
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    hf = tf.ViTForImageClassification(config).to(torch.float64).eval()
    emb = hf.vit.embeddings
    with torch.no_grad():
        emb.cls_token.copy_(vit.cls_token)
        emb.position_embeddings.copy_(vit.pos_embed)
    _copy(emb.patch_embeddings.projection, vit.patch_embed.proj)
    for theirs, ours in zip(vit.blocks, hf.vit.layers):
        _copy(ours.layernorm_before, theirs.norm1)
        qkv_w, qkv_b = theirs.attn.qkv.weight.chunk(3), theirs.attn.qkv.bias.chunk(3)  # rows: q, k, v
        for proj, w, b in zip((ours.attention.q_proj, ours.attention.k_proj, ours.attention.v_proj), qkv_w, qkv_b):
            _copy(proj, weight=w, bias=b)
        _copy(ours.attention.o_proj, theirs.attn.proj)
        _copy(ours.layernorm_after, theirs.norm2)
        _copy(ours.mlp.fc1, theirs.mlp.fc1)
        _copy(ours.mlp.fc2, theirs.mlp.fc2)
    _copy(hf.vit.layernorm, vit.norm)
    _copy(hf.classifier, vit.head)
    return hf


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=7)
    vit = vit.double().eval()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    return vit, timm_to_transformers(vit), images


def test_unpatched_logits_are_identical(pair):
    vit, hf, images = pair
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=images).logits, vit(images), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "reducer", sorted(n for n, r in tmcore.reducers().items() if "model" in getattr(r.obj, "scopes", {"model"}))
)
def test_every_reducer_gives_the_same_logits(pair, reducer):
    vit, hf, images = pair
    for config in tmcore.registry.registry.reducers[reducer].obj.example_configs:
        tmcore.apply(vit, reducer, replace=True, **config)
        tmcore.apply(hf, reducer, replace=True, **config)
        try:
            with torch.no_grad(), tmcore.trace(vit) as t_timm, tmcore.trace(hf) as t_hf:
                ref = vit(images)
                out = hf(pixel_values=images).logits
        finally:
            tmcore.remove(vit)
            tmcore.remove(hf)
        assert [torch.as_tensor(c).tolist() for c in t_hf.token_counts] == [
            torch.as_tensor(c).tolist() for c in t_timm.token_counts
        ], config
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11, msg=f"{reducer} {config}")
