"""MCTF's own rules: token counts of the paper's DeiT settings, the merge amount rule, the
output order of the two-step matching, one-step-ahead attention rows, config errors."""

from __future__ import annotations

import pytest
import torch

import tmcore
from tm_mctf import bidirectional_plan, merge_count, merged_attention

MCTF_COUNTS = [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21]
FAST_COUNTS = [197, 197, 197, 129, 129, 129, 85, 85, 85, 56, 56, 56]


@pytest.fixture(scope="module")
def deit():
    timm = pytest.importorskip("timm")
    return timm.create_model("deit_tiny_patch16_224", num_classes=10).eval()


@pytest.mark.parametrize(
    ("config", "counts", "one_step_ahead"),
    [
        ({}, MCTF_COUNTS, 1),
        ({"r": 0.35, "layers": [3, 6, 9]}, FAST_COUNTS, 1),
        ({"r": 16, "layers": list(range(1, 12))}, MCTF_COUNTS, 0),
    ],
)
def test_deit_token_counts(deit, config, counts, one_step_ahead):
    """Tokens each block's values, attention output and MLP run on (the block-start merge done);
    with the merge after the block, the same counts leave each block."""
    tmcore.apply(deit, "mctf", replace=True, one_step_ahead=one_step_ahead, **config)
    with torch.no_grad(), tmcore.trace(deit) as t:
        deit(torch.randn(1, 3, 224, 224))
    tmcore.remove(deit)
    assert t.token_counts[1:] == counts


def test_merge_count_rule():
    assert merge_count(197, 16, 1) == 16
    assert merge_count(197, 0.35, 1) == 68 and merge_count(129, 0.35, 1) == 44 and merge_count(85, 0.35, 1) == 29
    assert merge_count(21, 16, 1) == 10  # half of the unprotected tokens at most
    assert merge_count(15, 16, 1) == 5  # at least 10 tokens stay
    assert merge_count(8, 16, 1) == 0 and merge_count(10, 0.5, 1) == 0  # never negative, nothing below 11
    t = torch.tensor([197, 21, 15, 8, 11])
    assert merge_count(t, 16, 1).tolist() == [merge_count(int(v), 16, 1) for v in t]
    assert merge_count(t, 0.35, 1).tolist() == [merge_count(int(v), 0.35, 1) for v in t]


def test_two_step_order_and_chain():
    """Hand-made scores, N = 8, class token: step 1 merges A token 3 (position 6) into B 1
    (position 3); step 2 merges B 1 (with it) into A 2 (position 4). Output:
    [A left ascending, B left by descending step-2 score]."""
    score = torch.full((1, 4, 4), 0.1, dtype=torch.float64)
    score[0, 0] = float("-inf")
    score[0, 3, 1] = 0.9  # A3 -> B1 in step 1
    score[0, 2, 1] = 0.8  # B1 -> A2 in step 2
    score[0, 1, 3] = 0.5  # B3's best step-2 score, ranks second
    score[0, 2, 0] = 0.3  # B0 third
    plan = bidirectional_plan(score, 1, 1, num_protected=1)
    assert plan.keep.tolist() == [[0, 2, 4, 7, 1, 5]]
    merged = dict(zip(plan.src[0].tolist(), plan.src_dst[0].tolist()))
    assert merged == {6: 2, 3: 2}  # the chain A3 -> B1 -> A2 ends in A2's slot


def test_merged_attention_rows_sum_to_one():
    torch.manual_seed(0)
    attn = torch.randn(2, 3, 9, 9, dtype=torch.float64).softmax(-1)
    score = torch.rand(2, 5, 4, dtype=torch.float64)
    score[:, 0] = float("-inf")
    plan = bidirectional_plan(score, 1, 2, num_protected=1)
    out = merged_attention(attn, plan.with_weight(torch.rand(2, 9, 1, dtype=torch.float64) + 0.1), None)
    assert out.shape == (2, 3, 6, 6)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 6, dtype=torch.float64))


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"r": 1.5}, "r=1.5"),
        ({"r": -1}, "r=-1"),
        ({"r": True}, "r=True"),
        ({"one_step_ahead": 3}, "one_step_ahead=3"),
        ({"pooling": "sum"}, "pooling='sum'"),
        ({"tau_info": -1}, "tau_info=-1"),
        ({"layers": [1, 1]}, "more than once"),
        ({"layers": [12]}, "out of range"),
    ],
)
def test_config_errors(deit, config, words):
    with pytest.raises(tmcore.InvalidConfigError, match=words.replace("[", r"\[")):
        tmcore.apply(deit, "mctf", **config)
    assert tmcore.get_patch(deit) is None
