"""The reducer protocol, its base class, and the model description adapters hand to reducers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails
from torch import Tensor

from tmcore.config import show
from tmcore.errors import InvalidConfigError
from tmcore.plan import Plan, merge_tokens
from tmcore.scores import Scores
from tmcore.state import INPUTS, LayerInputs, TokenState

__all__ = [
    "ModelInfo",
    "ReducerConfig",
    "TokenReducer",
    "BaseReducer",
    "INPUTS",
    "CONTRACT_ATTRIBUTES",
    "CONTRACT_METHODS",
    "check_reducer",
    "validate_config",
    "POSITIONS",
    "SCOPES",
    "SUBLAYERS",
]

POSITIONS = frozenset({"attention", "layer", "start"})
"""Where a block reduces: ``attention``, after the attention sub-layer and before the MLP (ToMe's
place in a pre-norm ViT; after the attention output LayerNorm in a post-norm BERT), ``layer``,
after the whole block (PiToMe's Hugging Face CLIP patch), or ``start``, on the block's input
before its attention, reading this block's own attention of the unreduced tokens (MCTF's
one-step-ahead attention; `tmcore.runtime.Runtime.run_block`). Adapters offer positions, the
reducer's ``position`` picks one."""

SCOPES = frozenset({"model", "block"})
"""How long a reduction lasts, a property of the model (`ModelInfo.scope`): ``model``, the
tokens stay reduced for the rest of the model (ViT, BERT, CLIP); ``block``, every block merges
its tokens, computes, and spreads the result back to all of them (ToMe for Stable Diffusion:
a UNet's convolutions need the full grid between blocks). A reducer lists the scopes it works
in (``scopes``, default ``{"model"}``); `tmcore.apply` refuses the others."""

SUBLAYERS = frozenset({"attn", "cross_attn", "mlp"})
"""The sub-layers of a block-scope block that can run on merged tokens: self-attention, the
queries of cross-attention, the feed-forward (a reducer's ``sublayers``, default ``{"attn"}``)."""


class ModelInfo(BaseModel):
    """What an adapter tells a reducer about the model it patches.

    Attributes:
        family: the adapter's family name, e.g. ``"timm.vit"``.
        num_layers: blocks that reduce (``L``).
        num_tokens: tokens entering the first block at the model's default input size.
        num_protected: length of the protected prefix (class, distillation, register tokens).
        class_token: position 0 is a class token (reducers that weigh tokens by the class
            token's attention need one; a model pooled by averaging may have none).
        dim: embedding width ``C`` of the token stream (FLOP models use it); 0 if unknown.
        pool: how the head pools tokens: ``token``, ``avg``, ``max``, ``avgmax`` or ``""`` (none).
        mae: MAE-style self-supervised weights (ToMe and PiToMe change defaults for them).
        modality: ``vision`` or ``text``.
        scope: ``model`` (reduced tokens stay reduced for the rest of the model) or ``block``
            (each block merges, computes and unmerges: diffusion models; `SCOPES`).
        grid: ``(height, width)`` of the first block's token grid at the model's default input
            size, row-major, for models whose tokens form one (diffusion latents); ``None``
            otherwise. Each forward's grid comes from its input
            (`tmcore.runtime.Runtime.open_block`).
        size_bias: the adapter can add ``log(size)`` to every block's attention logits
            (proportional attention); ``False`` where the backbone's attention takes no mask
            (SD3's joint attention): reducers then default to no proportional attention, and
            `tmcore.apply` refuses one that asks for it.
    """

    model_config = ConfigDict(frozen=True)

    family: str
    num_layers: int
    num_tokens: int
    num_protected: int
    class_token: bool = False
    dim: int = 0
    pool: str = "token"
    mae: bool = False
    modality: Literal["vision", "text"] = "vision"
    scope: Literal["model", "block"] = "model"
    grid: tuple[int, int] | None = None
    size_bias: bool = True


class ReducerConfig(BaseModel):
    """Base of every reducer's config: unknown keys are errors, values are immutable. Fields use
    the strict types of `tmcore.config` (no lax coercion; errors say what is allowed in words)."""

    # inf is a meaningful value (PPT's threshold); JSON keeps it as Infinity, not null, so save / load
    # round-trips it
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


