"""Batched image transforms in torch, on the batch's device: the recipe's preprocessing, vectorised."""
from __future__ import annotations

import functools
import math

import torch

from .settings import Augment
from .spec import Preprocess


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], white: float = 1.0,
              channels: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float pixels in [0, `white`] -> standardised per channel, in one pass: x / (white std) - mean / std.
    The channels are dimension `channels` (1: NCHW; -1: NHWC); `out` receives the result (float32 from
    float64 pixels, say)."""
    shape = [1] * images.dim()
    shape[channels] = -1
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(shape)
    shift = -torch.tensor(mean, dtype=images.dtype, device=images.device).view(shape) * (1 / std_t)
    return torch.addcmul(shift, images, 1 / (white * std_t), out=out)


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's `Resize(size)`: the shorter side to `size`, the longer `int(size * long / short)`."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def crop_start(extent: int, crop: int) -> int:
    """torchvision's center-crop offset."""
    return int(round((extent - crop) / 2))


PIL_BITS = 22  # Pillow's fixed-point precision for 8-bit images (PRECISION_BITS in libImaging/Resample.c)


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x).clamp(min=0.0)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic with a = -0.5 (Pillow's; torch's plain bicubic uses -0.75), evaluated as Pillow does."""
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, 0.0))


PIL_FILTERS = {"bilinear": (1.0, _bilinear), "bicubic": (2.0, _bicubic)}  # support, filter of |x|


def pil_axis_weights(size: int, resized: int, start: int, crop: int, interpolation: str) -> tuple[int, torch.Tensor]:
    """Pillow's resize coefficients of one axis from `size` to `resized`, for output pixels `start` to
    `start + crop` only: (first input pixel they read, (crop, span) float64 integer weights in Pillow's
    fixed point). Each output pixel's filter is widened by the downscale factor, its taps normalised to
    sum 1, then rounded half away from zero to `PIL_BITS` bits, in Pillow's order of float operations."""
    support, kernel = PIL_FILTERS[interpolation]
    scale = size / resized
    filterscale = max(scale, 1.0)
    support *= filterscale
    taps = math.ceil(support) * 2 + 1
    center = (torch.arange(start, start + crop, dtype=torch.float64) + 0.5) * scale
    low = torch.trunc(center - support + 0.5).clamp(min=0)
    high = torch.trunc(center + support + 0.5).clamp(max=size)
    index = low[:, None] + torch.arange(taps, dtype=torch.float64)
    used = index < high[:, None]
    weights = torch.where(used, kernel(((index - center[:, None]) + 0.5).abs() * (1.0 / filterscale)), 0.0)
    total = torch.zeros(crop, dtype=torch.float64)
    for tap in range(taps):  # summed tap by tap, as Pillow does (a tree sum can differ in the last bit)
        total += weights[:, tap]
    weights = weights / torch.where(total == 0, 1.0, total)[:, None]
    fixed = torch.trunc(weights * (1 << PIL_BITS) + torch.where(weights < 0, -0.5, 0.5))
    first = int(low.min())
    span = int(torch.where(used, index, 0).max()) + 1 - first
    dense = torch.zeros(crop, span + taps, dtype=torch.float64)
    dense.scatter_add_(1, (index - first).long(), torch.where(used, fixed, 0.0))
    return first, dense[:, :span]


@functools.lru_cache(maxsize=64)
def _resize_plan(height: int, width: int, pre: Preprocess, device: torch.device) -> tuple:
    """`resize_center_crop`'s input window and weights: (rows, row weights (crop, R), cols, column
    weights (C, crop)) for the rows and columns the kept crop reads, in grey levels per level, and
    whether a weight is negative (only then can a sum leave 0..255)."""
    out_h, out_w = resized_size(height, width, pre.resize)
    crop = pre.image_size
    row0, rows = pil_axis_weights(height, out_h, crop_start(out_h, crop), crop, pre.interpolation)
    col0, cols = pil_axis_weights(width, out_w, crop_start(out_w, crop), crop, pre.interpolation)
    unit = 1.0 / (1 << PIL_BITS)  # a power of 2: the scaled weights stay exact
    return (slice(row0, row0 + rows.shape[1]), (rows * unit).to(device), slice(col0, col0 + cols.shape[1]),
            (cols.T * unit).contiguous().to(device), bool((rows < 0).any() or (cols < 0).any()))


