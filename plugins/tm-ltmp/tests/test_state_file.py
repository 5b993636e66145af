"""LTMP thresholds read from a file pass the same checks as a config's: finite, in [-1, 2], a
floating dtype, one per block; a refused file leaves the model and the reducer as they were."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tm_ltmp
import tmcore
from tmcore import InvalidConfigError

timm = pytest.importorskip("timm")

MERGE = [0.9, 0.8, 0.7, 0.6]
PRUNE = [0.0, 0.01, 0.02, 0.03]


def _vit() -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=7)


def _saved(tmp_path, **replace: torch.Tensor):
    """A thresholds file saved by `tmcore.save`, then rewritten with ``replace``'s tensors."""
    path = tmp_path / "ltmp.safetensors"
    tmcore.save(tmcore.apply(_vit(), "ltmp", merge_threshold=MERGE, prune_threshold=PRUNE), path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, **replace}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "name, tensor, message",
    [
        ("merge_threshold", torch.tensor([0.9, math.nan, 0.7, 0.6]), r"has values \[nan\] at block\(s\) \[1\]"),
        (
            "merge_threshold",
            torch.tensor([math.inf, 0.8, 0.7, -math.inf]),
            r"values \[inf, -inf\] at block\(s\) \[0, 3\]",
        ),
        ("merge_threshold", torch.tensor([0.9, 0.8, 5.0, 0.6]), r"values \[5\.0\] at block\(s\) \[2\]"),
        ("prune_threshold", torch.tensor([0.0, -3.0, 0.0, 0.0]), r"values \[-3\.0\] at block\(s\) \[1\]"),
        ("prune_threshold", torch.tensor([0, 0, 1, 1]), r"dtype torch\.int64"),
        ("prune_threshold", torch.tensor([True, False, True, True]), r"dtype torch\.bool"),
        ("merge_threshold", torch.tensor([0.9, 0.8, 0.7], dtype=torch.float32), r"shape \(3,\)"),
    ],
)
def test_bad_thresholds_in_a_file_are_refused_and_the_model_is_unchanged(tmp_path, name, tensor, message):
    path = _saved(tmp_path, **{name: tensor})
    model = tmcore.apply(_vit(), "ltmp")
    before = {k: v.clone() for k, v in tm_ltmp.thresholds(model).items()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    reducer = tmcore.get_patch(model).reducer
    with pytest.raises(InvalidConfigError, match=message) as err:
        tmcore.load(model, path)
    text = str(err.value)
    assert f"ltmp {name} in the file" in text
    if "shape" not in message:
        assert "allowed: a floating-point tensor of shape (4,), each value a finite number in [-1, 2]" in text
    assert tmcore.get_patch(model).reducer is reducer
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    for kind, value in tm_ltmp.thresholds(model).items():
        assert torch.equal(value, before[kind])


def test_a_refused_tensor_changes_no_parameter():
    """Both tensors are checked before either is copied: a good merge tensor beside a bad prune
    tensor is not loaded."""
    model = tmcore.apply(_vit(), "ltmp")
    reducer = tmcore.get_patch(model).reducer
    before = [p.detach().clone() for p in reducer.threshold_parameters()]
    good, bad = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.0, 0.0, math.nan, 0.0])
    with pytest.raises(InvalidConfigError, match=r"prune_threshold in the file has values \[nan\]"):
        reducer.load_state_tensors({"merge_threshold": good, "prune_threshold": bad})
    for param, old in zip(reducer.threshold_parameters(), before):
        assert torch.equal(param.detach(), old)


def test_a_valid_file_still_loads(tmp_path):
    path = _saved(tmp_path, prune_threshold=torch.tensor([-1.0, 0.5, 1.0, 2.0], dtype=torch.float64))
    model = tmcore.load(_vit(), path)
    thresholds = tm_ltmp.thresholds(model)
    assert torch.allclose(thresholds["merge"], torch.tensor(MERGE))
    assert torch.equal(thresholds["prune"], torch.tensor([-1.0, 0.5, 1.0, 2.0]))
