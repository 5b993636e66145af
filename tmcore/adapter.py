"""The adapter contract as code: the base class every adapter derives from, the undo log that
makes `tmcore.remove` exact, and the helpers an adapter's block forward is composed of.

An adapter's patched block forward fills the block protocol, `tmcore.Runtime.run_block`::

    def attend(x, bias, state):                    # the attention sub-layer, residual / norm included
        y = attention(norm1(x), attn_mask=bias)    # fused, or `explicit_attention` where
        return x + y                               # `needs_explicit_attention(runtime, layer, state)`

    probe = lambda x: q_and_k(norm1(x))            # adapters that offer position "start"
    return runtime.run_block(layer, x, attend, lambda x: x + mlp(norm2(x)), scale, block.training, probe=probe)

`run_block` opens the forward's token state at block 0, computes the bias (``log(size)`` and
padding, additive, ``[B, 1, 1, N]``), reduces at the reducer's position and restores full length at
the last block when asked. An adapter that offers position ``start`` passes ``probe``, the block's q
/ k of its input as its attention computes them, and its explicit attention uses
``state.given_attn`` when a reducer hands it one (`explicit_attention` does). Adapters replace
forwards with `Patch.bind` (the function finds its patch, and the runtime, with `bound_patch`) and
hand q / k / v to the reducer with `Patch.capture`, only in blocks whose
``runtime.layer_needs[layer]`` asks for them (an adapter that captures inside its attention function
asks ``runtime.block_needs(layer, state)``, this forward's subset). The base class's `patch`
brackets the forward of `Adapter.forward_scope` with ``runtime.begin`` / ``runtime.end`` (the
input's padding mask from `Adapter.input_padding`, the outputs finished by
`Adapter.finish_forward`). A feature path that runs the blocks outside the model's ``forward`` and
reads the tokens between them (timm's ``forward_intermediates``) runs inside
``runtime.dense_outputs()``: every block then returns full-length tokens and takes its reduced ones
back.
Gradient checkpointing needs nothing from the adapter: the runtime replays a recomputed block's
state (`tmcore.runtime.Runtime`); an adapter that replaces a forward the backbone checkpoints
itself (transformers' layers) calls the backbone's checkpoint function as the original would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from importlib import metadata
from typing import Any, ClassVar

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from torch import Tensor, nn

from tmcore.errors import IncompatibleVersionError
from tmcore.flops import BlockFlops
from tmcore.plan import size_dtype, unit_sizes
from tmcore.reducer import INPUTS, ModelInfo, TokenReducer
from tmcore.runtime import Runtime, attention_dtype
from tmcore.state import TokenState

__all__ = [
    "Adapter",
    "Patch",
    "attention_dtype",
    "needs_explicit_attention",
    "explicit_attention",
    "bound_patch",
    "BOUND",
    "token_weights",
]


BOUND = "_tmcore_bound"
"""Instance attribute of a module that `Patch.bind` or `Patch.capture` changed: its `Patch`."""


class Patch:
    """Everything one ``tmcore.apply`` changed on a model, and how to take it back.

    Adapters change models only through `set_attr` and `add_hook`, so `undo` restores the model
    exactly: instance attributes that shadowed nothing are deleted, shadowed ones put back. The
    log is plain data (no closures), so ``copy.deepcopy`` of a patched model yields an
    independently removable copy.
    """

    def __init__(self, reducer: TokenReducer, adapter: Adapter, runtime: Runtime) -> None:
        self.reducer = reducer
        self.adapter = adapter
        self.runtime = runtime
        self._log: list[tuple[Any, ...]] = []

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute (e.g. a bound ``forward``), remembering what was there."""
        had = name in obj.__dict__
        self._log.append(("attr", obj, name, had, obj.__dict__.get(name)))
        object.__setattr__(obj, name, value)

    def add_hook(self, handle: Any) -> None:
        """Keep a ``torch.utils.hooks.RemovableHandle`` for removal."""
        self._log.append(("hook", handle))

    def bind(self, module: nn.Module, name: str, function: Callable[..., Any], *args: Any) -> None:
        """Set ``module.<name>`` to ``function(module, *args, ...)`` (``forward``, ``pool``, ...);
        the function finds this patch as `bound_patch(module)`.

        The patch travels on the module, not in the bound arguments: ``torch.compile`` guards an
        object in a function's arguments by its identity, so a second model patched the same way
        would recompile, but guards what it reads of a module's attributes by value. Bind only
        plain values (ints, strings, modules, the module's own methods) as ``args``."""
        if module.__dict__.get(BOUND) is not self:
            self.set_attr(module, BOUND, self)
        self.set_attr(module, name, partial(function, module, *args))

    def capture(self, module: nn.Module, name: str, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        """Hand ``module``'s output (through ``transform``, e.g. a reshape to ``[B, H, N, d]``) to
        the current forward's state as ``name`` (``q``, ``k`` or ``v``), by a forward hook."""
        if module.__dict__.get(BOUND) is not self:
            self.set_attr(module, BOUND, self)
        self.add_hook(module.register_forward_hook(partial(_capture, name, transform)))

    def undo(self) -> None:
        while self._log:
            entry = self._log.pop()
            if entry[0] == "hook":
                entry[1].remove()
                continue
            _, obj, name, had, old = entry
            if had:
                object.__setattr__(obj, name, old)
            else:
                object.__delattr__(obj, name)


class Adapter:
    """Knows one backbone family: how to find its blocks, protect its prefix tokens, feed the
    attention bias through a public argument, capture what reducers need, and pool.

    Subclasses set the class attributes and implement `handles`, `describe`, `blocks`,
    `patch_block` and `flops`; `check` refuses unsupported variants and `patch_model` patches
    what sits after the blocks (pooling, outputs). `patch` is the template that calls them.

    Attributes:
        name: registry name, e.g. ``"timm"``.
        description: the families it supports, for error messages and ``tmcore plugins``.
        library: the backbone library's distribution name, checked against `supported_versions`.
        supported_versions: a PEP 440 version specifier of the backbone library, e.g. ``">=1.0,<1.1"``.
        inputs: which `INPUTS` it can compute for reducers.
        positions: where in a block it can reduce (`tmcore.reducer.POSITIONS`): ``attention``
            (after the attention sub-layer, before the MLP), ``layer`` (after the block) and / or
            ``start`` (before the attention: `tmcore.Runtime.run_block` with a ``probe``).
            A reducer picks one (its ``position``); `tmcore.apply` refuses a position not offered.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    library: ClassVar[str | None] = None
    supported_versions: ClassVar[str | None] = None
    inputs: ClassVar[frozenset[str]] = INPUTS
    positions: ClassVar[frozenset[str]] = frozenset({"attention"})

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """Whether this adapter knows ``model``'s family (cheap; must not import heavy libraries)."""
        raise NotImplementedError

    def check_environment(self) -> None:
        """Refuse to patch when the installed backbone library is outside `supported_versions`."""
        if self.library is None or self.supported_versions is None:
            return
        try:
            installed = metadata.version(self.library)
        except metadata.PackageNotFoundError:
            return
        try:
            version = Version(installed)
        except InvalidVersion:  # a local build with a free-form version: nothing to compare
            return
        if not SpecifierSet(self.supported_versions).contains(version, prereleases=True):
            raise IncompatibleVersionError(
                f"adapter {self.name!r} supports {self.library}{self.supported_versions}, but "
                f"{self.library}=={installed} is installed; install a supported {self.library} or an adapter "
                f"release for {installed}"
            )

    def describe(self, model: nn.Module) -> ModelInfo:
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise `tmcore.NoAdapterError` for a variant of the family this adapter cannot patch."""

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks that reduce, in order (``ModelInfo.num_layers`` of them)."""
        raise NotImplementedError

    def patch_block(self, block: nn.Module, layer: int, patch: Patch) -> None:
        """Replace ``block``'s forward (``patch.set_attr``) and add the capture hooks this block
        needs (``patch.runtime.layer_needs[layer]``, `Patch.capture`)."""
        raise NotImplementedError

    def patch_model(self, model: nn.Module, patch: Patch) -> None:
        """Patch what follows the blocks (size-weighted pooling, outputs); default: nothing."""

    def flops(self, model: nn.Module) -> BlockFlops | None:
        """The model's per-block FLOP model (``tmcore bench`` computes FLOP ratios with it), or
        ``None`` where none fits (diffusion models: ``tmcore bench`` then counts one forward with
        ``torch.utils.flop_counter``)."""
        raise NotImplementedError

    # The test kit's view of the family (`tmcore.testing`): tiny models, inputs, a comparable output.

    @classmethod
    def tiny_models(cls) -> dict[str, Callable[[], nn.Module]]:
        """Small random-init models covering the family's variants, by name, for the
        conformance suites: float64, in eval mode, a few blocks, enough tokens for every
        reducer's example configs (about 64). Empty when the backbone library is missing."""
        return {}

    def example_inputs(self, model: nn.Module, batch: int = 3, seed: int = 1) -> dict[str, Tensor]:
        """Keyword arguments for ``model(**inputs)``: random images, or token ids of different
        lengths with a right-padded ``attention_mask`` for text models."""
        raise NotImplementedError

    def output_tensor(self, model: nn.Module, output: Any, inputs: dict[str, Tensor]) -> Tensor:
        """The ``[B, ...]`` tensor of ``model(**inputs)``'s ``output`` that tests and ``tmcore bench``
        compare, independent of the reduced length: the logits, or for a bare text encoder the
        size-weighted mean pool of the last hidden state (the sentence embedding)."""
        return output

    def forward_scope(self, model: nn.Module) -> nn.Module:
        """The module whose forward is one forward of the blocks (default: ``model``; a
        transformers task model's base model, which its ``get_image_features`` calls directly)."""
        return model

    def input_padding(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
        """The ``[B, N]`` padding mask among the arguments of a `forward_scope` call (1 on real
        tokens, right padding), or ``None`` for inputs without padding (default)."""
        return None

    def input_grid(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
        """The ``(height, width)`` of the finest token grid of a `forward_scope` call's input
        (block scope: a diffusion model's latent, in tokens), or ``None`` (default)."""
        return None

    def finish_forward(self, module: nn.Module, output: Any, state: TokenState | None) -> None:
        """Called as a `forward_scope` call returns, with the forward's final state (``None`` if no
        block ran): attach what the output should carry (sizes, padding). Default: nothing."""

    def patch(self, model: nn.Module, patch: Patch) -> None:
        """Patch ``model`` in place through ``patch.set_attr`` / ``patch.add_hook`` only:
        `check`, `patch_block` for every block, `patch_model`, and the forward of
        `forward_scope`, which brackets each call: ``runtime.begin`` with the input's padding,
        the original forward, `finish_forward`, ``runtime.end`` (also when it raises). A forward,
        not a pair of hooks: under ``torch.compile`` it stays inside the model's one graph (dynamo
        compiles a root module's hooks as frames of their own)."""
        self.check(model)
        for layer, block in enumerate(self.blocks(model)):
            self.patch_block(block, layer, patch)
        self.patch_model(model, patch)
        scope = self.forward_scope(model)
        patch.bind(scope, "forward", _scoped_forward, scope.forward)


def _scoped_forward(module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    patch = bound_patch(module)
    runtime = patch.runtime
    adapter = patch.adapter
    runtime.begin(adapter.input_padding(module, args, kwargs), adapter.input_grid(module, args, kwargs))
    try:
        output = forward(*args, **kwargs)
        adapter.finish_forward(module, output, runtime.current())
        return output
    finally:
        runtime.end()


def needs_explicit_attention(runtime: Runtime, layer: int, state: TokenState) -> bool:
    """Whether block ``layer`` must compute attention probabilities itself (`explicit_attention`)
    instead of the fused kernel: a soft keep-mask must enter the softmax (training a reducer with
    ``soft_step``), the reducer reads the full attention there (``attn`` in its needs, read after
    the attention: not at position ``start``, where the runtime computes it from the probe), or
    it handed the block its probabilities (``state.given_attn``)."""
    if state.mask is not None or state.given_attn is not None:
        return True
    return runtime.position != "start" and "attn" in runtime.block_needs(layer, state)


def explicit_attention(
    q: Tensor | None,
    k: Tensor | None,
    v: Tensor,
    scale: float,
    bias: Tensor | None,
    state: TokenState,
    runtime: Runtime,
    dropout: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Scaled dot-product attention with the probabilities materialised, for the forwards that
    need them (`needs_explicit_attention`).

    Args:
        q, k, v: ``[B, H, N, d]`` as the attention uses them (after any q / k norm); ``q`` and
            ``k`` are not read (may be ``None``) when ``state.given_attn`` is set.
        scale: the logit scale.
        bias: ``[B, 1, 1, N]`` additive bias (``state.attn_bias``) or ``None``.
        state: the forward's state; under a soft mask the softmax is `TokenState.attn_probs`
            (gradients reach the mask); with ``state.given_attn`` (position ``start``) those
            probabilities are used as they are (their bias is already in them).
        runtime: receives the probabilities, after ``dropout``, as the ``attn`` capture.
        dropout: the attention's dropout on the probabilities (e.g. timm's ``attn_drop``).

    Returns:
        ``[B, H, N, d]`` attention output (heads not yet merged).
    """
    if state.given_attn is not None:
        probs = state.given_attn
    else:
        logits = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits += bias  # in place: one [B, H, N, N] allocation less (the matmul's backward needs q, k only)
        probs = state.attn_probs(logits) if state.mask is not None else logits.softmax(dim=-1)
    if dropout is not None:
        probs = dropout(probs)
    runtime.capture("attn", probs)
    return probs.to(v.dtype) @ v


def bound_patch(module: nn.Module) -> Patch:
    """The `Patch` whose `Patch.bind` / `Patch.capture` changed ``module``."""
    return module.__dict__[BOUND]


def _capture(
    name: str, transform: Callable[[Tensor], Tensor] | None, module: nn.Module, args: Any, out: Tensor
) -> None:
    bound_patch(module).runtime.capture(name, out if transform is None else transform(out))


def token_weights(state: TokenState | None, x: Tensor) -> Tensor | None:
    """``[B, N, 1]`` weight of each token of ``x`` in a mean pool: its size, 0 on padding and on
    soft-masked tokens, in `tmcore.plan.size_dtype` (`tmcore.pooling.weighted_mean` takes it);
    ``None`` when all tokens weigh the same (pool as unpatched)."""
    if state is None or (state.size is None and state.valid is None and state.mask is None):
        return None
    weight = state.size if state.size is not None else unit_sizes(x)
    if state.valid is not None:
        weight = weight * state.valid.unsqueeze(-1)
    if state.mask is not None:
        weight = weight * state.mask.unsqueeze(-1)
    return weight.to(size_dtype(x.dtype))
