"""LTMP through tmcore: identity, batched inference, the FLOPs loss, fit, save / load, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tm_ltmp
import tmcore
from tmcore import InvalidConfigError, NotAppliedError, TmcoreError
from tmcore.testing import tiny_timm_models

timm = pytest.importorskip("timm")

IDENTITY = {"merge_threshold": 2.0, "prune_threshold": -1.0}
REDUCING = {"merge_threshold": [0.55, 0.6, 0.6, 0.7], "prune_threshold": [0.0153, 0.016, 0.017, 0.02]}


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(tiny_timm_models()))
@pytest.mark.parametrize("mode", ["merge_prune", "prune_merge", "merge", "prune"])
def test_disabled_thresholds_give_the_unpatched_logits_in_both_modes(name, mode):
    model = tiny_timm_models()[name]()
    x = _images(2)
    with torch.no_grad():
        ref_eval = model(x)
        ref_train = model.train()(x)
        tmcore.apply(model, "ltmp", mode=mode, **IDENTITY)
        out_train = model(x)
        with tmcore.trace(model) as t:
            out_eval = model.eval()(x)
    # training: the masked softmax's epsilon (1e-5, the original's) is the only difference
    torch.testing.assert_close(out_train, ref_train, rtol=0, atol=1e-5)
    # inference: tokens are re-ordered ([A, B] as in the original), nothing removed
    torch.testing.assert_close(out_eval, ref_eval, rtol=0, atol=1e-12)
    assert [int(c.max()) if isinstance(c, torch.Tensor) else c for c in t.token_counts] == [t.token_counts[0]] * 5


@pytest.mark.parametrize("mode", ["merge_prune", "prune_merge", "merge", "prune"])
def test_batch_of_8_equals_8_single_image_runs(mode):
    model = tiny_timm_models()["layerscale_qknorm"]()
    config = dict(REDUCING, mode=mode)
    if mode == "prune":
        config["prune_threshold"] = [0.015, 0.0, 0.016, 0.0]
    tmcore.apply(model, "ltmp", **config)
    x = _images(8, seed=5)
    with torch.no_grad():
        with tmcore.trace(model) as t:
            batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-10)
    final = t.token_counts[-1]
    assert len(set(final.tolist())) > 1, f"images should keep different counts: {t.token_counts}"
    assert t.valid.shape == (8, int(final.max())) and torch.equal(t.valid.sum(1), final)


def test_padding_never_survives_nor_matches():
    """Ragged state in, ragged plan out: padding tokens are never kept, never sources nor
    destinations, and never move the real tokens' decisions (importance over valid rows)."""
    from tmcore.plan import destinations

    torch.manual_seed(0)
    model = tmcore.apply(tiny_timm_models()["vit"](), "ltmp", **REDUCING)
    red = tmcore.get_patch(model).reducer
    x = _images(4)
    seen = []
    match = red.match

    def spy(layer, scores, state):
        plan = match(layer, scores, state)
        seen.append((state.valid, plan))
        return plan

    red.match = spy
    with torch.no_grad():
        model(x)
    assert any(valid is not None and not valid.all() for valid, _ in seen), "no ragged layer was exercised"
    for valid, plan in seen:
        if valid is None:
            continue
        dest = destinations(plan)
        assert (dest[~valid] == -1).all(), "a padding token was kept or merged"
        real_src = plan.src_dst >= 0
        assert valid.gather(1, plan.src)[real_src].all()


def test_thresholds_get_gradients_and_live_outside_the_model():
    model = tmcore.apply(tiny_timm_models()["vit"](), "ltmp", **REDUCING)
    params = tm_ltmp.thresholds(model)
    assert params["merge"].shape == params["prune"].shape == (4,)
    assert not any(p is params["merge"] or p is params["prune"] for p in model.parameters())
    model.train()
    with tmcore.trace(model) as t:
        out = model(_images(2))
    assert len(t.masks) == 4 and all(m.shape == (2, 65) for m in t.masks)
    (out.square().mean() + tm_ltmp.flops_ratio(t.masks, 65, 48)).backward()
    assert params["merge"].grad.abs().sum() > 0 and params["prune"].grad.abs().sum() > 0
    assert all(isinstance(c, torch.Tensor) for c in t.token_counts)  # alive tokens per image
    assert t.source is None  # training mode masks tokens, it does not move them


