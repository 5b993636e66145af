"""Failures a user meets outside the forward pass: reducer files that cannot be written or read,
traces asked about forwards that did not complete, and an apply that fails halfway. Each is a
`TmcoreError` naming what is wrong, and leaves the model as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import tmcore
from tmcore import InvalidFileError, InvalidInputError, TmcoreError, TraceError
from tmcore.testing import tiny_timm_models

pytest.importorskip("timm")


def _vit() -> torch.nn.Module:
    return tiny_timm_models()["vit"]()


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _fingerprint(model: torch.nn.Module) -> tuple:
    """What a failed call must not change: the patch (the same object, config and learned state),
    which modules are patched and hooked, the weights."""
    patch = tmcore.get_patch(model)
    return (
        patch,
        None if patch is None else patch.reducer.config,
        [(type(m), len(m._forward_hooks), "forward" in m.__dict__, sorted(m.__dict__)) for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        None if patch is None else {k: v.clone() for k, v in patch.reducer.state_tensors().items()},
    )


def _assert_same(a: tuple, b: tuple) -> None:
    assert a[:3] == b[:3]
    assert a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3])
    if a[4] is not None:
        assert all(torch.equal(a[4][k], b[4][k]) for k in a[4])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A valid LTMP file (learned thresholds) for a tiny ViT."""
    path = tmp_path_factory.mktemp("files") / "ltmp.safetensors"
    model = tmcore.apply(_vit(), "ltmp", merge_threshold=[0.9, 0.8, 0.7, 0.6], prune_threshold=0.01)
    tmcore.save(model, path)
    return path


# -- saving -------------------------------------------------------------------------------------


def test_save_names_a_missing_folder_and_a_folder_path(tmp_path):
    model = tmcore.apply(_vit(), "tome", r=4)
    with pytest.raises(
        InvalidFileError, match=r"cannot save to .*nope/r\.safetensors: the folder .*nope does not exist"
    ):
        tmcore.save(model, tmp_path / "nope" / "r.safetensors")
    with pytest.raises(InvalidFileError, match=r"it is a folder; give a file name"):
        tmcore.save(model, tmp_path)
    with pytest.raises(tmcore.NotAppliedError):
        tmcore.save(_vit(), tmp_path / "r.safetensors")


# -- loading ------------------------------------------------------------------------------------


def _rewrite(src: Path, dst: Path, metadata=None, tensors=None, drop=()) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(metadata or {})
    for key in drop:
        meta.pop(key)
    save_file(tensors if tensors is not None else state, str(dst), metadata=meta)
    return dst


def _broken_files(saved: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    data = saved.read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp / "text.safetensors").write_text("merge_threshold = 0.9\n")
    torch.save({"merge_threshold": torch.ones(4)}, tmp / "torch.pt")
    (tmp / "empty.safetensors").write_bytes(b"")
    flipped = bytearray(data)
    flipped[10] ^= 0xFF  # inside the JSON header
    (tmp / "corrupt.safetensors").write_bytes(bytes(flipped))
    return {
        "missing": (tmp / "nope.safetensors", "does not exist"),
        "folder": (tmp, "it is a folder"),
        "truncated": (tmp / "truncated.safetensors", "not a readable safetensors file"),
        "text": (tmp / "text.safetensors", "not a readable safetensors file"),
        "torch.save": (tmp / "torch.pt", "not a readable safetensors file"),
        "empty": (tmp / "empty.safetensors", "not a readable safetensors file"),
        "corrupt header": (tmp / "corrupt.safetensors", "safetensors"),
        "other format": (_rewrite(saved, tmp / "fmt.st", {"format": "x/1"}), "not a tmcore reducer file"),
        "no reducer": (_rewrite(saved, tmp / "nored.st", drop=["reducer"]), "names no reducer"),
        "config not JSON": (_rewrite(saved, tmp / "cfg.st", {"config": "{mode: merge"}), "metadata config="),
        "config a list": (_rewrite(saved, tmp / "list.st", {"config": "[1, 2]"}), "a JSON object"),
        "bad config value": (_rewrite(saved, tmp / "tau.st", {"config": '{"tau": -1}'}), "tau=-1"),
        "full_length": (_rewrite(saved, tmp / "fl.st", {"full_length": '"yes"'}), "true or false"),
        "unknown reducer": (_rewrite(saved, tmp / "unk.st", {"reducer": "nosuch"}), "unknown reducer 'nosuch'"),
        "NaN threshold": (
            _rewrite(
                saved,
                tmp / "nan.st",
                tensors={"merge_threshold": torch.full((4,), float("nan")), "prune_threshold": torch.zeros(4)},
            ),
            "merge_threshold",
        ),
        "prune threshold 5": (
            _rewrite(
                saved,
                tmp / "five.st",
                tensors={"merge_threshold": torch.ones(4), "prune_threshold": torch.full((4,), 5.0)},
            ),
            "prune_threshold",
        ),
        "int tensors": (
            _rewrite(
                saved,
                tmp / "int.st",
                tensors={"merge_threshold": torch.ones(4, dtype=torch.int64), "prune_threshold": torch.zeros(4)},
            ),
            "merge_threshold",
        ),
        "missing tensor": (
            _rewrite(saved, tmp / "one.st", tensors={"merge_threshold": torch.ones(4)}),
            "expected exactly",
        ),
        "other depth": (
            _rewrite(
                saved, tmp / "deep.st", tensors={"merge_threshold": torch.ones(12), "prune_threshold": torch.zeros(12)}
            ),
            "12",
        ),
    }


