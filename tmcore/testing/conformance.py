"""Conformance suites: every reducer on every tiny model of every installed adapter
(`ReducerConformance`), and every adapter's share of the contract (`AdapterConformance`)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import tmcore
from tmcore.inputs import moved, padding_mask, rows, split_samples
from tmcore.reducer import validate_config
from tmcore.registry import registry, uncompiled
from tmcore.testing.syncs import count_host_syncs

__all__ = [
    "ReducerConformance",
    "AdapterConformance",
    "tiny_models",
    "tiny_timm_models",
    "run",
    "compile_counting_graphs",
    "REPORT",
]

REPORT: list[str] = []
"""What adaptive reducers cost per forward (host syncs, compiled graphs), one line per reducer,
model and config, as the conformance suite found it; the test kit's pytest plugin prints it at the
end of the run."""


def tiny_models(adapter: str | None = None) -> dict[str, Callable[[], nn.Module]]:
    """The tiny models of every installed adapter (or of ``adapter``), as ``"adapter:name"``."""
    registry.ensure_loaded()
    out: dict[str, Callable[[], nn.Module]] = {}
    for reg in registry.adapters.values():
        if adapter is None or reg.name == adapter:
            out.update({f"{reg.name}:{name}": f for name, f in reg.obj.tiny_models().items()})
    return out


def tiny_timm_models() -> dict[str, Callable[[], nn.Module]]:
    """The timm adapter's tiny models by plain name (empty without timm or tm-timm)."""
    return {name.split(":", 1)[1]: f for name, f in tiny_models("timm").items()}


