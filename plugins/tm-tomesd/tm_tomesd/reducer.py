"""ToMe for Stable Diffusion (Bolya and Hoffman, "Token Merging for Fast Stable Diffusion", CVPR-W
2023; tomesd 0.1.3) as a block-scope reducer: in the blocks of the finest resolutions, merge
``int(N * ratio)`` tokens of a 2-D stride partition before self-attention (and optionally
cross-attention and the feed-forward) and unmerge right after, by plain means, without sizes."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor

from tm_tomesd.merge import random2d_plan, stride_partition
from tmcore import BaseReducer, InvalidInputError, LayerInputs, Plan, ReducerConfig, Scores, TokenState
from tmcore.config import Bool, Integer, Number, Refused, Rule, field_type
from tmcore.draws import POSITION_BITS, draw_keys, layer_key
from tmcore.plan import merge_tokens

__all__ = ["ToMeSD", "ToMeSDConfig"]


def _check_seed(value: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63):
        return value
    raise Refused


Seed = field_type(
    Rule("None (tomesd's generator, forked from the global RNG) or an int >= 0 (seeded partitions)", _check_seed),
    int | None,
)


class ToMeSDConfig(ReducerConfig):
    ratio: Number(ge=0, lt=1) = Field(default=0.5, description="fraction of a block's tokens merged, r = int(N ratio)")
    max_downsample: Integer(ge=1) = Field(
        default=1, description="merge in blocks at most this many times coarser than the latent (1, 2, 4 or 8)"
    )
    sx: Integer(ge=1) = Field(default=2, description="width of a destination cell, in tokens")
    sy: Integer(ge=1) = Field(default=2, description="height of a destination cell, in tokens")
    use_rand: Bool = Field(default=True, description="a random destination per cell (off for odd batches)")
    merge_attn: Bool = Field(default=True, description="merge around self-attention")
    merge_crossattn: Bool = Field(default=False, description="merge the queries of cross-attention")
    merge_mlp: Bool = Field(default=False, description="merge around the feed-forward")
    seed: Seed = Field(
        default=None,
        description="None: tomesd's generator (forked from the global RNG at the first call); an int: "
        "partitions drawn from (seed, block), the same at every call, fullgraph-compilable",
    )

    @model_validator(mode="after")
    def _ratio_fits_cells(self) -> ToMeSDConfig:
        cells = self.sx * self.sy
        top = 1 - 1 / cells
        if self.ratio > top:
            raise ValueError(
                f"ratio={self.ratio!r} merges more tokens than the sources of {self.sx} x {self.sy} cells hold (one "
                f"destination per cell); allowed: 0 <= ratio <= {top:g} (1 - 1 / (sx * sy))"
            )
        return self


class ToMeSD(BaseReducer):
    """ToMe for Stable Diffusion. Each block whose grid is at most ``max_downsample`` times coarser
    than the latent computes one plan from its input: the grid is cut into ``sy x sx`` cells with
    one destination each (random, or the top-left one), every other token finds its most similar
    destination (cosine of the raw block input), and the ``int(N * ratio)`` best-matched sources
    merge into theirs by a plain mean. The merged sub-layers run on ``N - r`` tokens and their
    outputs are copied back to every member before the residual add.

    Randomness as tomesd's: one partition per block call shared by the whole batch (the
    conditional and unconditional halves of classifier-free guidance see the same), none for odd
    batch sizes. With ``seed=None`` (tomesd's rule) the draws come from a generator forked from the
    global RNG of the input's device at the first merging call (the global RNG is untouched), so
    they depend on the calls since `tmcore.apply` and match tomesd's own draws; seed the global RNG
    before the first call to reproduce a run. That generator is host-side state, so
    ``torch.compile`` breaks the graph at the draw. With ``seed=k`` each block's partition is a
    pure function of ``(k, block)`` (`tmcore.draws`): the same at every call and step, reproducible
    anywhere, no graph break.
    """

    name: ClassVar[str] = "tomesd"
    config_model = ToMeSDConfig
    requires = frozenset()
    scopes = frozenset({"block"})
    stochastic = True
    description = "ToMe for SD: 2-D stride partition, merge and unmerge around each sub-layer (Bolya & Hoffman, 2023)"
    identity_config = {"ratio": 0.0}
    example_configs = (
        {"ratio": 0.5, "seed": 0},
        {"ratio": 0.3, "use_rand": False},
        {"ratio": 0.5, "merge_crossattn": True, "merge_mlp": True, "max_downsample": 2, "seed": 1},
    )

    config: ToMeSDConfig

    def setup(self) -> None:
        cfg = self.config
        self.prop_attn = False
        self.sublayers = frozenset(
            name
            for name, on in (("attn", cfg.merge_attn), ("cross_attn", cfg.merge_crossattn), ("mlp", cfg.merge_mlp))
            if on
        )
        self._layer_keys = (
            [layer_key(cfg.seed, layer) for layer in range(self.info.num_layers)] if cfg.seed is not None else []
        )
        self._generator: torch.Generator | None = None

    def needs(self, layer: int) -> frozenset[str]:
        return frozenset()

    def score(self, layer: int, inputs: LayerInputs, state: TokenState) -> Scores | None:
        block = state.block
        if block is None or block.downsample > self.config.max_downsample:
            return None
        return Scores(metric=inputs.tokens)

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None:
        if scores is None:
            return None
        cfg, grid = self.config, state.block.grid
        metric = scores.metric
        if grid is None:
            raise InvalidInputError(
                f"tomesd merges on the 2-D token grid, but block {layer}'s {metric.shape[1]} tokens fit no grid of the "
                "input; allowed: a latent whose every block sees a stride-2 downsampling of it"
            )
        h, w = grid
        r = int(metric.shape[1] * cfg.ratio)
        choice = self._choice(layer, metric, h // cfg.sy, w // cfg.sx)
        if r <= 0:
            return None
        order = stride_partition(h, w, cfg.sx, cfg.sy, choice, metric.device)
        return random2d_plan(metric, order, (h // cfg.sy) * (w // cfg.sx), r)

    def _choice(self, layer: int, metric: Tensor, hs: int, ws: int) -> Tensor | None:
        """``[hs, ws]`` destination positions in their cells, or ``None`` (top-left) for odd batches
        and ``use_rand=False``. tomesd's generator is made at the first merging call, whatever
        the ratio; it draws only where a block merges."""
        cfg, device = self.config, metric.device
        generator = self._generator_for(device) if cfg.seed is None else None
        if not cfg.use_rand or metric.shape[0] % 2 == 1 or int(metric.shape[1] * cfg.ratio) <= 0:
            return None
        cells = cfg.sx * cfg.sy
        if generator is None:
            keys = draw_keys(self._layer_keys[layer], torch.zeros(1, dtype=torch.long, device=device), hs * ws)
            return ((keys >> POSITION_BITS) % cells).view(hs, ws)
        draw = torch.randint(cells, size=(hs, ws, 1), device=generator.device, generator=generator)
        return draw.to(device).view(hs, ws)

    def _generator_for(self, device: torch.device) -> torch.Generator:
        """tomesd's generator: forked from the global RNG state of ``device`` at first use, forked
        again when the input moves to another device (other devices than CPU and CUDA keep the
        previous generator, or fork the CPU's)."""
        current = self._generator
        if current is not None and current.device == device:
            return current
        if device.type == "cpu":
            self._generator = torch.Generator(device="cpu").set_state(torch.get_rng_state())
        elif device.type == "cuda":
            self._generator = torch.Generator(device=device).set_state(torch.cuda.get_rng_state(device))
        elif current is None:
            self._generator = torch.Generator(device="cpu").set_state(torch.get_rng_state())
        return self._generator

    def reduce(self, x: Tensor, plan: Plan, state: TokenState) -> tuple[Tensor, Tensor | None]:
        """A plain mean of each group (tomesd keeps no sizes)."""
        return merge_tokens(x, plan, None)
