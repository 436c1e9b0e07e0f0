"""Where batches come from: pick the DALI or the torch pipeline and yield device batches."""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import numpy as np
import torch

from .errors import InputError
from .sources import Split
from .transforms import Preprocess, eval_transform, eval_transform_list

LOADERS = ("auto", "dali", "torch")


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


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
        yield eval_transform(batch, pre) if isinstance(batch, torch.Tensor) else eval_transform_list(batch, pre)