def run(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """``model(**inputs)`` as the adapter's comparable output tensor (``model`` may be compiled)."""
    base = uncompiled(model)
    return registry.adapter_for(base).output_tensor(base, model(**inputs), inputs)


def _most(count: int | Tensor) -> int:
    """A trace token count as an int: ragged batches report ``[B]`` tensors; take the largest."""
    return count if isinstance(count, int) else int(count.max())


def _name(model: nn.Module) -> str:
    """A tiny model's test-kit name (``timm:vit``), or its class name."""
    info = registry.adapter_for(model).describe(model)
    return f"{info.family} {type(model).__name__}"


def _per_sample(count: int | Tensor, batch: int) -> Tensor:
    return torch.full((batch,), count) if isinstance(count, int) else count.cpu()


def _refusal(reducer: str, config: dict[str, Any], model: nn.Module) -> str | None:
    """What a model's adapter must refuse the reducer for (a match for the error message): no
    class token where the reducer needs one, or a position the adapter does not offer; ``None``
    where it must run. The position is the instance's (a config may move it)."""
    cls = registry.get_reducer(reducer).obj
    adapter = registry.adapter_for(model)
    info = adapter.describe(model)
    if info.scope not in getattr(cls, "scopes", frozenset({"model"})):
        return "scope"
    if cls.requires_class_token and not info.class_token:
        return "no class token"
    position = cls(validate_config(cls, config), info).position
    return None if position in adapter.positions else f"position {position!r}"


def _skip_unsupported(reducer: str, config: dict[str, Any], model: nn.Module, name: str) -> None:
    """A reducer the model's adapter cannot run (`_refusal`) must be refused (checked here); the
    test is then skipped."""
    refusal = _refusal(reducer, config, model)
    if refusal is not None:
        with pytest.raises(tmcore.UnsupportedModelError, match=refusal):
            tmcore.apply(model, reducer, **config)
        assert tmcore.get_patch(model) is None
        _REFUSED[(reducer, name)] = f"{reducer} is refused on {name} ({refusal}; refusal checked)"
        pytest.skip(_REFUSED[(reducer, name)])


_REFUSED: dict[tuple[str, str], str] = {}
"""``(reducer, tiny model name)`` -> why the reducer was refused there (checked once per process)."""


def _block_scope(model: nn.Module) -> bool:
    return registry.adapter_for(model).describe(model).scope == "block"


def _reduced(t: tmcore.Trace) -> bool:
    """Whether a traced forward reduced anything: fewer tokens leave than entered or, in block
    scope (every block hands back all its tokens), some block's sub-layers ran on fewer."""
    if t.merged_counts:
        return any(_most(m) < _most(n) for m, n in zip(t.merged_counts, t.token_counts))
    return _most(t.token_counts[-1]) < _most(t.token_counts[0])


def _block_scope_invariants(t: tmcore.Trace, config: dict[str, Any]) -> None:
    """Block scope: every block hands back the tokens it got; in each block that merged, every
    token is in exactly one group, every group has a member, and the block's sub-layers ran on
    as many tokens as there are groups."""
    counts = [_most(c) for c in t.token_counts]
    assert len(t.merged_counts) == len(t.groups) == len(counts) - 1, (t.merged_counts, counts)
    assert counts[-1] == counts[-2], f"{config}: the last block did not hand back all its tokens"
    assert _reduced(t), f"{config} reduced nothing"
    for n, m, groups in zip(counts, t.merged_counts, t.groups):
        assert m <= n
        if groups is None:
            assert m == n
            continue
        assert groups.shape[1] == n and ((groups >= 0) & (groups < m)).all(), f"{config}: a token lost its group"
        members = torch.zeros(groups.shape[0], m, dtype=torch.long).scatter_add_(1, groups, torch.ones_like(groups))
        assert (members >= 1).all(), f"{config}: a merged slot stands for no token"


def _unpatched_or_skip(model: nn.Module, inputs: dict[str, Tensor], what: str) -> Tensor:
    """The unpatched model's output, or a skip where the backbone itself cannot run ``what``."""
    try:
        return run(model, inputs)
    except RuntimeError as exc:
        pytest.skip(f"the unpatched model cannot run {what} either: {exc}")


def compile_counting_graphs(model: Callable[..., Any], fullgraph: bool = True) -> tuple[Any, list[Any]]:
    """``(torch.compile(model, fullgraph=...), the graphs dynamo hands the backend)`` for a module
    or a method such as timm's ``forward_intermediates``, compiled
    afresh (dynamo's caches reset) with AOTAutograd and eager kernels: what inductor would be
    given, at a fraction of its compile time. One graph means no graph break anywhere."""
    from torch._dynamo.backends.registry import lookup_backend

    graphs: list[Any] = []
    aot_eager = lookup_backend("aot_eager")

    def backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(model, fullgraph=fullgraph, backend=backend), graphs


def _enable_checkpointing(model: nn.Module) -> bool:
    """Turn on the backbone's own gradient checkpointing (timm, Hugging Face); ``False`` if it has none."""
    if callable(getattr(model, "set_grad_checkpointing", None)):  # timm
        model.set_grad_checkpointing(True)
        return True
    if getattr(model, "supports_gradient_checkpointing", False):  # transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return True
    if getattr(model, "_supports_gradient_checkpointing", False):  # diffusers (non-reentrant by default)
        model.enable_gradient_checkpointing()
        return True
    return False


def _gradients(model: nn.Module, inputs: dict[str, Tensor], seed: int = 0) -> list[Tensor | None]:
    """One training step's gradients of the model's and the reducer's parameters (seeded, so
    dropout draws the same masks)."""
    reducer = tmcore.get_patch(model).reducer
    params = [*model.parameters(), *(v for v in vars(reducer).values() if isinstance(v, nn.Parameter))]
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    run(model, inputs).square().sum().backward()
    return [None if p.grad is None else p.grad.clone() for p in params]


class ReducerConformance:
    """Subclass in a plugin's tests and set ``reducer`` (and optionally ``configs``).

    Runs on every tiny model of every installed adapter (images, and padded batches of
    sentences of different lengths for text models). Checks: the identity config is exact
    (also in training mode); `tmcore.remove` restores bit-identical outputs; protected tokens
    stay in front; every kept token stands for at least one real input token; no real token
    lands on padding and no padding token joins a real token's group; fixed-shape plans report
    int token counts; every real input token lands in exactly one output token and sizes are
    conserved (merge-only reducers); every plan holds valid values (`tmcore.check_plans`); a
    sample of only padding gives finite outputs; a batch equals its samples run one by one,
    unpadded (outputs and token counts); a reducer's ``live_needs`` stay within its ``needs`` and decide
    as they do; gradients flow in training mode, and equal themselves under the backbone's
    gradient checkpointing; empty batches run; the meta device runs or refuses clearly. A reducer with
    ``requires_class_token`` is refused on models without one.
    """

    reducer: str = ""
    configs: tuple[dict[str, Any], ...] | None = None  # default: the reducer's example_configs
    merge_only: bool | None = None  # default: the reducer's; set it where these configs differ
    skip_adapters: frozenset[str] = frozenset()  # tiny models of these adapters are covered elsewhere

    @pytest.fixture(params=sorted(tiny_models()))
    def model(self, request: pytest.FixtureRequest) -> nn.Module:
        if request.param.split(":")[0] in self.skip_adapters:
            pytest.skip(f"{self.reducer} on {request.param}: run by the reducer's own conformance tests")
        key = (self.reducer, request.param)
        if key in _REFUSED:  # checked once per reducer and model: the rest of its tests skip at once
            pytest.skip(_REFUSED[key])
        model = tiny_models()[request.param]()
        _skip_unsupported(self.reducer, self._configs()[0], model, request.param)
        return model

    def _cls(self) -> Any:
        return registry.get_reducer(self.reducer).obj

    def _configs(self) -> tuple[dict[str, Any], ...]:
        configs = self.configs if self.configs is not None else self._cls().example_configs
        assert configs, f"{self.reducer}: declare example_configs on the reducer or configs on the test"
        return tuple(configs)

    def test_registered(self) -> None:
        registry.ensure_loaded()
        assert self.reducer in registry.reducers

    def test_identity_config_is_exact(self, model: nn.Module) -> None:
        identity = self._cls().identity_config
        if identity is None:
            pytest.skip("reducer declares no identity config")
        x = registry.adapter_for(model).example_inputs(model)
        with torch.no_grad():
            ref = run(model, x)
            tmcore.apply(model, self.reducer, **identity)
            out = run(model, x)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)

    def test_identity_config_in_training_mode(self, model: nn.Module) -> None:
        """Training mode may take another code path (soft masks); it must be the identity too.
        The tolerance leaves room for a stabilising epsilon in a masked softmax (LTMP: 1e-5)."""
        identity = self._cls().identity_config
        if identity is None:
            pytest.skip("reducer declares no identity config")
        x = registry.adapter_for(model).example_inputs(model)
        model.train()
        ref = run(model, x)
        tmcore.apply(model, self.reducer, **identity)
        out = run(model, x)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)

    def test_remove_restores_exactly(self, model: nn.Module) -> None:
        x = registry.adapter_for(model).example_inputs(model)
        before = dict(model.__dict__)
        with torch.no_grad():
            ref = run(model, x)
            for config in self._configs():
                tmcore.apply(model, self.reducer, replace=True, **config)
                run(model, x)
            tmcore.remove(model)
            assert torch.equal(run(model, x), ref)
        assert model.__dict__.keys() == before.keys()
        assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in model.modules())

    def test_trace_invariants(self, model: nn.Module) -> None:
        x = registry.adapter_for(model).example_inputs(model)
        real_in = padding_mask(x)
        for config in self._configs():
            tmcore.apply(model, self.reducer, replace=True, **config)
            with torch.no_grad(), tmcore.trace(model) as t:
                model(**x)
            if t.merged_counts:
                _block_scope_invariants(t, config)
                continue
            p = tmcore.get_patch(model).runtime.info.num_protected
            counts = [_most(c) for c in t.token_counts]
            assert counts == sorted(counts, reverse=True), counts
            assert counts[-1] < counts[0], f"{config} reduced nothing"
            b, m = t.sizes.shape[:2]
            n0 = t.source.shape[1]
            real = real_in if real_in is not None else torch.ones(b, n0, dtype=torch.bool)
            assert torch.equal(t.source[:, :p], torch.arange(p).expand(b, p)), (
                f"{config}: protected tokens moved (the class / prefix tokens must stay in front, unmerged)"
            )
            assert ((t.source >= -1) & (t.source < m)).all()
            if t.valid is None:  # fixed-shape plans (merging, dropping or both): counts are ints
                assert all(isinstance(c, int) for c in t.token_counts), t.token_counts
            valid = t.valid if t.valid is not None else torch.ones(b, m, dtype=torch.bool)
            assert torch.equal(valid.sum(1), _per_sample(t.token_counts[-1], b))
            landed = t.source >= 0
            slot_valid = valid.gather(1, t.source.clamp(min=0))
            assert slot_valid[landed & real].all(), "a real input token landed on a padding slot"
            assert not slot_valid[landed & ~real].any(), "a padding token joined a real token's group"
            groups = t.source_matrix() & real.unsqueeze(1)  # [B, M, N0], real inputs only
            assert (groups.sum(2)[valid] >= 1).all(), "a kept output token stands for no real input token"
            if self._cls().merge_only if self.merge_only is None else self.merge_only:
                assert (t.source[real] >= 0).all(), "a merge-only reducer dropped a real token"
                assert torch.equal(groups.sum(1), real.long()), "a real token is in more than one group"
                sizes = t.sizes.squeeze(-1)
                torch.testing.assert_close(
                    sizes[valid],
                    groups.sum(2)[valid].to(sizes.dtype),
                    msg=lambda m, config=config: (
                        f"{config}: sizes are not conserved (a token's size is the input tokens it stands for):\n{m}"
                    ),
                )

    def test_batch_equals_samples(self, model: nn.Module) -> None:
        """A batch (padded, for text) gives every sample what it gives alone, unpadded: the same
        output and the same token counts. A stochastic reducer runs sample ``i`` alone numbered
        ``i`` (`tmcore.runtime.Runtime.numbered_from`), so it draws as in the batch."""
        x = registry.adapter_for(model).example_inputs(model)
        for config in self._configs():
            tmcore.apply(model, self.reducer, replace=True, **config)
            runtime = tmcore.get_patch(model).runtime
            with torch.no_grad():
                with tmcore.trace(model) as t:
                    batched = run(model, x)
                b = batched.shape[0]
                singles, counts = [], []
                for i, xi in enumerate(split_samples(x)):
                    with tmcore.trace(model) as ti, runtime.numbered_from(i if self._cls().stochastic else 0):
                        singles.append(run(model, xi))
                    counts.append([_most(c) for c in ti.token_counts] + [_most(c) for c in ti.merged_counts])
            torch.testing.assert_close(
                batched,
                torch.cat(singles),
                rtol=1e-7,
                atol=1e-7,
                msg=lambda m, config=config: (
                    f"{config}: a sample's output depends on the rest of its batch (batch != samples one by one):\n{m}"
                ),
            )
            batched_counts = torch.stack([_per_sample(c, b) for c in [*t.token_counts, *t.merged_counts]], 1)
            assert batched_counts.tolist() == counts, f"{config}: token counts differ from one-by-one runs"

    def test_plans_hold_valid_values(self, model: nn.Module) -> None:
        """Every plan of every config, on this model's inputs (padded, for text), passes the value
        checks of `tmcore.check_plans`: indices in range, no input token in two places, the
        protected prefix kept in place, padding slots last, weights finite and positive on real
        tokens (the runtime checks types and shapes on every plan anyway)."""
        x = registry.adapter_for(model).example_inputs(model)
        previous = tmcore.check_plans(True)
        try:
            for config in self._configs():
                tmcore.apply(model, self.reducer, replace=True, **config)
                with torch.no_grad():
                    run(model, x)
        finally:
            tmcore.check_plans(previous)

    def test_a_sample_of_only_padding_gives_finite_outputs(self, model: nn.Module) -> None:
        """A sample whose attention mask is all 0 (bucketing and packing loaders produce them)
        gives finite outputs, as in the unpatched model, and leaves the other samples as they
        were."""
        x = registry.adapter_for(model).example_inputs(model)
        if "attention_mask" not in x:
            pytest.skip("no padding mask: the model takes no padded inputs")
        padded = {**x, "attention_mask": x["attention_mask"].clone()}
        padded["attention_mask"][-1] = 0
        with torch.no_grad():
            assert torch.isfinite(run(model, padded)).all(), "the unpatched model itself is not finite"
            for config in self._configs():
                tmcore.apply(model, self.reducer, replace=True, **config)
                out = run(model, padded)
                assert torch.isfinite(out).all(), f"{config}: a sample of only padding gives non-finite outputs"
                torch.testing.assert_close(out[:-1], run(model, x)[:-1], rtol=1e-9, atol=1e-9)

    def test_compiles_and_equals_eager(self, model: nn.Module, request: pytest.FixtureRequest) -> None:
        """Under ``torch.compile``: a fixed-count reducer compiles with ``fullgraph=True`` into one
        graph (no graph break, its hooks and the forward's bracket included) for its first config; an
        adaptive one compiles with graph breaks (counted in `REPORT`; on one model per adapter
        family, as its many graphs take long to compile). Either gives eager's outputs
        (1e-9 in float64) and, inside ``tmcore.trace``, eager's token counts, sizes and source map."""
        x = registry.adapter_for(model).example_inputs(model)
        adaptive = self._cls().adaptive
        name = request.node.callspec.params["model"]
        if adaptive and name != min(n for n in tiny_models() if n.split(":")[0] == name.split(":")[0]):
            pytest.skip("an adaptive reducer compiles with graph breaks, slowly: checked on one model per family")
        for config in self._configs()[:1]:  # the first config: compiling is what costs here
            tmcore.apply(model, self.reducer, replace=True, **config)
            with torch.no_grad():
                with tmcore.trace(model) as eager:
                    ref = run(model, x)
                compiled, graphs = compile_counting_graphs(model, fullgraph=not adaptive)
                with tmcore.trace(compiled) as traced:
                    out = run(compiled, x)
            torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9, msg=lambda m, c=config: f"{c}: compiled {m}")
            b = out.shape[0]
            assert [_per_sample(c, b).tolist() for c in traced.token_counts] == [
                _per_sample(c, b).tolist() for c in eager.token_counts
            ], f"{config}: compiled token counts differ"
            assert traced.merged_counts == eager.merged_counts, f"{config}: compiled block-scope counts differ"
            assert torch.equal(traced.source, eager.source), f"{config}: compiled groups differ"
            torch.testing.assert_close(traced.sizes, eager.sizes, rtol=0, atol=0)
            if adaptive:
                REPORT.append(f"{self.reducer} {config} on {_name(model)}: compiled into {len(graphs)} graphs")
            else:
                assert len(graphs) == 1, f"{config}: {len(graphs)} graphs; a fixed-count reducer compiles to one"

    def test_adds_no_host_sync(self, model: nn.Module) -> None:
        """An eval forward of a fixed-count reducer, padded batches included, waits for the device
        nowhere: it performs exactly the host syncs of the unpatched model (a backbone's own,
        such as transformers' mask check; `tmcore.testing.syncs.count_host_syncs`). An adaptive
        reducer's syncs per forward go to `REPORT`."""
        x = registry.adapter_for(model).example_inputs(model)
        with torch.no_grad():
            run(model, x)  # first calls initialise lazily, and may sync doing so
            with count_host_syncs() as plain:
                run(model, x)
            for config in self._configs():
                tmcore.apply(model, self.reducer, replace=True, **config)
                run(model, x)
                with count_host_syncs() as patched:
                    run(model, x)
                added = patched.ops - plain.ops
                if self._cls().adaptive:
                    REPORT.append(f"{self.reducer} {config} on {_name(model)}: {dict(added) or 'no'} host syncs")
                else:
                    assert not added, f"{config}: tmcore adds host syncs {dict(added)} to the forward"

    def test_live_needs_decide_as_the_declared_needs(self, model: nn.Module) -> None:
        """A reducer with ``live_needs`` (what each block reads in this forward): one subset of
        ``needs(layer)`` per block, the same tuple while nothing changed, and the same tokens,
        groups and outputs as a forward in which every block reads all it declared."""
        x = registry.adapter_for(model).example_inputs(model)
        for config in self._configs():
            tmcore.apply(model, self.reducer, replace=True, **config)
            patch = tmcore.get_patch(model)
            reducer, runtime = patch.reducer, patch.runtime
            if not callable(getattr(reducer, "live_needs", None)):
                pytest.skip("reducer has no live_needs")
            live = reducer.live_needs()
            assert live is reducer.live_needs(), "cache live_needs: return the same tuple while nothing changed"
            assert len(live) == len(runtime.layer_needs)
            assert all(a <= b for a, b in zip(live, runtime.layer_needs)), (live, runtime.layer_needs)
            with torch.no_grad(), tmcore.trace(model) as t_live:
                out_live = run(model, x)
            runtime.live = False  # every block reads what it declared at patch time
            try:
                with torch.no_grad(), tmcore.trace(model) as t_all:
                    out_all = run(model, x)
            finally:
                runtime.live = True
            b = out_live.shape[0]
            assert [_per_sample(c, b).tolist() for c in t_live.token_counts] == [
                _per_sample(c, b).tolist() for c in t_all.token_counts
            ], config
            assert torch.equal(t_live.source, t_all.source), f"{config}: other tokens or groups"
            torch.testing.assert_close(out_live, out_all, rtol=1e-9, atol=1e-9)

    def test_deepcopy_is_independent(self, model: nn.Module) -> None:
        x = split_samples(registry.adapter_for(model).example_inputs(model))[0]
        tmcore.apply(model, self.reducer, **self._configs()[0])
        clone = copy.deepcopy(model)
        with torch.no_grad():
            assert torch.equal(run(clone, x), run(model, x))
            tmcore.remove(clone)
            assert tmcore.get_patch(model) is not None and tmcore.get_patch(clone) is None
            with tmcore.trace(model) as t:
                model(**x)
        assert _reduced(t)

    def test_empty_batch(self, model: nn.Module) -> None:
        """A batch of no samples runs and gives the unreduced model's (empty) output shape."""
        x = rows(registry.adapter_for(model).example_inputs(model), 0, 0)
        with torch.no_grad():
            ref = _unpatched_or_skip(model, x, "an empty batch")
            for config in self._configs():
                tmcore.apply(model, self.reducer, replace=True, **config)
                assert run(model, x).shape == ref.shape, config

    def test_meta_device(self, model: nn.Module) -> None:
        """On the meta device (shapes only), a reducer whose token counts do not depend on the
        values runs; an adaptive one refuses with `tmcore.InvalidInputError`."""
        x = moved(registry.adapter_for(model).example_inputs(model), "meta")
        model.to("meta")
        with torch.no_grad():
            ref = _unpatched_or_skip(model, x, "on the meta device")
            for config in self._configs():
                tmcore.apply(model, self.reducer, replace=True, **config)
                try:
                    out = run(model, x)
                except tmcore.InvalidInputError as exc:
                    assert "meta" in str(exc), exc
                else:
                    assert out.shape == ref.shape and out.device.type == "meta", config

    def test_gradient_checkpointing(self, model: nn.Module) -> None:
        """The backbone's gradient checkpointing (blocks recomputed in the backward pass) gives
        the same gradients as the plain training step, the reducer's own parameters included,
        and leaves an open trace as the forward wrote it."""
        x = registry.adapter_for(model).example_inputs(model)
        tmcore.apply(model, self.reducer, **self._configs()[0])
        model.train()
        plain = _gradients(model, x)
        if not _enable_checkpointing(model):
            pytest.skip(f"{type(model).__name__} has no gradient checkpointing")
        with tmcore.trace(model) as t:
            checked = _gradients(model, x)
        assert len(t.token_counts) == len(registry.adapter_for(model).blocks(model)) + 1 and t.finished
        for a, b in zip(plain, checked):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)

    def test_backward(self, model: nn.Module) -> None:
        adapter = registry.adapter_for(model)
        tmcore.apply(model, self.reducer, **self._configs()[0])
        model.train()
        run(model, adapter.example_inputs(model)).sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(torch.isfinite(g).all() for g in grads if g is not None)
        assert any(p.grad is not None for p in adapter.blocks(model)[0].parameters())


