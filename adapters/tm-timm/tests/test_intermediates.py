"""timm's feature paths on a patched model: ``forward_intermediates`` and
``get_intermediate_layers`` return full-size maps (each patch holds its merged group's value),
and gradient checkpointing in both of timm's modes."""

from __future__ import annotations

import pytest
import torch

import tmcore
from tmcore.registry import registry
from tmcore.testing import tiny_timm_models

timm = pytest.importorskip("timm")


def _settings() -> list[tuple[str, dict]]:
    registry.ensure_loaded()
    return [
        (name, reg.obj.example_configs[-1])
        for name, reg in sorted(registry.reducers.items())
        if "model" in getattr(reg.obj, "scopes", {"model"})  # block-scope reducers are for diffusion models
    ]


def _patched(model_name: str, reducer: str, config: dict) -> torch.nn.Module:
    model = tiny_timm_models()[model_name]()
    cls = registry.get_reducer(reducer).obj
    if cls.requires_class_token and model.cls_token is None:
        pytest.skip(f"{reducer} needs a class token")
    return tmcore.apply(model, reducer, **config)


def _images(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("model_name", sorted(tiny_timm_models()))
@pytest.mark.parametrize(("reducer", "config"), _settings(), ids=lambda v: v if isinstance(v, str) else "")
def test_intermediates_have_the_unreduced_shapes_and_the_reduced_values(model_name, reducer, config):
    model = _patched(model_name, reducer, config)
    x = _images(model)
    with torch.no_grad():
        tmcore.remove(model)
        ref_final, ref_maps = model.forward_intermediates(x, norm=True)
        tmcore.apply(model, reducer, **config)
        with tmcore.trace(model) as t:
            features = model.forward_features(x)
        final, maps = model.forward_intermediates(x, norm=True)
        tokens = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
    assert final.shape == ref_final.shape and [m.shape for m in maps] == [m.shape for m in ref_maps]
    # the last block's output is the normal forward's, spread over the patches through the source map
    torch.testing.assert_close(final, t.unmerge(features), rtol=0, atol=0)
    torch.testing.assert_close(maps[-1], final[:, model.num_prefix_tokens :].transpose(1, 2).reshape(maps[-1].shape))
    # each block's map holds as many distinct tokens as the block kept (merged tokens share one value,
    # pruned ones are 0)
    counts = t.token_counts[1:]
    for i, ((spatial, prefix), count) in enumerate(zip(tokens, counts)):
        stream = torch.cat([prefix, spatial], 1)
        for b in range(x.shape[0]):
            kept = count if isinstance(count, int) else int(count[b])
            rows = stream[b][stream[b].abs().sum(-1) > 0]  # zero rows: pruned positions
            assert len(torch.unique(rows, dim=0)) == kept, f"block {i}, sample {b}"


def test_get_intermediate_layers_and_stop_early():
    model = tmcore.apply(tiny_timm_models()["vit"](), "tome", r=8)
    x = _images(model)
    with torch.no_grad():
        last_two = model.get_intermediate_layers(x, n=2, reshape=True)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        full = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        # the state of a partial run does not leak into the next forward
        with tmcore.trace(model) as t:
            model(x)
    assert [m.shape for m in last_two] == [(2, 48, 8, 8)] * 2
    torch.testing.assert_close(early[0], full[0], rtol=0, atol=0)
    assert t.token_counts == [65, 57, 49, 41, 33]


def test_identity_intermediates_equal_the_unpatched_ones():
    model = tiny_timm_models()["layerscale_qknorm"]()
    x = _images(model)
    with torch.no_grad():
        ref = model.forward_intermediates(x, norm=True)
        tmcore.apply(model, "tome", r=0)
        out = model.forward_intermediates(x, norm=True)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-12)
    for a, b in zip(out[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize(("reducer", "config"), _settings(), ids=lambda v: v if isinstance(v, str) else "")
def test_gradient_checkpointing_in_both_modes(reducer, config, reentrant, monkeypatch):
    """timm checkpoints every block (``checkpoint_seq``); reentrant mode recomputes from detached
    inputs, non-reentrant from the same ones: the runtime replays the block's state in both."""
    from timm.layers import config as timm_config

    monkeypatch.setattr(timm_config, "_USE_REENTRANT_CKPT", reentrant)
    model = _patched("vit", reducer, config).train()
    x = _images(model)
    params = [
        *model.parameters(),
        *(v for v in vars(tmcore.get_patch(model).reducer).values() if isinstance(v, torch.nn.Parameter)),
    ]

    def grads() -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        model(x).square().sum().backward()
        return [p.grad.clone() for p in params if p.grad is not None]

    plain = grads()
    model.set_grad_checkpointing(True)
    if reentrant and callable(getattr(tmcore.get_patch(model).reducer, "soft_step", None)):
        # soft masks pass from block to block outside the checkpointed inputs: refused, not wrong
        with pytest.raises(tmcore.UnsupportedModelError, match="use non-reentrant checkpointing"):
            grads()
        return
    checked = grads()
    assert len(plain) == len(checked) > 0
    for a, b in zip(plain, checked):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    # the entries kept for the recomputation go with the forward's tensors
    assert not tmcore.get_patch(model).runtime._entered


def test_forward_intermediates_compiles_and_equals_eager():
    """One graph (``fullgraph=True``) and eager's maps: the feature path is as traceable as the
    forward."""
    from tmcore.testing.conformance import compile_counting_graphs

    model = tmcore.apply(tiny_timm_models()["vit"](), "tome", r=8)
    x = _images(model)
    with torch.no_grad():
        ref_final, ref_maps = model.forward_intermediates(x, norm=True)
        compiled, graphs = compile_counting_graphs(model.forward_intermediates, fullgraph=True)
        final, maps = compiled(x, norm=True)
    assert len(graphs) == 1
    torch.testing.assert_close(final, ref_final, rtol=1e-9, atol=1e-9)
    for a, b in zip(maps, ref_maps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
