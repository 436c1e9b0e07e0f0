"""The pure-torch pipeline: uint8 batches moved to the device, transformed there in one go.

Arrays are sliced into batches; folders (and tar shards, one positioned read per member) are read and
decoded by DataLoader workers with torchvision.io, or PIL for the formats it lacks (the only per-image work:
decoding is per image by nature).
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from .errors import InputError
from .runtime import loader_workers
from .sources import Split, TarMembers


# formats torchvision.io does not decode (GTSRB's .ppm): PIL decodes them, as DALI's decoder does
PIL_SUFFIXES = (".ppm", ".pgm", ".pbm", ".bmp")


PNG_BIT_DEPTH, PNG_COLOUR_TYPE, PNG_GREY = 24, 25, 0  # IHDR's bytes in a PNG file, and grey's colour type (no alpha)


def to_8bit(image: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
    """`image` (decoded from `encoded`) as PIL's `convert("RGB")` makes it: torchvision decodes 16-bit PNGs
    to uint16, where PIL clamps grey at 255 (its "I;16" to "RGB" conversion) and keeps colour's high byte."""
    if image.dtype == torch.uint8:
        return image
    wide = image.to(torch.int32)  # torch has no arithmetic on uint16
    grey = encoded[PNG_COLOUR_TYPE].item() == PNG_GREY
    return (wide.clamp_(max=255) if grey else wide >> 8).to(torch.uint8)


def decode_bytes(encoded: torch.Tensor) -> torch.Tensor:
    return to_8bit(decode_image(encoded, mode=ImageReadMode.RGB), encoded)


def decode_file(path: str) -> torch.Tensor | None:
    """CHW uint8 RGB image, or None when the file is not a readable image."""
    try:
        if path.lower().endswith(PIL_SUFFIXES):
            from PIL import Image

            with Image.open(path) as image:
                return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        return decode_bytes(read_file(path))
    except (RuntimeError, OSError, ValueError):
        return None


def decode_member(members: TarMembers, row: int) -> torch.Tensor | None:
    """Like `decode_file`, for a tar shard's member (read at its offset)."""
    try:
        return decode_bytes(torch.frombuffer(bytearray(members.read(row)), dtype=torch.uint8))
    except (RuntimeError, ValueError):
        return None


def find_corrupt_image(split: Split, rows: Iterable[int], full_decode: bool = True) -> str | None:
    """The name of the first of `rows` whose image (a file, or a tar shard's member) PIL cannot read: fully
    decoded, or only its header parsed (fast). PIL rather than torchvision.io, whose libjpeg clashes with
    DALI's inside one process."""
    from PIL import Image

    for row in rows:
        source = split.files[row] if split.members is None else io.BytesIO(split.members.read(row))
        try:
            with Image.open(source) as image:
                if full_decode:
                    image.load()
        except InputError:  # a shard shorter than its index: its own line
            raise
        except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            return split.files[row]
    return None


class _DecodedFiles(Dataset):
    """A split's images decoded from their files, or from their members of tar shards."""

    def __init__(self, split: Split):
        self.files, self.members = split.files, split.members

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str]:
        image = decode_file(self.files[index]) if self.members is None else decode_member(self.members, index)
        return image, self.files[index]


def uint8_batches(
    split: Split, batch_size: int, device: torch.device, order: np.ndarray | None = None
) -> Iterator[list[torch.Tensor] | torch.Tensor]:
    """Batches of raw images on `device`: one uint8 NCHW tensor for arrays, a list of CHW for files.

    `order` (row indices) defaults to the split's own order.
    """
    count = len(split) if order is None else len(order)
    if split.images is not None:
        for start in range(0, count, batch_size):
            rows = slice(start, start + batch_size) if order is None else order[start : start + batch_size]
            batch = torch.from_numpy(split.images[rows])
            if device.type == "cuda":
                batch = batch.pin_memory()
            yield batch.to(device, non_blocking=True).permute(0, 3, 1, 2)
        return
    rows = split if order is None else split.take(order)
    loader = DataLoader(_DecodedFiles(rows), batch_size=batch_size, num_workers=loader_workers(), collate_fn=list)
    for batch in loader:
        bad = next((path for img, path in batch if img is None), None)
        if bad is not None:
            raise InputError(f"corrupt image: {bad}")
        yield [img.to(device, non_blocking=True) for img, _ in batch]