BROKEN = (
    "missing", "folder", "truncated", "text", "torch.save", "empty", "corrupt header", "other format", "no reducer",
    "config not JSON", "config a list", "bad config value", "full_length", "unknown reducer", "NaN threshold",
    "prune threshold 5", "int tensors", "missing tensor", "other depth",
)  # fmt: skip


@pytest.mark.parametrize("case", BROKEN)
def test_a_bad_file_names_itself_and_leaves_the_model_alone(case, saved, tmp_path):
    path, words = _broken_files(saved, tmp_path)[case]
    model = tmcore.apply(_vit(), "tome", r=4)
    before = _fingerprint(model)
    with pytest.raises(TmcoreError) as err:
        tmcore.load(model, path)
    assert str(path) in str(err.value) and words in str(err.value), str(err.value)
    _assert_same(before, _fingerprint(model))


def _not_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Paths that are no regular file, each with what the error must call it."""
    (tmp / "zero.safetensors").symlink_to("/dev/zero")  # reading it would never end
    (tmp / "gone.safetensors").symlink_to(tmp / "deleted.safetensors")
    os.mkfifo(tmp / "pipe.safetensors")  # opening it would wait for a writer
    (tmp / "folder-link").symlink_to(tmp)
    return {
        "link to /dev/zero": (tmp / "zero.safetensors", "it is a character device (a symbolic link to /dev/zero)"),
        "broken link": (tmp / "gone.safetensors", f"it is a broken symbolic link to {tmp / 'deleted.safetensors'}"),
        "fifo": (tmp / "pipe.safetensors", "it is a named pipe (FIFO)"),
        "link to a folder": (tmp / "folder-link", f"it is a folder (a symbolic link to {tmp})"),
        "missing": (tmp / "nope.safetensors", "it does not exist"),
    }


@pytest.mark.parametrize("case", ["link to /dev/zero", "broken link", "fifo", "link to a folder", "missing"])
def test_a_path_that_is_no_regular_file_says_what_it_is(case, tmp_path):
    path, words = _not_files(tmp_path)[case]
    with pytest.raises(InvalidFileError) as err:
        tmcore.load(_vit(), path)
    assert str(err.value) == f"cannot load {path}: {words}; expected a file written by tmcore.save"


def test_a_link_to_a_valid_file_loads(saved, tmp_path):
    (tmp_path / "link.safetensors").symlink_to(saved)
    assert tmcore.get_patch(tmcore.load(_vit(), tmp_path / "link.safetensors")).reducer.name == "ltmp"


def test_a_valid_file_still_loads(saved):
    model = tmcore.load(_vit(), saved)
    assert tmcore.get_patch(model).reducer.state_tensors()["merge_threshold"].tolist() == pytest.approx(
        [0.9, 0.8, 0.7, 0.6]
    )


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_are_a_tmcore_error(data, tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    model = _vit()
    with pytest.raises(TmcoreError):
        tmcore.load(model, path)
    assert tmcore.get_patch(model) is None


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    position=st.floats(0, 1, exclude_max=True),
    byte=st.integers(0, 255),
    cut=st.booleans(),
)
def test_mutated_valid_files_load_or_fail_cleanly(position, byte, cut, saved, tmp_path):
    """Any one-byte change to a valid file (or a cut there) loads as a valid reducer, or raises a
    `TmcoreError` with the model unchanged."""
    data = bytearray(saved.read_bytes())
    at = int(position * len(data))
    data = data[:at] if cut else data[:at] + bytes([byte]) + data[at + 1 :]
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(data))
    model = _load_or_unchanged(path)
    if tmcore.get_patch(model).reducer.name == "ltmp":
        thresholds = tmcore.get_patch(model).reducer.state_tensors()
        assert all(torch.isfinite(t).all() and ((t >= -1) & (t <= 2)).all() for t in thresholds.values())


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(["format", "reducer", "config", "model", "full_length"]),
    value=st.one_of(
        st.text(max_size=40), st.just("{}"), st.just("null"), st.just('{"tau": NaN}'), st.just("[[[]]]" * 50)
    ),
)
def test_mutated_metadata_loads_or_fails_cleanly(key, value, saved, tmp_path):
    _load_or_unchanged(_rewrite(saved, tmp_path / "meta.safetensors", {key: value}))


def _load_or_unchanged(path: Path) -> torch.nn.Module:
    """`tmcore.load` onto a ToMe-patched model: it loads, or raises a `TmcoreError` and leaves the
    model as it was."""
    model = tmcore.apply(_vit(), "tome", r=4)
    before = _fingerprint(model)
    try:
        tmcore.load(model, path)
    except TmcoreError:
        _assert_same(before, _fingerprint(model))
    return model


# -- apply ----------------------------------------------------------------------------------------


def test_a_failed_replace_leaves_the_previous_reducer(monkeypatch):
    model = tmcore.apply(_vit(), "tome", r=4)
    x = _images()
    with torch.no_grad():
        ref = model(x)
    before = _fingerprint(model)
    adapter = type(tmcore.get_patch(model).adapter)

    original = adapter.patch_model

    def fail(self, model, patch):  # the new reducer's patch fails halfway (blocks already patched)
        if patch.reducer.name == "pitome":
            raise tmcore.NoAdapterError("simulated failure in patch_model")
        original(self, model, patch)

    monkeypatch.setattr(adapter, "patch_model", fail)
    with pytest.raises(tmcore.NoAdapterError, match="simulated"):
        tmcore.apply(model, "pitome", ratio=0.9, replace=True)
    monkeypatch.undo()
    _assert_same(before, _fingerprint(model))
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    tmcore.remove(model)
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in model.modules())


# -- traces -------------------------------------------------------------------------------------


def test_trace_errors_say_why():
    model = tmcore.apply(_vit(), "tome", r=4)
    with tmcore.trace(model) as t:
        pass
    with pytest.raises(TraceError, match="no forward pass has run"):
        t.source_matrix()
    with tmcore.trace(model) as t, torch.no_grad():
        out = model.forward_features(_images())
    with pytest.raises(
        InvalidInputError, match=r"shape \(2, 49\); allowed: \[batch, tokens, channels\] with batch=2 and tokens=49"
    ):
        t.unmerge(out[:, :, 0])
    with pytest.raises(InvalidInputError, match="batch=2 and tokens=49"):
        t.unmerge(out[:1])
    with pytest.raises(InvalidInputError, match="batch=2 and tokens=49"):
        t.unmerge(torch.cat([out, out], 1))
    assert t.unmerge(out).shape == (2, 65, 48)


def test_a_forward_that_fails_partway_does_not_mix_with_the_previous_one(monkeypatch):
    model = tmcore.apply(_vit(), "tome", r=4)
    x = _images()
    with tmcore.trace(model) as t, torch.no_grad():
        model(x)
        assert t.finished and t.sizes is not None
        block = model.blocks[2]
        monkeypatch.setattr(block.mlp, "forward", lambda _: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            model(x[:1])
    assert t.token_counts == [65, 61, 57] and not t.finished
    assert t.sizes is None and t.source is None
    with pytest.raises(TraceError, match="stopped after entering block 2"):
        t.unmerge(torch.zeros(1, 49, 48))


def test_training_mode_traces_have_masks_not_source_maps():
    model = tmcore.apply(_vit(), "ltmp", merge_threshold=0.5, prune_threshold=0.01).train()
    with tmcore.trace(model) as t:
        model(_images())
    assert len(t.masks) == 4
    with pytest.raises(TraceError, match="soft-mask training mode.*read trace.masks"):
        t.source_matrix()


def test_full_length_and_json_values_round_trip(tmp_path):
    model = tmcore.apply(_vit(), "ppt", r=8, layers=[1, 2], threshold=float("inf"), full_length=True)
    tmcore.save(model, tmp_path / "ppt.safetensors")
    loaded = tmcore.load(_vit(), tmp_path / "ppt.safetensors")
    patch = tmcore.get_patch(loaded)
    assert patch.runtime.full_length and patch.reducer.config.threshold == float("inf")
    assert json.loads(patch.reducer.config.model_dump_json())["layers"] == [1, 2]