def _round_pass(sums: torch.Tensor, overshoots: bool) -> torch.Tensor:
    """Pillow's end of a pass: the sums (in grey levels; exact, the weights being integers over a power
    of 2) rounded half up to whole levels and, where they `overshoot`, clipped to 0..255, in place."""
    sums.add_(0.5).floor_()
    return sums.clamp_(0, 255) if overshoots else sums


def _resized_levels(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 NCHW (one size) -> Pillow's resized and center-cropped grey levels, float64 (N, crop, crop, C).
    Pillow's two passes (horizontal, then vertical, each rounded to whole levels) as two small float64
    matmuls (exact on these integers) with its coefficients for the kept crop's rows and columns only."""
    n, channels, _, _ = images.shape
    rows, row_weights, cols, col_weights, overshoots = _resize_plan(*images.shape[-2:], pre, images.device)
    crop = pre.image_size
    across = _round_pass(images[:, :, rows, cols].double() @ col_weights, overshoots)  # (N, C, R, crop)
    across = across.permute(0, 2, 3, 1).reshape(n, -1, crop * channels)  # channels innermost
    return _round_pass(row_weights @ across, overshoots).view(n, crop, crop, channels)


def resize_center_crop(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 NCHW (one size) -> uint8 NCHW (image_size x image_size): torchvision's `Resize(resize)` +
    `CenterCrop(image_size)` on PIL images, pixel for pixel, channels_last (as the model takes it)."""
    return _resized_levels(images, pre).to(torch.uint8).permute(0, 3, 1, 2)


CPU_CHUNK_BYTES = 8 << 20  # a CPU transforms this much float64 at a time: its passes then stay in cache


def eval_transform(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 NCHW batch (one size) -> normalized float NCHW (image_size x image_size, channels_last):
    the weights' `transforms()` (Resize, CenterCrop, ToTensor, Normalize) as on PIL images. On a CPU a
    few images at a time, each chunk's levels scaled straight into the float32 result."""
    n, channels, _, _ = images.shape
    crop = pre.image_size
    out = torch.empty(n, crop, crop, channels, device=images.device)
    chunk = n if images.device.type != "cpu" else max(1, CPU_CHUNK_BYTES // (crop * crop * channels * 8))
    for start in range(0, n, chunk):
        normalize(_resized_levels(images[start:start + chunk], pre), pre.mean, pre.std, white=255, channels=-1,
                  out=out[start:start + chunk])
    return out.permute(0, 3, 1, 2)


def per_size(images: torch.Tensor | list[torch.Tensor], transform) -> torch.Tensor:
    """Apply a batched `transform` to a uint8 NCHW batch, or to a list of CHW images of possibly
    different sizes: one call per size (the images of a size stacked), results back in list order."""
    if isinstance(images, torch.Tensor):
        return transform(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    if len(groups) == 1:
        return transform(torch.stack(images))
    results = torch.cat([transform(torch.stack([images[i] for i in rows])) for rows in groups.values()])
    grouped = torch.tensor([i for rows in groups.values() for i in rows], device=results.device)
    return results[torch.argsort(grouped)]


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device) * (high - low) + low


def random_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator, tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes (cx, cy, w, h) as fractions of a unit square, batched: torchvision's
    rejection sampling (first of `tries` draws that fits, else the central crop)."""
    area = _uniform(n * tries, *scale, g).view(n, tries)
    log_r = _uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), g)
    aspect = torch.exp(log_r).view(n, tries)
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w <= 1) & (h <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), 0)
    rows = torch.arange(n, device=g.device)
    w = torch.where(fits.any(1), w[rows, first], 1.0)
    h = torch.where(fits.any(1), h[rows, first], 1.0)
    cx = w / 2 + torch.rand(n, generator=g, device=g.device) * (1 - w)
    cy = h / 2 + torch.rand(n, generator=g, device=g.device) * (1 - h)
    return torch.stack([cx, cy, w, h], dim=1)


def _box_affine(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset that map a box's normalized [-1, 1] coordinates into its parent's."""
    return boxes[:, 2:], boxes[:, :2] * 2 - 1


def augment(images: torch.Tensor, pre: Preprocess, aug: Augment, g: torch.Generator) -> torch.Tensor:
    """uint8 NCHW (one size) -> augmented (`aug.preset`), normalized float NCHW, the whole batch at once."""
    out = PRESETS[aug.preset](images, pre, aug, g)
    return normalize(color_jitter(out, aug.jitter, g), pre.mean, pre.std)


def _flips(n: int, g: torch.Generator) -> torch.Tensor:
    """True for the images to mirror: each with probability 1/2."""
    return torch.rand(n, generator=g, device=g.device) < 0.5


def recipe_geometry(images: torch.Tensor, pre: Preprocess, aug: Augment, g: torch.Generator) -> torch.Tensor:
    """The recipe's chain crop1 -> rotate -> crop2 -> flip, composed into one sampling grid per image and
    sampled in one `grid_sample`; points that the rotation brings in from outside crop1's frame are black,
    as in torchvision. [0, 1] floats."""
    n, size = images.shape[0], pre.image_size
    first = random_boxes(n, aug.first_scale, (3 / 4, 4 / 3), g)
    second = random_boxes(n, aug.scale, aug.ratio, g)
    angle = torch.deg2rad(_uniform(n, -aug.degrees, aug.degrees, g))
    flip = torch.where(_flips(n, g), -1.0, 1.0)
    scale2, shift2 = _box_affine(second)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output (u, v) -> frame after rotation: b = shift2 + scale2 * (flip * u, v) -> before rotation: a = R b
    theta = torch.stack([
        torch.stack([cos * scale2[:, 0] * flip, -sin * scale2[:, 1], cos * shift2[:, 0] - sin * shift2[:, 1]], 1),
        torch.stack([sin * scale2[:, 0] * flip, cos * scale2[:, 1], sin * shift2[:, 0] + cos * shift2[:, 1]], 1),
    ], 1)
    a = torch.nn.functional.affine_grid(theta, [n, 3, size, size], align_corners=False)
    inside = (a.abs() <= 1).all(dim=-1, keepdim=True).permute(0, 3, 1, 2)
    scale1, shift1 = _box_affine(first)
    grid = a * scale1[:, None, None, :] + shift1[:, None, None, :]
    out = torch.nn.functional.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out * inside


def rrc_flip(images: torch.Tensor, pre: Preprocess, aug: Augment, g: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(image_size, crop_scale, ratio) + horizontal flip, in one bilinear `grid_sample`."""
    n, size = images.shape[0], pre.image_size
    boxes = random_boxes(n, aug.crop_scale, aug.ratio, g)
    scale, shift = _box_affine(boxes)
    flip = torch.where(_flips(n, g), -1.0, 1.0)
    zero = torch.zeros_like(flip)
    theta = torch.stack([torch.stack([scale[:, 0] * flip, zero, shift[:, 0]], 1),
                         torch.stack([zero, scale[:, 1], shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)


def reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of a reflect-padded axis (-1 -> 1, size -> size - 2) mapped back into 0..size-1."""
    return (size - 1) - ((size - 1) - index.abs()).abs()


def crop_flip(images: torch.Tensor, pre: Preprocess, aug: Augment, g: torch.Generator) -> torch.Tensor:
    """The eval geometry, then a random image_size crop of its reflect padding + horizontal flip, as ONE
    gather of precomputed pixel indices (padding, crop and flip folded in): no resampling. [0, 1] floats."""
    fitted = resize_center_crop(images, pre)
    n, c, size, _ = fitted.shape
    pad = aug.pad_pixels(size)
    dy, dx = (torch.randint(0, 2 * pad + 1, (n, 1), generator=g, device=g.device) - pad for _ in range(2))
    steps = torch.arange(size, device=images.device)
    cols = torch.where(_flips(n, g)[:, None], size - 1 - steps, steps)  # the flip reverses the crop's columns
    ys, xs = reflect(dy + steps, size), reflect(dx + cols, size)
    index = (ys[:, :, None] * size + xs[:, None, :]).view(n, 1, size * size).expand(n, c, size * size)
    return fitted.flatten(2).gather(2, index).view(n, c, size, size).float() / 255


PRESETS = {"recipe": recipe_geometry, "crop-flip": crop_flip, "rrc-flip": rrc_flip}


def color_jitter(images: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation factors in [1 - s, 1 + s] per image ([0, 1] floats)."""
    if strength <= 0:
        return images
    n = images.shape[0]
    factor = lambda: _uniform(n, max(0.0, 1 - strength), 1 + strength, g).view(n, 1, 1, 1)
    gray_weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    images = (images * factor()).clamp(0, 1)
    mean = (images * gray_weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    images = ((images - mean) * factor() + mean).clamp(0, 1)
    gray = (images * gray_weights).sum(1, keepdim=True)
    return ((images - gray) * factor() + gray).clamp(0, 1)
