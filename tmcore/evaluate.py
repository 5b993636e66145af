"""Top-1 evaluation over a labelled image folder or the bundled images, on one process or many
(``torchrun --nproc-per-node N``: each rank takes every N-th sample, counts are summed)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sized
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from tmcore.errors import TmcoreError

__all__ = ["ShardSampler", "image_transform", "image_folder", "bundled_dataset", "top1", "init_distributed"]


class ShardSampler(Sampler[int]):
    """``DistributedSampler`` for evaluation without its padding: rank ``r`` of ``w`` takes
    indices ``r, r + w, ...``, so every sample is counted exactly once and sums are exact."""

    def __init__(self, data: Sized, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world = len(data), rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class _ImageTransform:
    """PIL image -> normalised tensor the way timm evaluates: resize the short side to
    ``size / crop_pct``, centre-crop ``size``, convert to the model's channel count."""

    def __init__(self, model: nn.Module) -> None:
        from torchvision import transforms as T

        cfg = getattr(model, "pretrained_cfg", None) or {}
        h, w = model.patch_embed.img_size
        chans = model.patch_embed.proj.in_channels
        self.mode = "L" if chans == 1 else "RGB"
        mean = cfg.get("mean", (0.485, 0.456, 0.406)[:chans] if chans == 3 else (0.5,))
        std = cfg.get("std", (0.229, 0.224, 0.225)[:chans] if chans == 3 else (0.5,))
        crop_pct = cfg.get("crop_pct", 0.875)
        self.crop = T.Compose(
            [
                T.Resize(int(round(min(h, w) / crop_pct)), interpolation=T.InterpolationMode.BILINEAR),
                T.CenterCrop((h, w)),
                T.ToTensor(),
            ]
        )
        """PIL image -> ``[C, H, W]`` in ``[0, 1]``: the pixels the model sees, before normalisation."""
        self.normalize = T.Normalize(mean, std)

    def __call__(self, image: Any) -> torch.Tensor:
        return self.normalize(self.crop(image.convert(self.mode)))


def image_transform(model: nn.Module) -> _ImageTransform:
    """The evaluation transform for ``model``; ``.crop`` gives the un-normalised pixels."""
    return _ImageTransform(model)


def image_folder(root: str | Path, model: nn.Module) -> Dataset:
    """A torchvision ``ImageFolder`` (``root/<class>/<image>``) transformed for ``model``."""
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise TmcoreError(f"--data {str(root)!r}: not a directory (expected an ImageFolder: DIR/<class>/<image>)")
    return ImageFolder(str(root), transform=image_transform(model), loader=_read_rgb)


def read_image(path: str, what: str = "--data") -> Any:
    """The decoded PIL image at ``path``; a file PIL cannot read is one `TmcoreError` naming
    ``what`` (the option or argument it came from) and the file. A 16-bit greyscale image comes
    back scaled to 8 bits (mode ``L``): PIL's own conversion clips it, turning nearly every pixel
    white. An image whose range of values is unknown (32-bit float, 32-bit integers beyond 16 bits)
    is refused rather than guessed at."""
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
    except (OSError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError, a truncated file
        raise TmcoreError(f"{what}: {path!r} is not a readable image ({exc})") from None
    return _to_8_bit(image, path, what)


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_8_bit(image: Any, path: str, what: str) -> Any:
    """``image`` with 8-bit bands: as it is when they already are, a 16-bit greyscale image
    scaled (0..65535 -> 0..255), or a `TmcoreError`."""
    import numpy as np
    from PIL import Image, ImageMode

    mode = image.mode
    allowed = "allowed: an 8-bit image (greyscale, RGB, palette...) or a 16-bit greyscale one"
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image).astype(np.int64)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:  # mode I is 32-bit: only values that fit 16 bits have a known range
            raise TmcoreError(
                f"{what}: {path!r} has mode {mode!r} with values {low}..{high}, beyond 16 bits; {allowed}"
            )
        return Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8))
    try:
        known = ImageMode.getmode(mode).typestr[-2:] in ("u1", "b1")  # 8-bit bands, or 1-bit
    except KeyError:  # a mode PIL decodes but does not describe
        known = False
    if not known:
        raise TmcoreError(f"{what}: {path!r} has mode {mode!r}, whose range of values is unknown; {allowed}")
    return image


def _read_rgb(path: str) -> Any:
    """`read_image` as torchvision's ``default_loader`` gives it: converted to RGB."""
    return read_image(path).convert("RGB")


def bundled_dataset(model: nn.Module, name: str = "fmnist-vit") -> Dataset:
    from tmcore.models import load_samples, preprocess

    images, labels = load_samples(name)
    return TensorDataset(preprocess(images, model), labels)


def init_distributed(device: str) -> tuple[int, int, str]:
    """Join the process group when run under torchrun; returns ``(rank, world_size, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def top1(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float | int]:
    """Top-1 accuracy of ``model`` on ``data``; across all ranks when a process group is up."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    loader = DataLoader(data, batch_size=batch_size, sampler=ShardSampler(data, rank, world), num_workers=workers)
    counts = torch.zeros(2, dtype=torch.long, device=device)
    done = 0
    model.eval()
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            counts[0] += (model(x).argmax(-1) == y).sum()
            counts[1] += y.numel()
            done += 1
            if progress:
                progress(done, len(loader))
    if distributed:
        dist.all_reduce(counts)
    correct, total = counts.tolist()
    return {"top1": correct / max(total, 1), "correct": correct, "total": total}
