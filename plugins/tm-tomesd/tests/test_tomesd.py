"""tm-tomesd's own behaviour: tomesd's outputs bit for bit, its randomness rules, the block-scope
guarantees (identity, token counts kept, shared partitions), and its config errors."""

from __future__ import annotations

import copy

import pytest
import torch

import tmcore
from tm_tomesd import random2d_plan, stride_partition

diffusers = pytest.importorskip("diffusers")
from tm_diffusers import Diffusers  # noqa: E402


@pytest.fixture
def unet():
    return Diffusers.tiny_models()["unet"]()


def inputs(model, batch=2, seed=1):
    return Diffusers().example_inputs(model, batch=batch, seed=seed)


def run(model, x):
    with torch.no_grad():
        return model(**x).sample


def test_partition_has_one_destination_per_cell():
    choice = torch.tensor([[3, 0, 1], [2, 2, 0]])  # 2 x 3 cells of 2 x 2 on a 5 x 7 grid
    order = stride_partition(5, 7, 2, 2, choice, torch.device("cpu"))
    assert sorted(order.tolist()) == list(range(35))
    dst = order[:6]
    rows, cols = dst // 7, dst % 7
    cells = list(zip((rows // 2).tolist(), (cols // 2).tolist()))
    assert sorted(cells) == [(i, j) for i in range(2) for j in range(3)]
    inside = ((rows % 2) * 2 + cols % 2).tolist()
    assert inside == [choice[i, j].item() for i, j in cells]
    assert (rows < 4).all() and (cols < 6).all()  # the border row and column are sources only


def test_plan_merges_r_sources_into_their_best_destination():
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 16, 5, generator=gen, dtype=torch.float64)
    order = stride_partition(4, 4, 2, 2, None, metric.device)
    plan = random2d_plan(metric, order, 4, 6)
    assert plan.num_out == 10 and plan.src.shape == (2, 6)
    normed = metric / metric.norm(dim=-1, keepdim=True)
    best = (normed[:, order[4:]] @ normed[:, order[:4]].transpose(1, 2)).argmax(-1)  # [B, 12]
    for b in range(2):
        for token, slot in zip(plan.src[b].tolist(), plan.src_dst[b].tolist()):
            assert plan.keep[b, slot].item() == order[:4][best[b, order[4:].tolist().index(token)]].item()


def test_equals_tomesd_bit_for_bit(unet):
    """The original package on the same UNet: the same outputs at every call, its generator
    stream included (tomesd still patches diffusers 0.42's SD-1.x-style blocks)."""
    tomesd = pytest.importorskip("tomesd")
    x = inputs(unet)
    for config in ({"ratio": 0.5}, {"ratio": 0.4, "merge_crossattn": True, "merge_mlp": True, "max_downsample": 2}):
        theirs, ours = copy.deepcopy(unet), copy.deepcopy(unet)
        tomesd.apply_patch(theirs, **config)
        tmcore.apply(ours, "tomesd", **config)
        outs = []
        for model in (theirs, ours):
            torch.manual_seed(3)
            with torch.no_grad():  # tomesd's pre-hook reads the latent from the positional argument
                outs.append([model(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample for _ in range(3)])
        for a, b in zip(*outs):  # bit for bit here; another CPU may round the two codes' sums apart
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=lambda m, c=config: f"{c}: {m}")


def test_ratio_zero_is_the_identity_bit_for_bit(unet):
    x = inputs(unet)
    ref = run(unet, x)
    tmcore.apply(unet, "tomesd", ratio=0.0, merge_crossattn=True, merge_mlp=True, max_downsample=8)
    assert torch.equal(run(unet, x), ref)


def test_blocks_hand_back_every_token(unet):
    tmcore.apply(unet, "tomesd", ratio=0.5, merge_mlp=True, max_downsample=8, seed=0)
    shapes = []
    hooks = [
        b.register_forward_hook(lambda m, a, kw, out: shapes.append((a[0].shape, out.shape)), with_kwargs=True)
        for b in Diffusers().blocks(unet)
    ]
    with tmcore.trace(unet) as t:
        run(unet, inputs(unet))
    for h in hooks:
        h.remove()
    assert shapes and all(i == o for i, o in shapes)
    assert t.merged_counts == [n - int(n * 0.5) for n in t.token_counts[:-1]]


def test_max_downsample_picks_the_resolutions(unet):
    counts = {}
    for ds in (1, 2):
        tmcore.apply(unet, "tomesd", ratio=0.5, max_downsample=ds, replace=True)
        with tmcore.trace(unet) as t:
            run(unet, inputs(unet))
        counts[ds] = t.merged_counts
    full = [n for n in t.token_counts[:-1]]
    assert counts[1] == [32 if n == 64 else n for n in full]  # 8 x 8 latent: only the 64-token blocks
    assert counts[2] == [n // 2 for n in full]


@pytest.fixture
def partitions(monkeypatch):
    """The destination sets of every merging block call, as the reducer hands them to the matching."""
    import tm_tomesd.reducer

    seen = []

    def spy(metric, order, num_dst, r):
        seen.append(order[:num_dst].sort().values)
        return random2d_plan(metric, order, num_dst, r)

    monkeypatch.setattr(tm_tomesd.reducer, "random2d_plan", spy)
    return seen


def test_halves_of_a_batch_share_the_partition(unet, partitions):
    """Classifier-free guidance batches the conditional and unconditional halves: both get the
    same partition (one draw for the whole batch: the destinations are one [N] index set), so
    equal halves give equal outputs."""
    x = inputs(unet, batch=2)
    doubled = {k: torch.cat([v, v]) for k, v in x.items()}
    for config in ({"ratio": 0.5}, {"ratio": 0.5, "seed": 3}):
        tmcore.apply(unet, "tomesd", replace=True, **config)
        out = run(unet, doubled)
        torch.testing.assert_close(out[:2], out[2:], rtol=0, atol=0)
    assert partitions and all(p.shape == (16,) for p in partitions)
    assert any(
        not torch.equal(p, torch.tensor([0, 2, 4, 6, 16, 18, 20, 22, 32, 34, 36, 38, 48, 50, 52, 54]))
        for p in partitions
    )


def test_generator_rule(unet):
    """seed=None: draws advance from call to call, from a fork of the global RNG (left as it was);
    seeding the global RNG before the first call reproduces a run. Odd batches draw nothing."""
    x = inputs(unet, batch=2)
    tmcore.apply(unet, "tomesd", ratio=0.5)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    first = [run(unet, x) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(first[0], first[1])
    tmcore.apply(unet, "tomesd", ratio=0.5, replace=True)
    torch.manual_seed(11)
    assert all(torch.equal(a, run(unet, x)) for a in first)
    odd = inputs(unet, batch=1)
    tmcore.apply(unet, "tomesd", ratio=0.5, use_rand=False, replace=True)
    top_left = run(unet, odd)
    tmcore.apply(unet, "tomesd", ratio=0.5, replace=True)
    assert torch.equal(run(unet, odd), top_left)


def test_seeded_partitions_are_fixed_and_differ_by_seed(unet, partitions):
    x = inputs(unet, batch=2)
    first = {}
    for seed in (0, 1):
        tmcore.apply(unet, "tomesd", ratio=0.5, seed=seed, replace=True)
        partitions.clear()
        a = run(unet, x)
        assert torch.equal(a, run(unet, x))
        half = len(partitions) // 2
        assert all(torch.equal(p, q) for p, q in zip(partitions[:half], partitions[half:]))  # the same every call
        first[seed] = partitions[0]
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"ratio": 0.8}, "0 <= ratio <= 0.75"),
        ({"ratio": 0.6, "sx": 1, "sy": 2}, "0 <= ratio <= 0.5"),
        ({"ratio": 1.0}, "ratio=1.0"),
        ({"seed": -1}, "seed=-1"),
        ({"max_downsample": 0}, "max_downsample=0"),
        ({"merge_attn": "yes"}, "merge_attn='yes'"),
    ],
)
def test_bad_configs_are_named(unet, config, words):
    with pytest.raises(tmcore.InvalidConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        tmcore.apply(unet, "tomesd", **config)
    assert tmcore.get_patch(unet) is None


def test_refused_on_a_vit_with_the_reducers_that_fit():
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )
    with pytest.raises(tmcore.UnsupportedModelError, match=r"scope \['block'\].*'model'"):
        tmcore.apply(vit, "tomesd")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's note on the graph break
def test_the_generator_compiles_with_graph_breaks(unet):
    """tomesd's own rule draws from a host-side generator: torch.compile breaks the graph there
    and still draws as eager does (the conformance suite compiles seeded configs with fullgraph)."""
    from tmcore.testing.conformance import compile_counting_graphs

    x = inputs(unet, batch=2)
    tmcore.apply(unet, "tomesd", ratio=0.5)
    torch.manual_seed(2)
    ref = [run(unet, x) for _ in range(2)]
    tmcore.apply(unet, "tomesd", ratio=0.5, replace=True)
    compiled, graphs = compile_counting_graphs(unet, fullgraph=False)
    torch.manual_seed(2)
    for r in ref:
        torch.testing.assert_close(run(compiled, x), r, rtol=1e-9, atol=1e-9)
    assert len(graphs) > 1