def test_a_compiled_training_step_equals_eager():
    """Training compiles into one graph (soft masks: nothing is ragged, nothing syncs); the loss
    and the thresholds' gradients are eager's."""
    from tmcore.testing.conformance import compile_counting_graphs

    def step(model):
        params = list(tm_ltmp.thresholds(model).values())
        for p in params:
            p.grad = None
        with tmcore.trace(model) as t:
            out = model(_images(2))
        loss = out.square().mean() + tm_ltmp.flops_ratio(t.masks, 65, 48)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    model = tmcore.apply(tiny_timm_models()["vit"](), "ltmp", **REDUCING).train()
    loss, grads = step(model)
    compiled, graphs = compile_counting_graphs(model, fullgraph=True)
    compiled_loss, compiled_grads = step(compiled)
    assert len(graphs) == 1
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-9, atol=1e-9)
    for a, b in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_flops_ratio():
    n, d = 197, 384
    ones = [torch.ones(2, n) for _ in range(12)]
    assert tm_ltmp.flops_ratio(ones, n, d).item() == pytest.approx(1.0)
    half = torch.full((12,), 0.5)
    dense = 6 * n * d**2 + n**2 * d
    first = (2 * n * d**2 + n**2 * d + 4 * 0.5 * n * d**2) / dense
    rest = (2 * 0.5 * n * d**2 + (0.5 * n) ** 2 * d + 4 * 0.5 * n * d**2) / dense
    assert tm_ltmp.flops_ratio(half, n, d).item() == pytest.approx((first + 11 * rest) / 12)
    means = torch.full((3,), 0.8, requires_grad=True)
    tm_ltmp.flops_ratio(means, n, d).backward()
    assert (means.grad > 0).all()
    loss = tm_ltmp.loss(torch.zeros(2, 5), torch.tensor([0, 1]), torch.tensor(0.85), 0.75, reg_scale=10.0)
    expected = torch.nn.functional.cross_entropy(torch.zeros(2, 5), torch.tensor([0, 1]), label_smoothing=0.1) + 0.1
    torch.testing.assert_close(loss, expected)


def _synthetic_loader(batches=8, batch=8):
    """Blocky images (4 x 4 colour cells of 2 x 2 patches, plus noise): neighbouring patches
    are similar to a varying degree, so merging has something to learn from."""
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batches):
        cells = torch.nn.functional.interpolate(torch.randn(batch, 3, 4, 4, generator=gen), size=32, mode="nearest")
        data.append(
            (cells + torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 7, (batch,), generator=gen))
        )
    return data


def test_fit_moves_the_flops_ratio_to_the_target_and_freezes_the_backbone():
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=7
    ).eval()
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    tmcore.apply(model, "ltmp")  # merge 0.9, prune 0 in every block
    loader = _synthetic_loader()
    history = tm_ltmp.fit(model, loader, reduction_target=0.7, epochs=4, lr=(1e-4, 5e-2), momentum=0.9, progress=False)

    assert history.steps == 32 and history.skipped == 0
    ratios = history.flops_ratio
    assert ratios[0] > 0.95 and abs(sum(ratios[-4:]) / 4 - 0.7) < 0.06, ratios
    first, last = sum(history.loss[:4]) / 4, sum(history.loss[-4:]) / 4
    assert last < first - 0.3, (first, last)
    thresholds = tm_ltmp.thresholds(model)
    assert ((thresholds["merge"] >= 0) & (thresholds["merge"] <= 1)).all()
    assert torch.equal(history.merge_threshold, thresholds["merge"].detach())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"backbone weight {key} changed"
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    # the learned thresholds really remove tokens at inference
    with torch.no_grad(), tmcore.trace(model) as t:
        model(loader[0][0])
    assert int(t.token_counts[-1].max()) < 65


