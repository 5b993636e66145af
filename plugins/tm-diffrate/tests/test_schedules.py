"""Published schedules: the token counts per block on a DeiT-S equal the running minimum
('eff.' column of the published table), and named schedules are refused on other models."""

from __future__ import annotations

import pytest
import torch

import tmcore
from tm_diffrate import PUBLISHED, token_counts
from tmcore.registry import registry

EFFECTIVE = {  # tokens after each block, recomputed by hand from compression_rate.json
    "deit-t-1.0": [197, 197, 196, 190, 186, 154, 148, 148, 145, 135, 125, 21],
    "deit-s-2.9": [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3],
}


def test_every_published_entry_is_well_formed():
    assert len(PUBLISHED) == 15
    for name, entry in PUBLISHED.items():
        assert len(entry.prune) == len(entry.merge) == 12, name
        assert entry.prune[0] == entry.merge[0] == 197, name


def test_running_minimum():
    for name, expected in EFFECTIVE.items():
        entry = PUBLISHED[name]
        assert token_counts(entry.prune, entry.merge, 197) == expected


def test_deit_small_counts_follow_the_schedule():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    tmcore.apply(model, "diffrate", schedule="deit-s-2.9")
    with torch.no_grad(), tmcore.trace(model) as t:
        model(torch.randn(1, 3, 224, 224))
    assert t.token_counts == [197, *EFFECTIVE["deit-s-2.9"]]


def test_named_schedule_refused_on_another_model(tiny_model):
    info = registry.adapter_for(tiny_model).describe(tiny_model)
    if not info.class_token:
        pytest.skip("no class token")
    with pytest.raises(tmcore.InvalidConfigError, match="deit-s-2.9.*12 blocks of 197 tokens"):
        tmcore.apply(tiny_model, "diffrate", schedule="deit-s-2.9")
    assert tmcore.get_patch(tiny_model) is None
