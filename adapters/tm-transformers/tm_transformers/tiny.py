"""Tiny random-init models of every supported family and inputs for them (`tmcore.testing`).

float64, eval mode, 4 layers, width 48, 3 heads, every dropout probability 0 (so training mode
computes the same function), SDPA attention; about 64 tokens: text models take up to 64
positions, vision models see 32 px images in 4 px patches (64 patches plus prefix tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["tiny_models", "example_inputs", "TEXT_LENGTH", "TEXT_CONFIG"]

TEXT_LENGTH = 60
"""Length of the longest example sentence (the others are shorter: ``N - 9``, ``N // 3``, ...)."""

_COMMON = dict(
    num_hidden_layers=4, hidden_size=48, num_attention_heads=3, intermediate_size=192, attn_implementation="sdpa"
)
# a small vocabulary: words repeat within a sentence, so some keys are alike, as in real text
TEXT_CONFIG = dict(
    _COMMON, vocab_size=40, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
)
"""The tiny BERT config (also for heads the tests add)."""
_VISION = dict(_COMMON, image_size=32, patch_size=4, num_channels=3)


def _factory(
    model_cls: Any, config_cls: Any, post: Callable[[nn.Module], None] | None = None, **config: Any
) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = model_cls(config_cls(**config))
        if post is not None:
            post(model)
        return model.double().eval()

    return make


def _trained_like_prefix(model: nn.Module) -> None:
    """DeiT initialises its class and distillation tokens and position embeddings to zeros: two
    identical prefix tokens with zero values, which no trained model has (and which gives class
    importance scores of exactly 0). Draw them as ViT does."""
    emb = model.deit.embeddings
    with torch.no_grad():
        for p in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
            nn.init.trunc_normal_(p, std=model.config.initializer_range)


def tiny_models() -> dict[str, Callable[[], nn.Module]]:
    """BERT (bare and with a sequence-classification head), RoBERTa, XLM-R (classifier),
    DistilBERT, ViT (classifier), DeiT with its distillation token (classifier with teacher)
    and CLIP's vision tower; empty without transformers."""
    try:
        import transformers as tf
    except ImportError:
        return {}
    roberta = dict(TEXT_CONFIG, max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2)  # 2 offset
    distilbert = dict(n_layers=4, dim=48, n_heads=3, hidden_dim=192, vocab_size=40, max_position_embeddings=64)
    distilbert.update(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, attn_implementation="sdpa")
    vit = dict(_VISION, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=7, layer_norm_eps=1e-6)
    clip = dict(_VISION, attention_dropout=0.0)
    return {
        "bert": _factory(tf.BertModel, tf.BertConfig, **TEXT_CONFIG),
        "bert_classifier": _factory(tf.BertForSequenceClassification, tf.BertConfig, **TEXT_CONFIG, num_labels=5),
        "roberta": _factory(tf.RobertaModel, tf.RobertaConfig, **roberta),
        "xlm_roberta_classifier": _factory(
            tf.XLMRobertaForSequenceClassification, tf.XLMRobertaConfig, **roberta, num_labels=3
        ),
        "distilbert": _factory(tf.DistilBertModel, tf.DistilBertConfig, **distilbert),
        "vit_classifier": _factory(tf.ViTForImageClassification, tf.ViTConfig, **vit),
        "deit_distilled": _factory(
            tf.DeiTForImageClassificationWithTeacher, tf.DeiTConfig, _trained_like_prefix, **vit
        ),
        "clip_vision": _factory(tf.CLIPVisionModel, tf.CLIPVisionConfig, **clip),
    }


def _lengths(n: int, batch: int) -> list[int]:
    """``n``, ``n - 9``, ``n // 3``, then the same two shorter each round: every sample differs."""
    base = (n, n - 9, n // 3)
    return [max(base[i % 3] - 2 * (i // 3), 3) for i in range(batch)]


def example_inputs(config: Any, modality: str, dtype: torch.dtype, batch: int = 3, seed: int = 1) -> dict[str, Tensor]:
    """Random images ``pixel_values`` for vision models; for text, token ids of different lengths
    per sample (a [CLS]-like first and a [SEP]-like last token), right-padded with the pad id,
    and the ``attention_mask``."""
    gen = torch.Generator().manual_seed(seed)
    if modality == "vision":
        # smooth random images (noise on a 4x coarser grid, upsampled): neighbouring patches look alike
        coarse = torch.randn(batch, config.num_channels, config.image_size // 4, config.image_size // 4, generator=gen)
        images = torch.nn.functional.interpolate(coarse, size=config.image_size, mode="bilinear", align_corners=False)
        return {"pixel_values": images.to(dtype)}
    offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    n = min(TEXT_LENGTH, config.max_position_embeddings - offset)
    lengths = torch.tensor(_lengths(n, batch))
    real = torch.arange(n) < lengths.unsqueeze(1)
    ids = torch.randint(5, config.vocab_size, (batch, n), generator=gen)  # ids 0-4: special tokens
    bos = getattr(config, "bos_token_id", None)
    eos = getattr(config, "eos_token_id", None)
    ids[:, 0] = 2 if bos is None else bos
    ids[torch.arange(batch), lengths - 1] = 3 if eos is None else eos
    ids = ids.masked_fill(~real, config.pad_token_id)
    return {"input_ids": ids, "attention_mask": real.long()}
