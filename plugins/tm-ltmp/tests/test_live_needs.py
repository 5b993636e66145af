"""LTMP at inference reads only what its thresholds can use: a block whose merge threshold cannot
fire (>= 1) skips matching, one whose prune threshold cannot fire (<= 0) keeps fused attention,
one where neither can fire only re-orders; thresholds that fire decide exactly as before."""

from __future__ import annotations

import pytest
import torch

import tm_ltmp
import tm_ltmp.reducer
import tmcore
from tm_ltmp.masks import output_order
from tmcore.testing import tiny_timm_models

timm = pytest.importorskip("timm")
tm_timm = pytest.importorskip("tm_timm.adapter")

# block 0: neither can fire; 1: both; 2: merge only; 3: prune only
MIXED = {"merge_threshold": [1.0, 0.5, 0.6, 1.0], "prune_threshold": [0.0, 0.015, -0.5, 0.018]}
EXPECTED = (frozenset(), frozenset({"keys", "attn"}), frozenset({"keys"}), frozenset({"attn"}))


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class _Paths:
    """Which blocks ran explicit attention, matching and importance (wrapping the functions the
    adapter and the reducer call)."""

    def __init__(self, model, monkeypatch):
        self.layer = None
        self.explicit, self.matched, self.scored = [], [], []
        for i, blk in enumerate(model.blocks):
            blk.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "layer", i))
        for module, name, log in [
            (tm_timm, "explicit_attention", self.explicit),
            (tm_ltmp.reducer, "best_match", self.matched),
            (tm_ltmp.reducer, "importance", self.scored),
        ]:
            original = getattr(module, name)

            def wrapped(*args, _original=original, _log=log, **kwargs):
                _log.append(self.layer)
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, wrapped)


def test_live_needs_follow_the_thresholds():
    model = tmcore.apply(tiny_timm_models()["vit"](), "ltmp", **MIXED)
    reducer = tm_ltmp.get_reducer(model)
    assert reducer.live_needs() == EXPECTED
    assert reducer.live_needs() is reducer.live_needs(), "cached while the thresholds are unchanged"
    modes = {
        "merge": (frozenset(), frozenset({"keys"}), frozenset({"keys"}), frozenset()),
        "prune": (frozenset(), frozenset({"attn"}), frozenset(), frozenset({"attn"})),
        "prune_merge": EXPECTED,
    }
    for mode, needs in modes.items():
        red = tm_ltmp.get_reducer(tmcore.apply(tiny_timm_models()["vit"](), "ltmp", mode=mode, **MIXED))
        assert red.live_needs() == needs, mode


@pytest.mark.parametrize("mode", ["merge_prune", "prune_merge", "merge", "prune"])
def test_each_block_takes_only_the_paths_its_thresholds_can_use(mode, monkeypatch):
    model = tmcore.apply(tiny_timm_models()["layerscale_qknorm"](), "ltmp", mode=mode, **MIXED)
    paths = _Paths(model, monkeypatch)
    with torch.no_grad():
        model(_images(3))
    reads = [needs if mode in ("merge_prune", "prune_merge") else None for needs in EXPECTED]
    if mode == "merge":
        reads = [needs - {"attn"} for needs in EXPECTED]
    elif mode == "prune":
        reads = [needs - {"keys"} for needs in EXPECTED]
    assert paths.explicit == [i for i, n in enumerate(reads) if "attn" in n]
    assert paths.scored == paths.explicit
    assert paths.matched == [i for i, n in enumerate(reads) if "keys" in n]


