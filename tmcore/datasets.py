"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (IDX files), with no download."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "read_idx", "fashion_mnist"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def read_idx(path: str | Path) -> torch.Tensor:
    """Read a (gzipped) uint8 IDX file: byte 3 is the number of dims, then big-endian uint32 sizes, then data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = bytearray(f.read())
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", bytes(data[4 : 4 + 4 * ndim]))
    return torch.frombuffer(data, dtype=torch.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str = "test", root: str | Path = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 1, 28, 28] uint8, labels [N] int64)`` for ``split`` in ``train`` / ``test``.

    Raises FileNotFoundError naming the Debian package when the files are missing.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    root = Path(root)
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(f"{images_path} not found: apt-get install dataset-fashion-mnist")
    images = read_idx(images_path).unsqueeze(1)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").long()
    return images, labels