@runtime_checkable
class TokenReducer(Protocol):
    """The reducer contract: everything tmcore's API, runtime, CLI and test kit call on a
    reducer, and nothing else. The registry checks a registered class against it when the plugin
    loads (`check_reducer`) and names what is missing; `BaseReducer` satisfies it with defaults.

    Steps, per block: ``score`` (a `tmcore.Scores`, or ``None``) -> ``match`` (a `Plan`, or
    ``None`` to leave the block alone) -> ``reduce`` (features and sizes through the plan: the
    weighted mean of `tmcore.plan.merge_tokens` by default; `merge_mlerp` and `merge_amax` are the
    core's other merge rules). Per-token tensors a method needs in later blocks travel in
    ``state.carry`` (reduced with every plan by the runtime).

    Class attributes: ``name`` (registry name), ``config_model`` (a `ReducerConfig` subclass),
    ``requires`` (subset of `INPUTS` the adapter must be able to compute), ``requires_class_token``
    (refuse models without one), ``position`` (``attention``, ``layer`` or ``start``: where in a
    block it reduces, `POSITIONS`), ``description`` (``tmcore plugins``), ``identity_config``
    (a config that changes nothing, or ``None``; the conformance suite checks it is exact),
    ``example_configs`` (configs that reduce; the test matrix and ``tmcore bench`` use them),
    ``merge_only`` (every input token survives inside some output: sizes are conserved),
    ``adaptive`` (token counts depend on the values, per sample: ragged plans, a host sync per
    reduction, no ``fullgraph`` compile) and ``stochastic`` (random by design: draws from
    ``state.sample_index(x)``, so a sample alone draws what it drew in its batch).

    Instances are built once per ``tmcore.apply`` as ``cls(config, info)`` from a validated config
    and the `ModelInfo`, and hold no per-forward state; ``prop_attn`` says whether attention gets
    ``log(size)``. ``needs(layer)`` says what block ``layer`` reads (a subset of ``requires``;
    empty where the reducer does nothing there), asked once per block when the model is patched,
    so the adapter captures and computes only that. ``state_tensors()`` / ``load_state_tensors()``
    are the learned state `tmcore.save` writes and `tmcore.load` reads back (validated as a config
    is; nothing changes when it raises).

    Optional, found by the runtime when present:
    ``soft_step(layer, x, inputs, state) -> x``: a reducer that defines it is trained with soft
    masks: in training mode nothing is removed; the runtime keeps a straight-through keep-mask in
    ``state.mask`` (all ones at block 0), adapters mask removed keys out of attention with it, and
    ``soft_step`` replaces score / match / reduce, updating ``state.mask`` (and ``state.size``)
    in place of a Plan. See `tmcore.runtime.Runtime`.
    ``mask_eps: float``, ``mask_self_loop: bool``: the soft-mask softmax's options
    (`tmcore.state.masked_softmax`; defaults ``MASK_EPS`` and ``False``, LTMP's).
    ``live_needs() -> tuple[frozenset[str], ...]``: what each block reads in the current inference
    forward when that depends on learned state (a subset of ``needs(layer)`` per block, asked once
    per forward; cache it): `tmcore.runtime.Runtime.block_needs`.
    ``scopes: frozenset[str]``: the `SCOPES` it works in (default ``{"model"}``); one that lists
    ``block`` reduces around the sub-layers in ``sublayers`` (`SUBLAYERS`, default ``{"attn"}``)
    of block-scope models, where every plan must place every token (merge, never drop: each token
    gets its group's output back), and its ``match`` reads the block's grid in ``state.block``.

    Ragged plans (``Plan.valid``, built with `tmcore.plan.pack`) let per-sample token counts
    differ at inference; ``state.valid`` then marks the real tokens of the next layer.
    """

    name: ClassVar[str]
    config_model: ClassVar[type[ReducerConfig]]
    requires: ClassVar[frozenset[str]]
    requires_class_token: ClassVar[bool]
    position: ClassVar[str]
    description: ClassVar[str]
    identity_config: ClassVar[dict[str, Any] | None]
    example_configs: ClassVar[tuple[dict[str, Any], ...]]
    merge_only: ClassVar[bool]
    adaptive: ClassVar[bool]
    stochastic: ClassVar[bool]
    config: ReducerConfig
    info: ModelInfo
    prop_attn: bool

    def __init__(self, config: ReducerConfig, info: ModelInfo) -> None: ...

    def needs(self, layer: int) -> frozenset[str]: ...

    def score(self, layer: int, inputs: LayerInputs, state: TokenState) -> Scores | None: ...

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None: ...

    def reduce(self, x: Tensor, plan: Plan, state: TokenState) -> tuple[Tensor, Tensor | None]: ...

    def state_tensors(self) -> dict[str, Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None: ...


CONTRACT_ATTRIBUTES = (
    "name",
    "config_model",
    "requires",
    "requires_class_token",
    "position",
    "description",
    "identity_config",
    "example_configs",
    "merge_only",
    "adaptive",
    "stochastic",
)
"""The class attributes of `TokenReducer`."""

CONTRACT_METHODS = ("needs", "score", "match", "reduce", "state_tensors", "load_state_tensors")
"""The methods of `TokenReducer` (the runtime also looks for the optional ``soft_step`` and
``live_needs``)."""


def check_reducer(cls: Any) -> list[str]:
    """What ``cls`` lacks of the `TokenReducer` contract, one phrase each (empty: it conforms).
    ``name`` is checked by the registry with the adapters' names."""
    problems = []

    def attr(name: str, ok: Any, what: str) -> None:
        if not hasattr(cls, name):
            problems.append(f"missing class attribute `{name}` ({what})")
        elif not ok(getattr(cls, name)):
            problems.append(f"`{name}` must be {what}, got {getattr(cls, name)!r}")

    def is_config_class(v: Any) -> bool:
        return isinstance(v, type) and issubclass(v, ReducerConfig)

    attr("config_model", is_config_class, "a tmcore.ReducerConfig subclass")
    attr("requires", lambda v: isinstance(v, frozenset) and v <= INPUTS, f"a frozenset of {sorted(INPUTS)}")
    for flag in ("requires_class_token", "merge_only", "adaptive", "stochastic"):
        attr(flag, lambda v: isinstance(v, bool), "True or False")
    attr("position", lambda v: v in POSITIONS, f"one of {sorted(POSITIONS)}")
    attr("description", lambda v: isinstance(v, str), "a string")
    attr("identity_config", lambda v: v is None or isinstance(v, dict), "a dict of config values or None")
    attr(
        "example_configs",
        lambda v: isinstance(v, tuple) and all(isinstance(c, dict) for c in v),
        "a tuple of config dicts",
    )
    for method in CONTRACT_METHODS:
        if not callable(getattr(cls, method, None)):
            problems.append(f"missing method {method}()")
    return problems


class BaseReducer:
    """The `TokenReducer` contract with defaults: keys as scores, merging weighted by the plan's
    weight or the sizes (`tmcore.plan.merge_tokens`), every input in every block, no learned state.

    Subclasses set ``name``, ``config_model`` and ``requires``, write `match` (and `score` when
    the method scores something other than head-mean keys), resolve config defaults that depend
    on the model in `setup`, and narrow `needs` when some blocks read less (or nothing).
    """

    name: ClassVar[str]
    config_model: ClassVar[type[ReducerConfig]] = ReducerConfig
    requires: ClassVar[frozenset[str]] = frozenset({"keys"})
    requires_class_token: ClassVar[bool] = False
    """Refuse models without a class token (`UnsupportedModelError` at apply time)."""
    description: ClassVar[str] = ""
    identity_config: ClassVar[dict[str, Any] | None] = None
    """A config under which the reducer changes nothing (conformance tests check it)."""
    example_configs: ClassVar[tuple[dict[str, Any], ...]] = ()
    """Configs that reduce tokens, used by the test matrix and as ``tmcore bench`` defaults."""
    merge_only: ClassVar[bool] = True
    """Every input token survives inside some output token (sizes are conserved)."""
    position: ClassVar[str] = "attention"
    """Where in a block it reduces (`POSITIONS`): after the attention sub-layer, ``layer``,
    after the whole block, or ``start``, before the attention (with this block's attention)."""
    adaptive: ClassVar[bool] = False
    """Token counts depend on the values, per sample (LTMP's thresholds): plans are ragged
    (`tmcore.plan.pack` learns their size with one host sync), the meta device is refused, and
    ``torch.compile`` runs with graph breaks. Fixed-count reducers (``False``) compile with
    ``fullgraph=True`` and sync with the host nowhere; the conformance suite holds them to it."""
    stochastic: ClassVar[bool] = False
    """Random by design: draws depend on the config's seed, the block, the token positions and
    ``state.sample_index(x)``, so results are reproducible and a sample draws the same alone as
    in its batch (the conformance suite runs it alone inside ``runtime.numbered_from(i)``)."""

    scopes: ClassVar[frozenset[str]] = frozenset({"model"})
    """The `SCOPES` it works in: ``model``, and ``block`` for reducers whose plans only merge
    and make sense on a block's own tokens (diffusion models)."""
    sublayers: frozenset[str] = frozenset({"attn"})
    """Block scope: the sub-layers that run on merged tokens (`SUBLAYERS`)."""

    prop_attn: bool = False

    def __init__(self, config: ReducerConfig, info: ModelInfo) -> None:
        self.config = config
        self.info = info
        self.setup()

    def setup(self) -> None:
        """Resolve model-dependent defaults and precompute schedules; raise on impossible configs."""

    def needs(self, layer: int) -> frozenset[str]:
        """What block ``layer`` reads from its attention (default: all of ``requires``)."""
        return self.requires

    def score(self, layer: int, inputs: LayerInputs, state: TokenState) -> Scores | None:
        """``Scores(metric=...)``: head-mean keys ``[B, N, d]`` where the block needs them, else
        ``None`` (the block does nothing)."""
        return Scores(metric=inputs.keys) if "keys" in inputs.needs else None

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None:
        raise NotImplementedError

    def reduce(self, x: Tensor, plan: Plan, state: TokenState) -> tuple[Tensor, Tensor | None]:
        """Average of each merged group weighted by ``plan.weight`` (sizes when ``None``), sizes
        summed; returns ``(x, new size)``."""
        return merge_tokens(x, plan, state.size)

    def state_tensors(self) -> dict[str, Tensor]:
        """Learned state saved by `tmcore.save` (none for training-free methods)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if tensors:
            raise InvalidConfigError(
                f"reducer {self.name!r} has no learned state, but the file holds tensors {sorted(tensors)}"
            )


def _describe_fields(model: type[BaseModel]) -> str:
    parts = []
    for name, field in model.model_fields.items():
        parts.append(f"{name} ({field.description})" if field.description else name)
    return "; ".join(parts) or "(none)"


def _pydantic_words(err: ErrorDetails) -> str:
    """An error's message as ``must be ...``: a `tmcore.config` rule's own sentence, or pydantic's
    wording for plain pydantic fields (``Input should be ...``) brought into that form."""
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith("Input should be "):
        msg = "must be " + msg.removeprefix("Input should be ")
    return msg


def _describe_errors(errors: list[ErrorDetails], config: dict[str, Any]) -> list[str]:
    """One line per bad key: ``key=value: must be ...``, the value as given, whatever nested
    position or union member pydantic blamed (its locations name internals such as
    ``list[constrained-float]``, which mean nothing to the user)."""
    lines: dict[str, list[str]] = {}
    for err in errors:
        loc = err["loc"]
        if err["type"] == "extra_forbidden":
            head, msg = f"unknown config key {show(loc[0])} (value {show(err['input'])})", ""
        elif err["type"] == "invalid_key":
            head, msg = f"config key {show(err['input'])} is not a string", ""
        elif err["type"] == "missing":
            head, msg = f"{loc[0]} is required", ""
        elif not loc:  # a model validator (several fields together): its message names them
            head, msg = _pydantic_words(err), ""
        else:
            key = loc[0]
            head = f"{key}={show(config.get(key, err['input']))}"
            entries = [p for p in loc[1:] if isinstance(p, int)]
            msg = ("entry " + ", ".join(map(str, entries)) + ": " if entries else "") + _pydantic_words(err)
        if msg not in lines.setdefault(head, []):
            lines[head].append(msg)
    return [head + (": " + ", or ".join(m for m in msgs if m) if any(msgs) else "") for head, msgs in lines.items()]


def validate_config(reducer: type[TokenReducer], config: Mapping[str, Any]) -> ReducerConfig:
    """Validate ``config`` against ``reducer.config_model``.

    Raises:
        InvalidConfigError: for any config that does not validate (and nothing else), naming
            each bad key, its value as given and what is allowed, in words.
    """
    name = reducer.name
    if not isinstance(config, Mapping):
        raise InvalidConfigError(
            f"invalid config for reducer {name!r}: expected a mapping of config keys to values, got "
            f"{type(config).__name__} {show(config)}"
        )
    config = dict(config)
    try:
        return reducer.config_model.model_validate(config)
    except ValidationError as exc:
        lines = _describe_errors(exc.errors(include_url=False), config)
        raise InvalidConfigError(
            f"invalid config for reducer {name!r}: "
            + "; ".join(lines)
            + f". Allowed keys: {_describe_fields(reducer.config_model)}"
        ) from None
