"""Random token pruning, the baseline of "Which Tokens to Use? Investigating Token Reduction in
Vision Transformers" (Haurum et al., ICCV-W 2023): in every block, after attention, drop ``r``
unprotected tokens chosen uniformly at random, seeded and reproducible.

The draws are `tm_random.draws.draw_keys` (a counter-based hash, no generator state); the
decision is the core's `tmcore.matching.prune_lowest_in_order` with its `tmcore.schedule.PruneSchedule`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from tm_random.draws import draw_keys, layer_key
from tmcore import BaseReducer, LayerInputs, Plan, ReducerConfig, RSchedule, Scores, TokenState
from tmcore.config import Bool, Integer
from tmcore.matching import prune_lowest_in_order
from tmcore.schedule import PruneSchedule, parse_r

__all__ = ["RandomPrune", "RandomPruneConfig"]


class RandomPruneConfig(ReducerConfig):
    r: RSchedule = Field(
        description="tokens dropped per block: int >= 0, a per-block list, or (r, inflect) with -1 <= inflect <= 1",
    )
    seed: Integer(ge=0) = Field(default=0, description="seed of the draws: the same seed drops the same tokens")
    prop_attn: Bool = Field(
        default=False,
        description="proportional attention (+log(size) on attention logits); pruning keeps every size 1, so off",
    )


class RandomPrune(BaseReducer):
    """Random pruning. In every block, after attention, drop ``r`` unprotected tokens chosen
    uniformly at random; the protected prefix stays in front and the survivors keep their
    original order. Reads nothing from the attention, so every block keeps fused attention.

    Draws are a pure function of ``(seed, block, sample number, token position)``
    (`tm_random.draws`): the same seed drops the same tokens on every run and device, and a sample
    drops the same tokens alone (inside ``runtime.numbered_from(i)``) as at position ``i`` of its
    batch. Sample numbers are ``state.sample_index(x)``: batch positions, so a sample in another
    position of another batch draws differently.

    ``r`` beyond a block's unprotected tokens minus one is capped with a `ScheduleClampWarning`.
    On a padded batch each sample drops ``min(r, T_i - 1)`` of its ``T_i`` real unprotected tokens,
    exactly as alone; padding is never kept ahead of a real token or counted.
    """

    name: ClassVar[str] = "random"
    config_model = RandomPruneConfig
    requires = frozenset()
    merge_only = False
    stochastic = True
    description = "Random: drop r random tokens per block, seeded (baseline, Haurum et al., ICCV-W 2023)"
    identity_config = {"r": 0}
    example_configs = ({"r": 4}, {"r": 8}, {"r": 12})

    config: RandomPruneConfig

    def setup(self) -> None:
        cfg, info = self.config, self.info
        self.prop_attn = cfg.prop_attn
        self.schedule = PruneSchedule(parse_r(info.num_layers, cfg.r, self.name), info.num_tokens, info.num_protected)
        self.keys = tuple(layer_key(cfg.seed, layer) for layer in range(info.num_layers))

    def needs(self, layer: int) -> frozenset[str]:
        return frozenset()

    def score(self, layer: int, inputs: LayerInputs, state: TokenState) -> Scores | None:
        """Importance ``[B, N]``: int64 random sort keys of block ``layer``'s tokens (``None``
        where it drops nothing)."""
        if not self.schedule.active(layer):
            return None
        x = inputs.tokens
        return Scores(importance=draw_keys(self.keys[layer], state.sample_index(x), x.shape[1]))

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None:
        r = self.schedule(state.num_input)[layer]
        if r == 0 or scores is None:
            return None
        return prune_lowest_in_order(scores.importance, r, state.num_protected, state.valid)
