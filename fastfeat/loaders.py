"""Where batches come from: pick the DALI or the torch pipeline and yield device batches."""
from __future__ import annotations

import importlib.util
import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch

from .errors import InputError
from .sources import Split
from .settings import LOADERS
from .transforms import Augment, Preprocess, augment, eval_transform, per_size

PREFETCH_DEPTH = 2  # batches made ahead of the model: enough to cover one slow batch, little memory
T = TypeVar("T")


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
    """Normalized float NCHW batches of `split` (rows in `order`, default split order) on `device`,
    made ahead in a background thread while the model runs."""
    if loader == "dali":
        from . import dali_loader

        return prefetch(dali_loader.eval_batches(split, pre, batch_size, device, order))
    from .torch_loader import uint8_batches

    return prefetch(per_size(batch, lambda images: eval_transform(images, pre))
                    for batch in uint8_batches(split, batch_size, device, order))


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
    reproducible from `seed`; made ahead in a background thread while the model trains, except torch's on
    a CPU: there the training step keeps every core busy and a producer thread only competes with it
    (measured in docs/results.md; DALI's and the cache's batches gain from one)."""
    if loader == "dali":
        from . import dali_loader

        return prefetch(dali_loader.train_batches(split, pre, aug, batch_size, device, order, seed))
    from .torch_loader import uint8_batches

    generator = torch.Generator(device).manual_seed(seed)
    batches = (per_size(batch, lambda images: augment(images, pre, aug, generator))
               for batch in uint8_batches(split, batch_size, device, order))
    return prefetch(batches) if device.type == "cuda" else batches


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def prefetch(items: Iterator[T], depth: int = PREFETCH_DEPTH) -> Iterator[T]:
    """`items`, made up to `depth` ahead by a background thread while the caller works on the current
    one (torch ops and DALI release the GIL, so the two overlap). The producer's error is raised here,
    in order; when the caller stops early the producer stops after the item it is making."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as error:  # handed to the caller, who decides
            put(_Failed(error))

    producer = threading.Thread(target=produce, name="fastfeat-prefetch", daemon=True)
    producer.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        producer.join()
