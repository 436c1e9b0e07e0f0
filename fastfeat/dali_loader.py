"""NVIDIA DALI pipelines: decode and augment on the GPU, or in DALI's CPU mode (the evaluation resize is
torch's PIL-exact one, on DALI's decoded images).

CIFAR arrays enter through `external_source`; folders through the file reader, tar shards through the
webdataset reader (in shard order; a shuffle's members, and shards holding 16-bit PNGs, through
`external_source`), then the image decoder ("mixed" = nvJPEG on a GPU, "cpu" otherwise). The readers read
files with plain I/O: mapped, every file read stays in the process's RSS, which then grows with the dataset
(docs/results.md). On a GPU the output is copied device-to-device into a torch tensor (no host round trip).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("DALI_NVIMGCODEC_LOG_LEVEL", "1")  # the decoder's own log: errors only

import numpy as np  # noqa: E402
import nvidia.dali.math as dmath  # noqa: E402
import torch  # noqa: E402
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali.plugin.pytorch import feed_ndarray  # noqa: E402
from tqdm import tqdm  # noqa: E402

from .distributed import is_main_process
from .errors import FastfeatError, InputError
from .runtime import loader_workers
from .sources import Split, TarMembers
from .sources.webdataset import dali_indexes
from .torch_loader import PNG_BIT_DEPTH, PNG_COLOUR_TYPE, PNG_GREY, find_corrupt_image
from .transforms import Augment, Preprocess, eval_transform, per_size

PREFETCH = 2


def _array_source(images: np.ndarray, order: np.ndarray, batch_size: int) -> Callable[[], Iterator[np.ndarray]]:
    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(order), batch_size):
            yield images[order[start : start + batch_size]]

    return batches


def _member_source(members: TarMembers, order: np.ndarray, batch_size: int,
                   kinds: np.ndarray | None) -> Callable[[], Iterator]:
    """Batches of the members' bytes in `order`, with each one's kind (a (1,) int32, as the file reader's
    labels) when `kinds` is given."""
    def batches() -> Iterator:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            encoded = [np.frombuffer(members.read(row), dtype=np.uint8) for row in rows]
            yield encoded if kinds is None else (encoded, kinds[rows, None])

    return batches


_INDEX_DIR: tempfile.TemporaryDirectory | None = None  # this process's index files of shard subsets


def read_members(members: TarMembers, order: np.ndarray, batch_size: int, kinds: np.ndarray | None):
    """(encoded tar members in `order`, their kinds or None). In shard order (every cache, a rank's or a
    --limit's rows included) DALI's webdataset reader, given each shard's kept index when every sample of it
    is read, else an index of the samples that are; in any other order (a fine-tune's shuffle, which no
    reader follows), or when some member is a 16-bit PNG (`kinds`: no reader carries a per-sample kind),
    their bytes read at their offsets, through `external_source`."""
    global _INDEX_DIR
    if kinds is not None:
        encoded, kind = fn.external_source(source=_member_source(members, order, batch_size, kinds), num_outputs=2,
                                           batch=True, dtype=[types.UINT8, types.INT32])
        return encoded, kind
    if not np.all(np.diff(order) > 0):
        return fn.external_source(source=_member_source(members, order, batch_size, None), batch=True,
                                  dtype=types.UINT8), None
    _INDEX_DIR = _INDEX_DIR or tempfile.TemporaryDirectory(prefix="fastfeat-wds-")
    paths, indexes, exts = dali_indexes(members.take(order), Path(_INDEX_DIR.name))
    return fn.readers.webdataset(paths=paths, index_paths=indexes, ext=[";".join(exts)], case_sensitive_extensions=False,
                                 missing_component_behavior="error", random_shuffle=False, pad_last_batch=True,
                                 dont_use_mmap=True, name="reader"), None


def read_images(split: Split, order: np.ndarray, batch_size: int, gpu: bool):
    """DALI graph input: decoded HWC uint8 images in `order`, on the GPU when `gpu`."""
    if split.images is not None:
        images = fn.external_source(
            source=_array_source(split.images, order, batch_size), batch=True, layout="HWC", dtype=types.UINT8
        )
        return images.gpu() if gpu else images
    kinds = _CHECKED.get(hash(split.files))  # the 16-bit PNGs' kinds; None when there are none
    if split.members is not None:
        encoded, kind = read_members(split.members, order, batch_size, kinds)
    else:
        encoded, kind = fn.readers.file(files=[split.files[i] for i in order], random_shuffle=False, pad_last_batch=True,
                                        labels=None if kinds is None else kinds[order].tolist(), dont_use_mmap=True,
                                        name="reader")
    decoded = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                dtype=types.UINT8 if kinds is None else types.UINT16)
    return decoded if kinds is None else _to_8bit(decoded, kind.gpu() if gpu else kind)


def _to_8bit(wide, kind):
    """16-bit decoded images as PIL's `convert("RGB")` makes them (see `torch_loader.to_8bit`): grey 16-bit
    PNGs clamped at 255, every other image's high byte (DALI widens 8-bit images to v * 257, so that is v)."""
    grey = kind == WIDE_GREY
    return fn.cast(grey * dmath.min(wide, 255) + (1 - grey) * (wide // 256), dtype=types.UINT8)


INTERP_TYPES = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def _centre_offset(extent, crop: int):
    """torchvision's `int(round((extent - crop) / 2))`, with Python's round-half-to-even."""
    d = extent - crop
    q = dmath.floor(d / 2)
    return q + (d - 2 * q) * (q - 2 * dmath.floor(q / 2))


def resize_center_crop(images, pre: Preprocess):
    """The crop-flip augmentation's eval geometry, in DALI's filters: torchvision's `Resize(resize)` (shorter
    side to `resize`, longer `int(resize * long / short)`) and `CenterCrop(image_size)` as
    one resize of only the input region the crop keeps, at the full resize's scale: the same sampling
    positions and antialiasing, without the rows and columns the crop drops."""
    shape = images.shape(dtype=types.FLOAT)
    short = dmath.min(shape[0], shape[1])
    crop = pre.image_size
    starts, ends = [], []
    for extent in (shape[0], shape[1]):
        resized = dmath.floor(pre.resize * extent / short)
        first = _centre_offset(resized, crop)
        starts.append(first * extent / resized)
        ends.append((first + crop) * extent / resized)
    return fn.resize(images, size=(crop, crop), roi_start=fn.stack(*starts), roi_end=fn.stack(*ends),
                     roi_relative=False, interp_type=INTERP_TYPES[pre.interpolation], antialias=True)


@pipeline_def(enable_conditionals=False)
def decoded_pipeline(split: Split, order: np.ndarray, gpu: bool, rows_per_batch: int):
    """The decoded images, for the evaluation preprocessing in torch: DALI's resize filters are not
    Pillow's (nor is its rounding between passes), the weights' `transforms()` are."""
    return read_images(split, order, rows_per_batch, gpu)


def _jitter(images, strength: float):
    """ColorJitter: brightness, contrast and saturation factors in [1 - s, 1 + s] per image."""
    if strength <= 0:
        return images
    jitter = (max(0.0, 1 - strength), 1 + strength)
    return fn.color_twist(images, brightness=fn.random.uniform(range=jitter), contrast=fn.random.uniform(range=jitter),
                          saturation=fn.random.uniform(range=jitter))


def _mirror_normalize(images, pre: Preprocess, **crop):
    """Horizontal flip half the time, `ToTensor()` + `Normalize(mean, std)` as float32 CHW (and `crop`)."""
    return fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), mean=[255 * m for m in pre.mean],
                                    std=[255 * s for s in pre.std], dtype=types.FLOAT, output_layout="CHW", **crop)


def recipe_graph(images, pre: Preprocess, aug: Augment):
    """crop1 -> rotate -> jitter -> crop2 -> flip, normalize."""
    images = fn.random_resized_crop(images, size=(pre.resize, pre.resize), random_area=aug.first_scale)
    images = fn.rotate(images, angle=fn.random.uniform(range=(-aug.degrees, aug.degrees)), keep_size=True, fill_value=0)
    images = fn.random_resized_crop(_jitter(images, aug.jitter), size=(pre.image_size, pre.image_size),
                                    random_area=aug.scale, random_aspect_ratio=aug.ratio)
    return _mirror_normalize(images, pre)


def rrc_flip_graph(images, pre: Preprocess, aug: Augment):
    """RandomResizedCrop(image_size, crop_scale, ratio) -> jitter -> flip, normalize."""
    images = fn.random_resized_crop(images, size=(pre.image_size, pre.image_size), random_area=aug.crop_scale,
                                    random_aspect_ratio=aug.ratio)
    return _mirror_normalize(_jitter(images, aug.jitter), pre)


def _reflect_pad(images, pad: int):
    """HWC images (one size) reflect-padded by `pad` px on every side, from slices, flips and concatenations."""
    if pad == 0:
        return images
    rows = fn.cat(fn.flip(images[1 : pad + 1], horizontal=0, vertical=1), images,
                  fn.flip(images[-pad - 1 : -1], horizontal=0, vertical=1), axis=0)
    return fn.cat(fn.flip(rows[:, 1 : pad + 1], horizontal=1), rows, fn.flip(rows[:, -pad - 1 : -1], horizontal=1), axis=1)


def crop_flip_graph(images, pre: Preprocess, aug: Augment):
    """The eval geometry (resize, center crop), reflect padding, a random crop at whole-pixel offsets,
    jitter, flip, normalize: no resampling after the eval resize."""
    images = resize_center_crop(images, pre)
    pad = aug.pad_pixels(pre.image_size)
    offsets = [k / max(2 * pad, 1) for k in range(2 * pad + 1)]  # crop_pos: anchor = pos * (padded - crop)
    padded = _jitter(_reflect_pad(images, pad), aug.jitter)
    return _mirror_normalize(padded, pre, crop=(pre.image_size, pre.image_size),
                             crop_pos_x=fn.random.uniform(values=offsets), crop_pos_y=fn.random.uniform(values=offsets))


TRAIN_GRAPHS = {"recipe": recipe_graph, "crop-flip": crop_flip_graph, "rrc-flip": rrc_flip_graph}


@pipeline_def(enable_conditionals=False)
def train_pipeline(split: Split, order: np.ndarray, pre: Preprocess, aug: Augment, gpu: bool, rows_per_batch: int):
    """The `aug.preset` augmentation, random per sample (reproducible through the pipeline seed)."""
    return TRAIN_GRAPHS[aug.preset](read_images(split, order, rows_per_batch, gpu), pre, aug)


def dali_device_id(device: torch.device) -> int | None:
    return device.index if device.type == "cuda" else None


def run_pipeline(pipe, split: Split, order: np.ndarray, device: torch.device) -> Iterator[torch.Tensor]:
    """Run `pipe` once per batch over `order`, yielding float NCHW torch tensors on `device` (channels_last
    when the pipeline's output is HWC)."""
    for (images,), rows in pipeline_outputs(pipe, split, order):
        yield to_torch(images, torch.float32, device)[:rows]


def pipeline_outputs(pipe, split: Split, order: np.ndarray) -> Iterator[tuple[tuple, int]]:
    """`pipe`'s outputs for each batch over `order`, with the batch's number of real (not padding) rows."""
    batch_size = pipe.max_batch_size
    for start in range(0, len(order), batch_size):
        try:
            outputs = pipe.run()
        except Exception as exc:
            _stop(pipe)
            raise _pipeline_error(exc, split, order[start : start + (PREFETCH + 1) * batch_size]) from None
        yield outputs, min(batch_size, len(order) - start)


def to_torch(batch, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A dense DALI batch as a torch tensor on `device` (device to device on a GPU); an HWC batch as the
    NCHW view of its NHWC memory (channels_last, as the model takes it)."""
    dense = batch.as_tensor()
    out = torch.empty(dense.shape(), dtype=dtype, device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return out.permute(0, 3, 1, 2) if batch.layout() == "HWC" else out


def decoded_to_torch(batch, rows: int, device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """Decoded HWC uint8 images as one NCHW tensor when they share a size, else a list of CHW tensors."""
    if batch.is_dense_tensor():
        return to_torch(batch, torch.uint8, device)[:rows]
    host = batch.as_cpu() if hasattr(batch, "device_id") else batch
    return [torch.from_numpy(np.array(host.at(i))).permute(2, 0, 1).to(device) for i in range(rows)]


def _stop(pipe) -> None:
    """Join DALI's threads (so their log lines are out before our error line) with the hook DALI
    itself runs at exit; a DALI without it just leaves them to finish on their own."""
    shutdown = getattr(pipe, "_shutdown", None)
    if shutdown is not None:
        shutdown()


def _pipeline_error(exc: Exception, split: Split, rows: np.ndarray) -> FastfeatError:
    if split.files is not None:
        bad = find_corrupt_image(split, rows)
        if bad is not None:
            return InputError(f"corrupt image: {bad}")
    return FastfeatError(f"DALI pipeline failed: {str(exc).strip().splitlines()[0]}")


# hashes of the file lists whose headers parsed (each list is checked once), with their `wide_png_kinds`
_CHECKED: dict[int, np.ndarray | None] = {}
WIDE_COLOUR, WIDE_GREY = 1, 2  # an image's kind for the decoder; 0: 8-bit, or not a PNG
# every PNG's first 16 bytes (its signature, its IHDR chunk's length and type), and its bytes up to IHDR's colour type
PNG_START = np.frombuffer(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", dtype=np.uint8)
PNG_HEAD = PNG_COLOUR_TYPE + 1


def image_heads(split: Split) -> np.ndarray:
    """(N, PNG_HEAD) uint8: each image's first bytes, from its tar member (all at once), or from its file
    when a .png (the only files opened; zeros for the others)."""
    if split.members is not None:
        return split.members.heads(PNG_HEAD)
    heads = np.zeros((len(split.files), PNG_HEAD), np.uint8)
    for i, path in enumerate(split.files):
        if path.lower().endswith(".png"):
            with open(path, "rb") as f:
                head = f.read(PNG_HEAD)
            heads[i, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    return heads


def wide_png_kinds(heads: np.ndarray) -> np.ndarray | None:
    """Per image (its `image_heads`), whether it is a 16-bit PNG, in colour or grey; None when none is, the
    common case, decoded straight to uint8. DALI decodes 16-bit PNGs to uint8 rounding v / 257, not as PIL."""
    wide = (heads[:, : len(PNG_START)] == PNG_START).all(axis=1) & (heads[:, PNG_BIT_DEPTH] == 16)
    kinds = np.where(heads[:, PNG_COLOUR_TYPE] == PNG_GREY, WIDE_GREY, WIDE_COLOUR) * wide
    return kinds.astype(np.int32) if wide.any() else None


def check_headers(split: Split) -> None:
    """Refuse images whose header does not parse: DALI's CPU decoder can crash the process
    (not raise) on some broken files, so they must not reach it; note the 16-bit PNGs."""
    key = hash(split.files)
    if key in _CHECKED:
        return
    # A bar only when the check is slow (a large folder on slow storage), on rank 0 and a terminal.
    with tqdm(range(len(split)), desc="check image headers", unit="file", delay=2, leave=False,
              disable=None if is_main_process() else True) as shown:
        bad = find_corrupt_image(split, shown, full_decode=False)
    if bad is not None:
        raise InputError(f"corrupt image: {bad}")
    _CHECKED[key] = wide_png_kinds(image_heads(split))


def _build(pipeline, split: Split, order: np.ndarray, batch_size: int, device: torch.device, *args, seed: int | None = None):
    if split.files is not None:
        check_headers(split)
    pipe = pipeline(
        split, order, *args, device.type == "cuda", batch_size,
        batch_size=batch_size, num_threads=loader_workers(), seed=seed,
        device_id=dali_device_id(device), prefetch_queue_depth=PREFETCH,
    )
    pipe.build()
    return pipe


def center_and_decoded_batches(
    split: Split, pre: Preprocess, batch_size: int, device: torch.device, order: np.ndarray | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]]:
    """Decoded in DALI: the center crops (torch's PIL-exact `eval_transform`, one call per image size) and
    the decoded uint8 images they came from (NCHW, or a list of CHW for several sizes), on `device`."""
    order = np.arange(len(split)) if order is None else order
    pipe = _build(decoded_pipeline, split, order, batch_size, device)
    for (decoded,), rows in pipeline_outputs(pipe, split, order):
        images = decoded_to_torch(decoded, rows, device)
        yield per_size(images, lambda batch: eval_transform(batch, pre)), images


def eval_batches(
    split: Split, pre: Preprocess, batch_size: int, device: torch.device, order: np.ndarray | None = None
) -> Iterator[torch.Tensor]:
    for center, _ in center_and_decoded_batches(split, pre, batch_size, device, order):
        yield center


def train_batches(
    split: Split, pre: Preprocess, aug: Augment, batch_size: int, device: torch.device, order: np.ndarray, seed: int
) -> Iterator[torch.Tensor]:
    pipe = _build(train_pipeline, split, order, batch_size, device, pre, aug, seed=seed)
    yield from run_pipeline(pipe, split, order, device)