def test_fit_reaches_a_low_target_where_the_original_penalty_settles_short_of_it():
    """Against the cross-entropy's pull the original's penalty alone settles 0.04 above the target;
    the default recipe's multiplier (and gradient clip) brings the FLOPs ratio onto it."""
    loader = _synthetic_loader(batches=16, batch=16)
    ends = {}
    for recipe in ({}, {"regulariser": "penalty", "clip": None}):
        torch.manual_seed(0)
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=7
        ).eval()
        tmcore.apply(model, "ltmp")
        history = tm_ltmp.fit(model, loader, reduction_target=0.42, epochs=6, lr=(1e-4, 5e-2), progress=False, **recipe)
        ends[recipe.get("regulariser", "lagrangian")] = sum(history.flops_ratio[-16:]) / 16
        assert history.flops_ratio[0] > 0.95
        if recipe:
            assert set(history.multiplier) == {0.0}
        else:
            assert history.multiplier[-1] > 0, "the multiplier pulled towards the target"
    assert abs(ends["lagrangian"] - 0.42) < 0.02, ends
    assert ends["penalty"] - 0.42 > 0.03, ends


def test_fit_progress_and_nan_batches_are_skipped(capsys, monkeypatch):
    model = tmcore.apply(tiny_timm_models()["vit"]().float(), "ltmp")
    loader = _synthetic_loader(batches=3, batch=2)
    loader[1] = (torch.full_like(loader[1][0], float("nan")), loader[1][1])
    import builtins

    real_import = builtins.__import__

    def no_rich(name, *args, **kwargs):
        if name.startswith("rich"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rich)
    history = tm_ltmp.fit(model, loader, lr=1e-3, log_every=1)
    assert history.steps == 2 and history.skipped == 1
    err = capsys.readouterr().err
    assert "ltmp fit step 1/3" in err and "flops" in err


def test_fit_shows_a_rich_progress_bar_on_a_terminal_and_lines_in_a_log(capsys, monkeypatch):
    pytest.importorskip("rich")
    model = tmcore.apply(tiny_timm_models()["vit"]().float(), "ltmp")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat stderr as a terminal
    assert tm_ltmp.fit(model, _synthetic_loader(batches=2, batch=2), lr=1e-3).steps == 2
    err = capsys.readouterr().err
    assert "ltmp fit" in err and "2/2" in err and "ltmp fit step" not in err
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    tm_ltmp.fit(model, _synthetic_loader(batches=2, batch=2), lr=1e-3, log_every=1)
    err = capsys.readouterr().err
    assert "ltmp fit step 1/2" in err and "ltmp fit step 2/2" in err


def test_save_load_round_trips_thresholds_exactly(tmp_path):
    model = tmcore.apply(tiny_timm_models()["deit_distilled"](), "ltmp", mode="prune_merge", tau=0.2, **REDUCING)
    with torch.no_grad():
        for p in tm_ltmp.thresholds(model).values():
            p.copy_(torch.rand(4, generator=torch.Generator().manual_seed(7)) * 0.02 + 0.5 * (p > 0.1))
    path = tmp_path / "ltmp.safetensors"
    tmcore.save(model, path)
    fresh = tmcore.load(tiny_timm_models()["deit_distilled"](), path)
    red, fresh_red = tmcore.get_patch(model).reducer, tmcore.get_patch(fresh).reducer
    assert fresh_red.config == red.config
    for kind in ("merge", "prune"):
        assert torch.equal(tm_ltmp.thresholds(fresh)[kind], tm_ltmp.thresholds(model)[kind])
    x = _images(3)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"merge_threshold", "prune_threshold"} and f.metadata()["reducer"] == "ltmp"


