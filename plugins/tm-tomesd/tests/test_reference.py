"""tm-tomesd against a reference written from the paper (Bolya and Hoffman, CVPR-W 2023) and the
structure of tomesd 0.1.3's ``bipartite_soft_matching_random2d``, apart from the plugin: one
``(merge, unmerge)`` pair of closures per block call, computed from the block's input under
``no_grad``, applied around the block's sub-layers by forward hooks (the original swaps the block
class instead; the sub-layers' inputs and outputs are the same). The random cell choice is drawn
as tomesd draws it, from a generator forked from the global RNG at the first merging call."""

from __future__ import annotations

import math

import pytest
import torch

import tmcore

diffusers = pytest.importorskip("diffusers")


def reference_random2d(metric, w, h, sx, sy, r, no_rand, generator):
    """``(merge, unmerge)`` for one block call, in the original's structure: a ``-1 / 0`` buffer
    marks one destination per cell, an argsort puts destinations first, cosine matching of the
    sources against the destinations, the ``r`` best-matched sources merge by scatter-mean,
    unmerge copies each group's value back to its members."""
    b, n, _ = metric.shape
    if r <= 0:
        return (lambda x: x), (lambda x: x)
    with torch.no_grad():
        hs, ws = h // sy, w // sx
        if no_rand:
            choice = torch.zeros(hs, ws, 1, dtype=torch.long)
        else:
            choice = torch.randint(sy * sx, size=(hs, ws, 1), generator=generator)
        cells = torch.zeros(hs, ws, sy * sx, dtype=torch.long).scatter_(2, choice, -1)
        cells = cells.view(hs, ws, sy, sx).transpose(1, 2).reshape(hs * sy, ws * sx)
        buffer = torch.zeros(h, w, dtype=torch.long)
        buffer[: hs * sy, : ws * sx] = cells
        order = buffer.reshape(1, -1, 1).argsort(dim=1)
        num_dst = hs * ws
        a_idx, b_idx = order[:, num_dst:, :], order[:, :num_dst, :]
        normed = metric / metric.norm(dim=-1, keepdim=True)
        a = normed.gather(1, a_idx.expand(b, n - num_dst, normed.shape[-1]))
        d = normed.gather(1, b_idx.expand(b, num_dst, normed.shape[-1]))
        r = min(a.shape[1], r)
        node_max, node_idx = (a @ d.transpose(-1, -2)).max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)

    def merge(x):
        c = x.shape[-1]
        src = x.gather(1, a_idx.expand(b, n - num_dst, c))
        dst = x.gather(1, b_idx.expand(b, num_dst, c))
        unm = src.gather(1, unm_idx.expand(b, unm_idx.shape[1], c))
        src = src.gather(1, src_idx.expand(b, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(b, r, c), src, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(x):
        c = x.shape[-1]
        unm_len = unm_idx.shape[1]
        unm, dst = x[:, :unm_len], x[:, unm_len:]
        src = dst.gather(1, dst_idx.expand(b, r, c))
        out = torch.zeros(b, n, c, dtype=x.dtype)
        out.scatter_(1, b_idx.expand(b, num_dst, c), dst)
        out.scatter_(1, a_idx.expand(b, n - num_dst, c).gather(1, unm_idx.expand(b, unm_len, c)), unm)
        out.scatter_(1, a_idx.expand(b, n - num_dst, c).gather(1, src_idx.expand(b, r, c)), src)
        return out

    return merge, unmerge


def reference_forward(unet, inputs, state, ratio, max_downsample=1, sx=2, sy=2, use_rand=True, sublayers=("attn1",)):
    """The UNet with every transformer block merging and unmerging around ``sublayers``;
    ``state`` holds the generator from call to call, as the original's patch does."""
    from diffusers.models.attention import BasicTransformerBlock

    height, width = inputs["sample"].shape[-2:]
    state.setdefault("generator", None)
    handles = []

    def open_block(block, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        ds = int(math.ceil(math.sqrt(height * width // x.shape[1])))
        state["pair"] = None
        if ds > max_downsample:
            return
        if state["generator"] is None:
            state["generator"] = torch.Generator().set_state(torch.get_rng_state())
        rand = use_rand and x.shape[0] % 2 == 0
        h, w = math.ceil(height / ds), math.ceil(width / ds)
        state["pair"] = reference_random2d(x, w, h, sx, sy, int(x.shape[1] * ratio), not rand, state["generator"])

    def before(module, args, kwargs):
        if state["pair"] is None:
            return None
        return (state["pair"][0](args[0]), *args[1:]), kwargs

    def after(module, args, kwargs, out):
        return out if state["pair"] is None else state["pair"][1](out)

    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            handles.append(block.register_forward_pre_hook(open_block, with_kwargs=True))
            for name in sublayers:
                sub = getattr(block, name)
                handles.append(sub.register_forward_pre_hook(before, with_kwargs=True))
                handles.append(sub.register_forward_hook(after, with_kwargs=True))
    try:
        return unet(**inputs).sample
    finally:
        for handle in handles:
            handle.remove()


SUBLAYERS = {"merge_attn": "attn1", "merge_crossattn": "attn2", "merge_mlp": "ff"}


@pytest.mark.parametrize(
    "config",
    [
        {"ratio": 0.5},
        {"ratio": 0.3, "use_rand": False},
        {"ratio": 0.6, "max_downsample": 2, "merge_crossattn": True, "merge_mlp": True},
        {"ratio": 0.4, "sx": 3, "sy": 2},
        {"ratio": 0.75, "sx": 2, "sy": 2, "max_downsample": 4},
    ],
)
@pytest.mark.parametrize("batch", [2, 3])
def test_unet_equals_reference(config, batch):
    from tm_diffusers import Diffusers

    unet = Diffusers.tiny_models()["unet"]()
    inputs = Diffusers().example_inputs(unet, batch=batch, seed=4)
    flags = {"merge_attn": True, **{k: v for k, v in config.items() if k in SUBLAYERS}}
    options = {k: v for k, v in config.items() if k not in SUBLAYERS}
    sublayers = tuple(SUBLAYERS[k] for k, on in flags.items() if on)
    with torch.no_grad():
        torch.manual_seed(7)
        state = {}
        ref = [reference_forward(unet, inputs, state, sublayers=sublayers, **options) for _ in range(2)]
        tmcore.apply(unet, "tomesd", **config)
        torch.manual_seed(7)
        out = [unet(**inputs).sample for _ in range(2)]  # the generator advances from call to call
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-9)
