"""Where batches come from: pick the DALI or the torch pipeline and yield device batches."""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import numpy as np
import torch

from .errors import InputError
from .sources import Split
from .transforms import Augment, Preprocess, augment, eval_transform, per_size

LOADERS = ("auto", "dali", "torch")


def dali_available() -> bool:
    """Whether nvidia-dali is installed, without importing it. `find_spec("nvidia.dali")` imports the
    parent `nvidia` package, so it raises where none exists (CPU-only torch wheels, macOS)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:  # ModuleNotFoundError: no `nvidia` package at all
        return False


def resolve_loader(name: str = "auto") -> str:
    """`auto` = dali when importable, else torch."""
    if name not in LOADERS:
        raise InputError(f"unknown loader {name!r}: choose auto, dali or torch")
    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise InputError("--loader dali: nvidia-dali is not installed (pip install 'fastfeat[dali]', or --loader torch)")
    return name


def eval_batches(
    split: Split, loader: str, pre: Preprocess, batch_size: int, device: torch.device, order: np.ndarray | None = None
) -> Iterator[torch.Tensor]:
    """Normalized float NCHW batches of `split` (rows in `order`, default split order) on `device`."""
    if loader == "dali":
        from . import dali_loader

        yield from dali_loader.eval_batches(split, pre, batch_size, device, order)
        return
    from .torch_loader import uint8_batches

    for batch in uint8_batches(split, batch_size, device, order):
        yield per_size(batch, lambda images: eval_transform(images, pre))


def center_and_decoded_batches(
    split: Split, loader: str, pre: Preprocess, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]]:
    """Like `eval_batches` (the same center crops), each batch with its decoded uint8 images (NCHW, or a
    list of CHW for images of several sizes) on `device`, for views made from the same decode."""
    if loader == "dali":
        from . import dali_loader

        yield from dali_loader.center_and_decoded_batches(split, pre, batch_size, device)
        return
    from .torch_loader import uint8_batches

    for batch in uint8_batches(split, batch_size, device):
        yield per_size(batch, lambda images: eval_transform(images, pre)), batch


def train_batches(
    split: Split, loader: str, pre: Preprocess, aug: Augment, batch_size: int, device: torch.device,
    order: np.ndarray, seed: int,
) -> Iterator[torch.Tensor]:
    """Augmented, normalized float NCHW batches of the rows `order` on `device`; random per sample,
    reproducible from `seed`."""
    if loader == "dali":
        from . import dali_loader

        yield from dali_loader.train_batches(split, pre, aug, batch_size, device, order, seed)
        return
    from .torch_loader import uint8_batches

    generator = torch.Generator(device).manual_seed(seed)
    for batch in uint8_batches(split, batch_size, device, order):
        yield per_size(batch, lambda images: augment(images, pre, aug, generator))