def test_load_refuses_a_thresholds_file_for_another_depth(tmp_path):
    deep = tmcore.apply(tiny_timm_models()["vit"](), "ltmp")
    tmcore.save(deep, tmp_path / "four.safetensors")
    shallow = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3
    )
    shallow = tmcore.apply(shallow, "tome", r=2)
    with pytest.raises(
        InvalidConfigError, match=r"merge_threshold .*shape \(4,\).*this model has 3 blocks.*allowed shape \(3,\)"
    ):
        tmcore.load(shallow, tmp_path / "four.safetensors")
    assert tmcore.get_patch(shallow).reducer.name == "tome", "a failed load must leave the model as it was"
    listed = tmcore.apply(tiny_timm_models()["vit"](), "ltmp", merge_threshold=[0.9, 0.9, 0.8, 0.8])
    tmcore.save(listed, tmp_path / "listed.safetensors")
    message = r"merge_threshold=\[0\.9, 0\.9, 0\.8, 0\.8\] has 4 entries for a model with 3 blocks"
    with pytest.raises(InvalidConfigError, match=message):
        tmcore.load(shallow, tmp_path / "listed.safetensors")


@pytest.mark.parametrize(
    "config, match",
    [
        ({"tau": 0}, r"tau=0: must be a finite number in \(0, 10\]"),
        ({"tau": -0.5}, r"tau=-0.5"),
        ({"tau": 50}, r"tau=50: must be a finite number in \(0, 10\]"),
        ({"reduction_target": 0}, r"reduction_target=0: must be a finite number in \(0, 1\]"),
        ({"reduction_target": 1.5}, r"reduction_target=1.5: must be a finite number in \(0, 1\]"),
        ({"mode": "prune_first"}, r"mode='prune_first': .*'merge_prune'"),
        ({"merge_threshold": 3.0}, r"merge_threshold=3.0: must be a finite number in \[-1, 2\]"),
        ({"merge_threshold": [0.9, 0.9]}, r"merge_threshold=\[0\.9, 0\.9\] has 2 entries for a model with 4 blocks"),
        ({"thresholds": 0.5}, r"unknown config key 'thresholds'"),
    ],
)
def test_bad_configs_name_field_value_and_range(config, match):
    with pytest.raises(InvalidConfigError, match=match):
        tmcore.apply(tiny_timm_models()["vit"](), "ltmp", **config)


def test_fit_rejects_bad_arguments():
    model = tmcore.apply(tiny_timm_models()["vit"](), "ltmp")
    for kwargs, match in [
        ({"reduction_target": 0.0}, r"reduction_target=0.0: must be in \(0, 1\]"),
        ({"reduction_target": 1.2}, r"reduction_target=1.2"),
        ({"lr": (1e-3, 1e-3, 1e-3)}, r"lr=.*one positive float .* or two \(prune lr, merge lr\)"),
        ({"epochs": 0}, r"epochs=0"),
        ({"regulariser": "l2"}, r"regulariser='l2': allowed 'lagrangian' or 'penalty'"),
        ({"multiplier_lr": -1.0}, r"multiplier_lr=-1.0: must be a finite float >= 0"),
        ({"clip": 0.0}, r"clip=0.0: must be a finite float > 0, or None"),
    ]:
        with pytest.raises(InvalidConfigError, match=match):
            tm_ltmp.fit(model, [], **kwargs)
    with pytest.raises(NotAppliedError, match="reducer 'tome'"):
        tm_ltmp.fit(tmcore.apply(tiny_timm_models()["vit"](), "tome", r=2), [])
    assert issubclass(NotAppliedError, TmcoreError)


_MODEL = tiny_timm_models()["reg4_avgpool"]()  # avg pool over patch tokens, 4 register tokens
_X = _images(3, seed=11)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    st.lists(st.floats(0.0, 0.03), min_size=4, max_size=4),
    st.sampled_from(["merge_prune", "prune_merge", "merge", "prune"]),
)
def test_any_thresholds_keep_batches_consistent_and_finite(merge, prune, mode):
    """Property: for any thresholds, the ragged batch equals its samples and stays finite."""
    model = tmcore.apply(_MODEL, "ltmp", replace=True, mode=mode, merge_threshold=merge, prune_threshold=prune)
    with torch.no_grad():
        batched = model(_X)
        single = torch.cat([model(_X[i : i + 1]) for i in range(_X.shape[0])])
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, single, rtol=1e-9, atol=1e-9)