@pytest.mark.parametrize("mode", ["merge_prune", "prune"])
def test_blocks_that_cannot_fire_give_the_unreduced_block_output(mode):
    """Block 0 (nothing can fire) and block 3 (nothing can fire, after reductions in blocks 1
    and 2): the backbone's own ``Block.forward`` on the same input and attention bias
    (``log(size)``, padding), then only the original's [A, B] re-ordering. Not bit for bit: the
    patched block re-orders before its MLP, whose matmul then sees the rows in another order
    (another kernel blocking on some CPUs); float64 at 1e-12 still tells a wrong path (a merge,
    a prune, a missing bias: differences of 1e-2 and more) from this one."""
    model = tiny_timm_models()["vit"]()
    config = {"merge_threshold": [1.0, 0.6, 0.7, 1.0], "prune_threshold": [0.0, 0.016, 0.0, 0.0]}
    tmcore.apply(model, "ltmp", mode=mode, **config)
    runtime = tmcore.get_patch(model).runtime
    seen = {}

    def before(i, module, args):
        state = runtime.current()
        seen[i] = [args[0], None if state is None else state.attn_bias(args[0].dtype)]

    for i in (0, 3):
        model.blocks[i].register_forward_pre_hook(lambda m, a, i=i: before(i, m, a))
        model.blocks[i].register_forward_hook(lambda m, a, out, i=i: seen[i].append(out))
    with torch.no_grad():
        model(_images(1, seed=3))  # one image: no padding, so the re-ordering is one static gather
    blk_cls = type(model.blocks[0])
    for i in (0, 3):
        x, bias, out = seen[i]
        with torch.no_grad():
            ref = blk_cls.forward(model.blocks[i], x, attn_mask=bias)
        if mode != "prune":
            ref = ref[:, output_order(x.shape[1], 1, x.device)]
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12, msg=f"block {i}")
    assert seen[3][1] is not None and seen[3][0].shape[1] < 65, "blocks 1-2 reduced, so block 3 has sizes"


@pytest.mark.parametrize("mode", ["merge_prune", "prune_merge", "merge", "prune"])
def test_thresholds_that_fire_decide_exactly_as_when_every_block_reads_everything(mode, monkeypatch):
    """The live path against the path of every block reading keys and attention (as before
    live needs): the same tokens survive in every block, grouped the same, for a padded ragged
    batch too."""
    model = tiny_timm_models()["deit_distilled"]()
    tmcore.apply(model, "ltmp", mode=mode, **MIXED)
    x = _images(4, seed=9)
    with torch.no_grad(), tmcore.trace(model) as live:
        out_live = model(x)
    reducer = tm_ltmp.get_reducer(model)
    monkeypatch.setattr(reducer, "live_needs", lambda: tmcore.get_patch(model).runtime.layer_needs)
    with torch.no_grad(), tmcore.trace(model) as full:
        out_full = model(x)
    counts = [torch.as_tensor(c).expand(4).tolist() for c in live.token_counts]
    assert counts == [torch.as_tensor(c).expand(4).tolist() for c in full.token_counts]
    assert max(counts[-1]) < 66, counts
    assert torch.equal(live.source, full.source) and torch.equal(live.sizes, full.sizes)
    torch.testing.assert_close(out_live, out_full, rtol=0, atol=1e-12)


def test_live_needs_follow_load_fit_and_in_place_edits(tmp_path, monkeypatch):
    model = tmcore.apply(tiny_timm_models()["vit"](), "ltmp")  # merge 0.9, prune 0: no attention anywhere
    reducer = tm_ltmp.get_reducer(model)
    assert reducer.live_needs() == (frozenset({"keys"}),) * 4
    paths = _Paths(model, monkeypatch)
    with torch.no_grad():
        model(_images(2))
    assert paths.explicit == []

    source = tmcore.apply(tiny_timm_models()["vit"](), "ltmp", **MIXED)
    tmcore.save(source, tmp_path / "mixed.safetensors")
    tmcore.load(model, tmp_path / "mixed.safetensors")
    assert tm_ltmp.get_reducer(model).live_needs() == EXPECTED
    paths = _Paths(model, monkeypatch)
    with torch.no_grad():
        model(_images(2))
    assert paths.explicit == [1, 3]

    with torch.no_grad():
        tm_ltmp.thresholds(model)["prune"].zero_()
    assert tm_ltmp.get_reducer(model).live_needs() == (
        frozenset(),
        frozenset({"keys"}),
        frozenset({"keys"}),
        frozenset(),
    )
