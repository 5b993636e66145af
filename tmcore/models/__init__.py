"""Models bundled with tmcore, loadable with no download.

model = tmcore.models.load("fmnist-vit")            # a timm VisionTransformer, eval mode
images, labels = tmcore.models.load_samples("fmnist-vit")   # 2,000 labelled test images
logits = model(tmcore.models.preprocess(images, model))
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from typing import Any

import torch
from torch import nn

from tmcore.errors import TmcoreError

__all__ = [
    "FMNIST_ARCH",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "UnknownModelError",
    "available",
    "build_fmnist_vit",
    "card",
    "load",
    "load_samples",
    "preprocess",
    "reducer_files",
]

FMNIST_ARCH: dict[str, Any] = dict(
    img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=128, depth=12, num_heads=4, mlp_ratio=4.0
)
"""The bundled Fashion-MNIST ViT: 196 patches + class token = 197 tokens, 12 blocks."""

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530

_BUNDLED: dict[str, dict[str, Any]] = {
    "fmnist-vit": {
        "weights": "fmnist-vit.safetensors",
        "samples": "fmnist-test-2000.safetensors.gz",
        # learned reducer state for this model (tmcore.save files); see the model card
        "reducers": {
            "ltmp": ["fmnist-vit-ltmp75.safetensors", "fmnist-vit-ltmp50.safetensors"],
            "diffrate": ["fmnist-vit-diffrate.safetensors"],
        },
    },
}


class UnknownModelError(TmcoreError, KeyError):
    """A bundled model name that does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def available() -> list[str]:
    """Names of the bundled models."""
    return sorted(_BUNDLED)


def _files(name: str) -> dict[str, str]:
    if name not in _BUNDLED:
        raise UnknownModelError(f"unknown bundled model {name!r}; bundled models: {', '.join(available())}")
    return _BUNDLED[name]


def _path(filename: str) -> Any:
    return resources.files(__name__).joinpath(filename)


def build_fmnist_vit() -> nn.Module:
    """A random-init timm ``VisionTransformer`` with the bundled model's architecture."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**FMNIST_ARCH)


def card(name: str = "fmnist-vit") -> dict[str, Any]:
    """The model card's numbers (recipe, seed, accuracy, training time) stored with the weights."""
    from safetensors import safe_open

    with resources.as_file(_path(_files(name)["weights"])) as path, safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["card"])


def load(name: str = "fmnist-vit") -> nn.Module:
    """The bundled model ``name`` in eval mode, fp32, with ``pretrained_cfg`` (mean, std, labels)."""
    from safetensors.torch import load_file

    files = _files(name)
    model = build_fmnist_vit()
    with resources.as_file(_path(files["weights"])) as path:
        state = load_file(str(path))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    info = card(name)
    model.pretrained_cfg = {
        "tag": "fmnist",
        "input_size": (1, 28, 28),
        "mean": (FMNIST_MEAN,),
        "std": (FMNIST_STD,),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "num_classes": 10,
        "label_names": info["classes"],
    }
    return model.eval()


def reducer_files(name: str, reducer: str) -> list[str]:
    """Paths of the `tmcore.save` files with ``reducer``'s learned state for the bundled model
    ``name`` (e.g. LTMP thresholds fitted to it); empty if none:
    ``tmcore.load(model, path)``."""
    return [str(_path(filename)) for filename in _files(name).get("reducers", {}).get(reducer, [])]


def load_samples(name: str = "fmnist-vit") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [2000, 1, 28, 28] uint8, labels [2000] int64)``: the labelled test images bundled with ``name``."""
    from safetensors.torch import load as load_bytes

    with _path(_files(name)["samples"]).open("rb") as f:
        tensors = load_bytes(gzip.decompress(f.read()))
    return tensors["images"], tensors["labels"].long()


def preprocess(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float, normalised with the model's ``pretrained_cfg`` mean / std."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.0,))).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std", (1.0,))).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std
