"""A conformance suite every reducer passes on every tiny model of the installed adapters."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import tmcore


def tiny_timm_models() -> dict[str, Callable[[], nn.Module]]:
    """Small random-init timm ViTs covering the family's variants (empty without timm).

    Each has 64 patches (32 px, patch 4) and 4 blocks, in float64 so that comparisons are not
    at the mercy of near-tied similarities.
    """
    try:
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return {}
    common = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=7)

    def make(cls: type[nn.Module], **kw: Any) -> Callable[[], nn.Module]:
        def factory() -> nn.Module:
            torch.manual_seed(0)
            return cls(**{**common, **kw}).double().eval()

        return factory

    return {
        "vit": make(VisionTransformer),
        "deit_distilled": make(VisionTransformerDistilled),
        "layerscale_qknorm": make(VisionTransformer, init_values=0.5, qk_norm=True),
        "reg4_avgpool": make(
            VisionTransformer, class_token=False, reg_tokens=4, global_pool="avg", no_embed_class=True
        ),
    }


def _inputs(batch: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=gen, dtype=torch.float64)


def _most(count: int | torch.Tensor) -> int:
    """A trace token count as an int: adaptive reducers report ``[B]`` tensors; take the largest."""
    return count if isinstance(count, int) else int(count.max())


class ReducerConformance:
    """Subclass in a plugin's tests and set ``reducer`` (and optionally ``configs``).

    Checks, for every tiny model: the identity config is exact (also in training mode);
    `tmcore.remove` restores bit-identical outputs; protected tokens stay in front; every kept
    token stands for at least one input token and no input token lands on padding (adaptive
    reducers whose per-sample counts differ); fixed-shape plans report int token counts; every
    input token lands in exactly one output token and sizes are conserved (merge-only
    reducers); a batch equals its samples run one by one; gradients flow in training mode. A
    reducer with ``requires_class_token`` is refused on models without one.
    """

    reducer: str = ""
    configs: tuple[dict[str, Any], ...] | None = None  # default: the reducer's example_configs

    @pytest.fixture(params=sorted(tiny_timm_models()))
    def model(self, request: pytest.FixtureRequest) -> nn.Module:
        """Each tiny model; one a reducer cannot run on (``requires_class_token`` on a model
        without a class token) must be refused with `UnsupportedModelError` (checked here),
        and the tests that need a patched model are then skipped."""
        model = tiny_timm_models()[request.param]()
        if getattr(self._cls(), "requires_class_token", False):
            from tmcore.registry import registry

            if not registry.find_adapter(model).obj().describe(model).class_token:
                with pytest.raises(tmcore.UnsupportedModelError, match="no class token"):
                    tmcore.apply(model, self.reducer, **self._configs()[0])
                assert tmcore.get_patch(model) is None
                pytest.skip(f"{self.reducer} needs a class token; {request.param} has none (refusal checked)")
        return model

    def _cls(self) -> Any:
        return next(r.obj for r in tmcore.reducers() if r.name == self.reducer)

    def _configs(self) -> tuple[dict[str, Any], ...]:
        configs = self.configs if self.configs is not None else self._cls().example_configs
        assert configs, f"{self.reducer}: declare example_configs on the reducer or configs on the test"
        return tuple(configs)

    def test_registered(self) -> None:
        assert self.reducer in {r.name for r in tmcore.reducers()}

    def test_identity_config_is_exact(self, model: nn.Module) -> None:
        identity = self._cls().identity_config
        if identity is None:
            pytest.skip("reducer declares no identity config")
        x = _inputs()
        with torch.no_grad():
            ref = model(x)
            tmcore.apply(model, self.reducer, **identity)
            out = model(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)

    def test_identity_config_in_training_mode(self, model: nn.Module) -> None:
        """Training mode may take another code path (soft masks); it must be the identity too.
        The tolerance leaves room for a stabilising epsilon in a masked softmax (LTMP: 1e-5)."""
        identity = self._cls().identity_config
        if identity is None:
            pytest.skip("reducer declares no identity config")
        x = _inputs()
        model.train()
        ref = model(x)
        tmcore.apply(model, self.reducer, **identity)
        out = model(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)

    def test_remove_restores_exactly(self, model: nn.Module) -> None:
        x = _inputs()
        before = dict(model.__dict__)
        with torch.no_grad():
            ref = model(x)
            for config in self._configs():
                tmcore.apply(model, self.reducer, replace=True, **config)
                model(x)
            tmcore.remove(model)
            assert torch.equal(model(x), ref)
        assert model.__dict__.keys() == before.keys()
        assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in model.modules())

    def test_trace_invariants(self, model: nn.Module) -> None:
        x = _inputs()
        for config in self._configs():
            tmcore.apply(model, self.reducer, replace=True, **config)
            with torch.no_grad(), tmcore.trace(model) as t:
                model(x)
            p = tmcore.get_patch(model).runtime.info.num_protected
            counts = [_most(c) for c in t.token_counts]
            assert counts == sorted(counts, reverse=True), counts
            assert counts[-1] < counts[0], f"{config} reduced nothing"
            n0 = counts[0]
            b, m = t.sizes.shape[:2]
            assert t.source.shape == (x.shape[0], n0)
            assert torch.equal(t.source[:, :p], torch.arange(p).expand(x.shape[0], p)), "protected tokens moved"
            assert ((t.source >= -1) & (t.source < m)).all()
            if t.valid is None:  # fixed-shape plans (merging, dropping or both): counts are ints
                assert all(isinstance(c, int) for c in t.token_counts), t.token_counts
            valid = t.valid if t.valid is not None else torch.ones(b, m, dtype=torch.bool)
            final = t.token_counts[-1]
            assert torch.equal(valid.sum(1), final if isinstance(final, torch.Tensor) else torch.full((b,), final))
            landed = t.source >= 0
            assert valid.gather(1, t.source.clamp(min=0))[landed].all(), "an input token landed on a padding slot"
            assert (t.source_matrix().sum(2)[valid] >= 1).all(), "a kept output token stands for no input token"
            if self._cls().merge_only:
                assert (t.source >= 0).all()
                assert torch.equal(t.source_matrix().sum(1), torch.ones(x.shape[0], n0, dtype=torch.long))
                torch.testing.assert_close(
                    t.sizes.sum(1).squeeze(-1), torch.full((x.shape[0],), float(n0), dtype=t.sizes.dtype)
                )
                sizes_from_source = t.source_matrix().sum(2)
                torch.testing.assert_close(t.sizes.squeeze(-1), sizes_from_source.to(t.sizes.dtype))

    def test_batch_equals_samples(self, model: nn.Module) -> None:
        x = _inputs()
        for config in self._configs():
            tmcore.apply(model, self.reducer, replace=True, **config)
            with torch.no_grad():
                batched = model(x)
                single = torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])
            torch.testing.assert_close(batched, single, rtol=1e-7, atol=1e-7)

    def test_deepcopy_is_independent(self, model: nn.Module) -> None:
        x = _inputs(1)
        tmcore.apply(model, self.reducer, **self._configs()[0])
        clone = copy.deepcopy(model)
        with torch.no_grad():
            assert torch.equal(clone(x), model(x))
            tmcore.remove(clone)
            assert tmcore.get_patch(model) is not None and tmcore.get_patch(clone) is None
            with tmcore.trace(model) as t:
                model(x)
        assert _most(t.token_counts[-1]) < _most(t.token_counts[0])

    def test_backward(self, model: nn.Module) -> None:
        tmcore.apply(model, self.reducer, **self._configs()[0])
        model.train()
        model(_inputs()).sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
        assert model.blocks[0].attn.qkv.weight.grad is not None
