"""EViT's top-k pruning with inattentive-token fusion ("Not All Patches are What You Need:
Expediting Vision Transformers via Token Reorganizations", Liang et al., ICLR 2022;
github.com/youweiliang/evit), a strong baseline in "Which Tokens to Use?" (Haurum et al., 2023).

At each listed block, after attention (and its residual), keep the class token and the
``k = ceil(keep_rate * (N - 1))`` tokens the class token attends to most (attention averaged over
heads), in descending order of that attention, and with ``fuse_token`` append one extra token,
the sum of all other tokens each multiplied by its class attention. What EViT's code does, at
commit 180a7a3 of ``evit.py``:

- ``k``: ``left_tokens = math.ceil(keep_rate * (N - 1))`` (line 209), ``N`` counting the class token
  and, after a fusing block, the fused token, which is then a candidate like any other; when
  ``k == N - 1`` the block returns before reducing (line 212).
- score: ``attn[:, :, 0, 1:]`` (line 215), the class token's row of the softmax over **all** keys
  (class token included, not renormalised over the others), then ``.mean(dim=1)`` over heads
  (line 216).
- kept order: ``torch.topk(cls_attn, left_tokens, largest=True, sorted=True)`` (line 217), so the
  kept tokens come by descending attention, after the class token (line 264 / 266).
- fusion: ``extra_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1)`` (line 263), an
  attention-weighted **sum**, not a mean (the weights sum to the attention those tokens got, below
  1), appended last: ``torch.cat([x[:, 0:1], x_others, extra_token])`` (line 264).
- where: in ``Block.forward`` after ``x = x + drop_path(attn(...))`` and before the MLP (lines
  251-268), tmcore's ``attention`` position.
- which blocks: ``deit_small_patch16_shrink_base(base_keep_rate=0.7, drop_loc=(3, 6, 9))``, and
  ``main.py`` (commit 0999f09) ``--drop_loc '(3, 6, 9)'`` (line 53), ``--base_keep_rate 0.7`` (line
  47); fusion is the ``--fuse_token`` flag (line 46) the README's evaluation command sets.

The decision is `evit_plan` (a `tmcore.Plan` whose ``weight`` holds the fusion weights); the
core's weighted *mean* (`tmcore.plan.merge_tokens`) would divide the fused token by the sum of
those weights, so `TopK.reduce` applies the plan with `fuse_weighted_sum` instead: the exact sum.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from tmcore import BaseReducer, LayerInputs, Plan, ReducerConfig, Scores, TokenState
from tmcore.config import Blocks, Bool, Number, blocks_in_range
from tmcore.matching import rank_key, real_tokens
from tmcore.plan import merge_tokens, pack, reduce, unit_sizes

__all__ = ["TopK", "TopKConfig", "default_layers", "evit_plan", "fuse_weighted_sum", "keep_count"]


def keep_count(keep_rate: float, num_tokens: int) -> int:
    """EViT's ``left_tokens``: ``ceil(keep_rate * num_tokens)`` in double precision, exactly as
    Python computes it (``0.7 * 10`` is ``7.000000000000001``, so 8 of 10 tokens stay)."""
    return math.ceil(keep_rate * num_tokens)


def default_layers(num_layers: int) -> list[int]:
    """The blocks that reduce by default: ``[L // 4, L // 2, 3 L // 4]`` (distinct), EViT's
    ``(3, 6, 9)`` for its 12-block DeiTs, the same three quarter points for other depths
    (``[1, 2, 3]`` for 4 blocks, ``[6, 12, 18]`` for 24), so a model keeps about
    ``keep_rate ** 3`` of its tokens at any depth."""
    return sorted({num_layers * i // 4 for i in (1, 2, 3)})


def evit_plan(
    cls_attn: Tensor, keep_rate: float, num_protected: int, fuse: bool, valid: Tensor | None = None
) -> Plan | None:
    """EViT's decision for one block.

    Args:
        cls_attn: ``[B, N]`` the class token's attention to every token, averaged over heads
            (softmax over all keys; the prefix's entries are ignored).
        keep_rate: ``0 < keep_rate <= 1``; ``k = keep_count(keep_rate, N - p)`` tokens stay.
        num_protected: ``p``, the protected prefix (class, distillation, register tokens), kept
            in front in place.
        fuse: fold every other unprotected token into one extra token, last.
        valid: ``[B, N]`` bool padding mask (real tokens first): sample ``i`` keeps
            ``keep_count(keep_rate, T_i)`` of its ``T_i`` real unprotected tokens, as alone;
            padding is never kept or fused.

    Returns:
        ``None`` where ``k = N - p`` (EViT leaves the block alone), else a Plan whose output is
        ``[prefix, the k most attended tokens by descending attention (ties: by position), fused
        token]``. With ``fuse``, the fused slot is seeded by the most attended of the others and
        the rest join it (``src``), and ``weight`` ``[B, N, 1]`` is each such token's attention
        (1 for every other token): `fuse_weighted_sum` applies it. With ``valid``, a ragged plan
        of ``p + k (+ 1)`` slots, the bound for the longest sample (no host synchronisation).
    """
    b, n = cls_attn.shape
    p = num_protected
    t = n - p
    k = keep_count(keep_rate, t)
    if k >= t:
        return None
    device = cls_attn.device
    prefix = torch.arange(p, device=device).expand(b, p)
    a = cls_attn[:, p:]
    with torch.no_grad():
        ranked = rank_key(a) if valid is None else rank_key(a).masked_fill(~valid[:, p:], -math.inf)  # padding last
        order = ranked.argsort(dim=1, descending=True, stable=True)  # [B, T], most attended first
        if valid is None:
            top = order[:, :k] + p
            if not fuse:
                return Plan.prune(torch.cat([prefix, top], dim=1), n)
            rest = order[:, k:] + p  # the inattentive tokens: the first seeds the fused slot
            keep = torch.cat([prefix, top, rest[:, :1]], dim=1)
            src = rest[:, 1:]
            plan = Plan(keep=keep, src=src, src_dst=torch.full_like(src, p + k), num_in=n)
            inattentive = (torch.arange(t, device=device) >= k).expand(b, t)  # by rank
        else:
            real = real_tokens(valid, p)  # [B]
            k_i = torch.ceil(keep_rate * real.double()).long()  # as keep_count, per sample
            reduces = (k_i < real).unsqueeze(1)
            rank = torch.arange(t, device=device)
            kept = rank < k_i.unsqueeze(1)
            if fuse:
                kept |= (rank == k_i.unsqueeze(1)) & reduces  # the fused slot's seed
            # candidate p + j is rank j; a sample that keeps all its tokens stays as it is (as
            # alone, where EViT returns early), in positional order
            candidates = torch.where(reduces, torch.cat([prefix, order + p], dim=1), torch.arange(n, device=device))
            kept = torch.where(reduces, torch.cat([valid[:, :p], kept], dim=1), valid)
            if not fuse:
                return pack(candidates, kept, n, num_out=p + k)
            # ranks k_i + 1 ... T_i - 1 join the fused slot; T - k - 1 entries cover the longest
            # sample (k_i <= k), and a shorter one's extra entries fall on its padding (dropped)
            joins = k_i.unsqueeze(1) + 1 + torch.arange(t - k - 1, device=device)
            src = order.gather(1, joins) + p
            target = torch.where(joins < real.unsqueeze(1), p + k_i.unsqueeze(1), -1)
            plan = pack(candidates, kept, n, src, target, num_out=p + k + 1)
            inattentive = (rank >= k_i.unsqueeze(1)) & valid[:, p:].gather(1, order)  # by rank
    # the attention of the fused tokens (by rank, then by position), 1 for the others; outside
    # no_grad, so that in training gradients reach the attention through the fused token, as in EViT
    by_rank = torch.where(inattentive, a.gather(1, order), 1.0)
    weight = torch.cat([cls_attn.new_ones(b, p), torch.ones_like(a).scatter(1, order, by_rank)], dim=1)
    return plan.with_weight(weight.unsqueeze(-1))


def fuse_weighted_sum(x: Tensor, plan: Plan, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """Apply a plan whose groups are **sums** of ``weight * token`` (EViT's fused token), where
    `tmcore.plan.merge_tokens` would take weighted means.

    Args:
        x: ``[B, N, C]`` features.
        plan: a Plan with ``weight`` ``[B, N, 1]`` (1 for a token alone in its slot, so kept tokens
            are copied exactly).
        size: ``[B, N, 1]`` token sizes, ``None`` for all ones.

    Returns:
        ``([B, M, C] sum of weight x token per slot, [B, M, 1] summed sizes)``.
    """
    if size is None:
        size = unit_sizes(x)
    return reduce(x * plan.weight.to(x.dtype), plan, "sum"), reduce(size, plan, "sum")


Layers = Blocks(optional=True)


class TopKConfig(ReducerConfig):
    keep_rate: Number(gt=0, le=1) = Field(
        default=0.7,
        description="fraction of a listed block's unprotected tokens kept, k = ceil(keep_rate * tokens), "
        "0 < keep_rate <= 1 (EViT's base_keep_rate)",
    )
    layers: Layers = Field(
        default=None,
        description="0-based indices of the blocks that reduce, distinct, below the model's block count; "
        "None: [L//4, L//2, 3L//4], EViT's [3, 6, 9] for 12 blocks",
    )
    fuse_token: Bool = Field(
        default=True, description="fuse the other tokens into one extra token, their class-attention-weighted sum"
    )
    prop_attn: Bool = Field(
        default=False, description="proportional attention (+log(size) on attention logits); EViT has none"
    )


class TopK(BaseReducer):
    """EViT. At each listed block, after attention, keep the protected prefix and the
    ``ceil(keep_rate * (N - p))`` tokens with the highest class attention (averaged over heads),
    by descending attention; with ``fuse_token`` every other token is folded into one extra token,
    last, the sum of those tokens times their class attention (EViT's formula, not a mean). Sizes
    are summed (the fused token's size is the number of tokens it holds). Needs a class token.

    Padded batches: each sample keeps ``ceil(keep_rate * T_i)`` of its ``T_i`` real unprotected
    tokens (attention to padding is 0, and padding ranks last), exactly as alone.
    """

    name: ClassVar[str] = "topk"
    config_model = TopKConfig
    requires = frozenset({"cls_attn"})
    requires_class_token = True
    merge_only = True  # with fuse_token (the default); fuse_token=False drops tokens
    description = "EViT top-k: keep the most class-attended tokens, fuse the rest (Liang et al., ICLR 2022)"
    identity_config = {"keep_rate": 1.0}
    # the default blocks for any depth (4-block test models: 1, 2, 3), a stronger rate, every block
    example_configs = ({"keep_rate": 0.7}, {"keep_rate": 0.5}, {"keep_rate": 0.8, "layers": [0, 1, 2, 3]})

    config: TopKConfig

    def setup(self) -> None:
        cfg, info = self.config, self.info
        layers = default_layers(info.num_layers) if cfg.layers is None else cfg.layers
        blocks_in_range(self.name, "layers", layers, info.num_layers, cfg.layers)
        self.layers = frozenset(layers) if cfg.keep_rate < 1 else frozenset()
        self.prop_attn = cfg.prop_attn

    def needs(self, layer: int) -> frozenset[str]:
        return self.requires if layer in self.layers else frozenset()

    def score(self, layer: int, inputs: LayerInputs, state: TokenState) -> Scores | None:
        """Importance ``[B, N]``: the class token's attention averaged over heads (at least float32, so that
        half-precision attentions of ~1/N do not tie), ``None`` where the block does not reduce."""
        if not inputs.needs:
            return None
        cls_attn = inputs.cls_attn
        return Scores(importance=cls_attn.to(torch.promote_types(cls_attn.dtype, torch.float32)).mean(dim=1))

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None:
        if scores is None:
            return None
        cfg = self.config
        return evit_plan(scores.importance, cfg.keep_rate, state.num_protected, cfg.fuse_token, state.valid)

    def reduce(self, x: Tensor, plan: Plan, state: TokenState) -> tuple[Tensor, Tensor | None]:
        """Fusing plans (with ``weight``): EViT's weighted sum; pruning plans: the core's."""
        if plan.weight is None:
            return merge_tokens(x, plan, state.size)
        return fuse_weighted_sum(x, plan, state.size)