class AdapterConformance:
    """Subclass in an adapter's tests and set ``adapter`` (its registry name).

    Checks, on each of the adapter's tiny models: ToMe's identity config gives the unpatched
    outputs and its counts follow the schedule sample by sample; every installed reducer runs
    with finite outputs and fewer tokens (or is refused with `UnsupportedModelError`);
    `tmcore.remove` is bit-exact; threads share one patched model; a forward runs inside another;
    deep copies are independent;
    ``full_length=True`` gives the input length; the adapter's FLOP model equals
    ``FlopCounterMode`` on the blocks.
    """

    adapter: str = ""

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "model_name" in metafunc.fixturenames:
            metafunc.parametrize("model_name", sorted(tiny_models(self.adapter)))

    @pytest.fixture
    def model(self, model_name: str) -> nn.Module:
        return tiny_models(self.adapter)[model_name]()

    def test_registered_with_tiny_models(self) -> None:
        assert self.adapter in registry.adapters
        assert tiny_models(self.adapter), f"adapter {self.adapter!r} declares no tiny_models()"

    def test_identity_and_schedule(self, model: nn.Module) -> None:
        if "tome" not in registry.reducers:
            pytest.skip("tm-tome is not installed")
        adapter = registry.adapter_for(model)
        x = adapter.example_inputs(model)
        with torch.no_grad():
            ref = run(model, x)
            tmcore.apply(model, "tome", r=0)
            torch.testing.assert_close(run(model, x), ref, rtol=0, atol=1e-5)
            tmcore.apply(model, "tome", r=3, replace=True)
            with tmcore.trace(model) as t:
                model(**x)
        info = tmcore.get_patch(model).runtime.info
        if info.scope == "block":  # every block merges r of its own tokens (at most half)
            assert t.merged_counts == [c - min(3, c // 2) for c in t.token_counts[:-1]], t.merged_counts
            return
        mask = padding_mask(x)
        n = mask.sum(1) if mask is not None else torch.full((len(ref),), len(t.source[0]))
        expected = [n]
        for _ in range(info.num_layers):
            n = n - ((n - info.num_protected) // 2).clamp(max=3)
            expected.append(n)
        b = len(ref)
        assert [_per_sample(c, b).tolist() for c in t.token_counts] == [e.tolist() for e in expected]

    @pytest.mark.filterwarnings("ignore::tmcore.errors.ScheduleClampWarning")  # configs sized for ~64 tokens
    def test_every_reducer_runs(self, model: nn.Module) -> None:
        x = registry.adapter_for(model).example_inputs(model)
        for reg in list(registry.reducers.values()):
            cls = reg.obj
            for config in cls.example_configs:
                refusal = _refusal(reg.name, config, model)
                if refusal is not None:
                    with pytest.raises(tmcore.UnsupportedModelError, match=refusal):
                        tmcore.apply(model, reg.name, replace=True, **config)
                    continue
                tmcore.apply(model, reg.name, replace=True, **config)
                with torch.no_grad(), tmcore.trace(model) as t:
                    out = run(model, x)
                assert torch.isfinite(out).all(), f"{reg.name} {config}: non-finite outputs"
                assert _reduced(t), f"{reg.name} {config} reduced nothing"
                tmcore.remove(model)

    def test_remove_is_bit_exact(self, model: nn.Module) -> None:
        x = registry.adapter_for(model).example_inputs(model)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        modules = {name: dict(m.__dict__) for name, m in model.named_modules()}
        with torch.no_grad():
            ref = run(model, x)
            tmcore.apply(model, "tome", r=3)
            run(model, x)
            tmcore.remove(model)
            assert torch.equal(run(model, x), ref)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        for name, m in model.named_modules():
            assert m.__dict__.keys() == modules[name].keys(), f"{name}: attributes left behind"
            assert not m._forward_hooks and not m._forward_pre_hooks, f"{name}: hooks left behind"

    def test_threads_share_a_patched_model(self, model: nn.Module) -> None:
        adapter = registry.adapter_for(model)
        tmcore.apply(model, "tome", r=3)
        inputs = [adapter.example_inputs(model, seed=s) for s in range(4)]
        with torch.no_grad():
            expected = [run(model, x) for x in inputs]
        results: dict[int, Tensor] = {}

        def work(i: int) -> None:
            with torch.no_grad():
                for _ in range(3):
                    results[i] = run(model, inputs[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for i, ref in enumerate(expected):
            assert torch.equal(results[i], ref)

    def test_a_forward_inside_a_forward(self, model: nn.Module) -> None:
        """A forward run inside another (a hook of block 1 calls the model on other inputs) gets a
        state of its own, and the outer forward goes on with its own: both give what they give
        alone."""
        adapter = registry.adapter_for(model)
        tmcore.apply(model, "tome", r=3)
        outer_x, inner_x = adapter.example_inputs(model, seed=1), adapter.example_inputs(model, seed=2)
        with torch.no_grad():
            expected = run(model, outer_x), run(model, inner_x)
            inner: list[Tensor] = []
            calls: list[bool] = []

            def nested(module: nn.Module, args: Any, output: Any) -> None:
                if not calls:  # once: the inner forward runs block 1 too
                    calls.append(True)
                    inner.append(run(model, inner_x))

            handle = adapter.blocks(model)[1].register_forward_hook(nested)
            try:
                outer = run(model, outer_x)
            finally:
                handle.remove()
        torch.testing.assert_close(outer, expected[0], rtol=0, atol=0)
        torch.testing.assert_close(inner[0], expected[1], rtol=0, atol=0)

    def test_deepcopy(self, model: nn.Module) -> None:
        x = registry.adapter_for(model).example_inputs(model)
        tmcore.apply(model, "tome", r=3)
        clone = copy.deepcopy(model)
        with torch.no_grad():
            assert torch.equal(run(clone, x), run(model, x))
        tmcore.remove(clone)
        assert tmcore.get_patch(model) is not None

    def test_full_length(self, model: nn.Module) -> None:
        x = split_samples(registry.adapter_for(model).example_inputs(model))[0]
        tmcore.apply(model, "tome", r=3, full_length=True)
        with torch.no_grad(), tmcore.trace(model) as t:
            model(**x)
        if t.merged_counts:
            pytest.skip("block scope: every block hands back all its tokens, full_length or not")
        n0 = t.source.shape[1]
        assert t.token_counts[-1] < n0
        captured: list[Tensor] = []
        last = registry.adapter_for(model).blocks(model)[-1]
        handle = last.register_forward_hook(
            lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            with torch.no_grad():
                model(**x)
        finally:
            handle.remove()
        assert captured[0].shape[1] == n0

    def test_full_length_compiles_and_equals_eager(self, model: nn.Module) -> None:
        """``full_length`` unmerges inside the forward, in the same single graph."""
        x = registry.adapter_for(model).example_inputs(model)
        tmcore.apply(model, "tome", r=3, full_length=True)
        with torch.no_grad():
            ref = run(model, x)
            compiled, graphs = compile_counting_graphs(model, fullgraph=True)
            out = run(compiled, x)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
        assert len(graphs) == 1

    def test_flop_model_matches_flop_counter(self, model: nn.Module) -> None:
        """FLOPs of the blocks, counted by ``FlopCounterMode`` (attention on the math backend,
        which it can count), against the adapter's FLOP model, unreduced and under ToMe."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        adapter = registry.adapter_for(model)
        if adapter.flops(model) is None:
            pytest.skip(f"adapter {adapter.name!r} has no FLOP model (tmcore bench counts FLOPs with FlopCounterMode)")
        x = split_samples(adapter.example_inputs(model))[0]
        blocks = adapter.blocks(model)
        names = {id(m): n for n, m in model.named_modules()}
        prefix = type(model).__name__

        def counted() -> int:
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as f:
                model(**x)
            flops = f.get_flop_counts()
            return sum(sum(flops.get(f"{prefix}.{names[id(b)]}", {}).values()) for b in blocks)

        tmcore.apply(model, "tome", r=0)
        with torch.no_grad(), tmcore.trace(model) as t:
            model(**x)
        n = t.token_counts[0]
        assert counted() == 2 * adapter.flops(model).macs([n] * (len(blocks) + 1))
        tmcore.apply(model, "tome", r=3, replace=True)
        with torch.no_grad(), tmcore.trace(model) as t:
            model(**x)
        predicted = 2 * adapter.flops(model).macs(t.token_counts)
        assert abs(counted() - predicted) <= 0.03 * predicted  # the matching itself is the rest
