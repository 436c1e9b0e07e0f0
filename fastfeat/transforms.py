"""Batched image transforms in torch, on the batch's device: the recipe's preprocessing, vectorised."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from .settings import AUGMENT_PRESETS, Augment  # noqa: F401 (AUGMENT_PRESETS re-exported, as are the spec names)
from .spec import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocess  # noqa: F401

OVERSHOOTS = {"bilinear": False, "bicubic": True}  # whether the filter has negative lobes


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Float NCHW pixels in [0, 1] -> standardised per channel, in one pass: x / std - mean / std."""
    scale = 1 / torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return torch.addcmul(-torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * scale, images, scale)


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's `Resize(size)`: the shorter side to `size`, the longer `int(size * long / short)`."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def crop_start(extent: int, crop: int) -> int:
    """torchvision's center-crop offset."""
    return int(round((extent - crop) / 2))


def axis_weights(size: int, resized: int, start: int, crop: int, interpolation: str) -> torch.Tensor:
    """(crop, size) float64: row i holds the weights torch's antialiased resize of one axis from `size`
    to `resized` gives output pixel `start + i`, read off by resizing the identity matrix's rows (its
    columns keep their size, an identity map), so they are torch's own, exactly."""
    eye = torch.eye(size, dtype=torch.float64).view(1, 1, size, size)
    weights = F.interpolate(eye, size=(resized, size), mode=interpolation, antialias=True, align_corners=False)
    return weights[0, 0, start : start + crop]


@functools.lru_cache(maxsize=64)
def _fused_plan(height: int, width: int, pre: Preprocess, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Row weights (crop, H), column weights (W, crop), per-channel shift and scale of `resize_crop_normalize`."""
    out_h, out_w = resized_size(height, width, pre.resize)
    crop = pre.image_size
    rows = axis_weights(height, out_h, crop_start(out_h, crop), crop, pre.interpolation)
    cols = axis_weights(width, out_w, crop_start(out_w, crop), crop, pre.interpolation).T
    shift = 255 * torch.tensor(pre.mean, dtype=torch.float64).view(1, 3, 1, 1)
    scale = 1 / (255 * torch.tensor(pre.std, dtype=torch.float64)).view(1, 3, 1, 1)
    return tuple(t.to(device, torch.float32).contiguous() for t in (rows, cols, shift, scale))


def resize_crop_normalize(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 NCHW (one size) -> `eval_transform`'s output in one pass over it: two small matmuls with
    the crop's rows and columns of the resize weights only (columns first, as torch's resize). Every
    weight row sums to 1, so the mean is subtracted on the small input and the 1/std scale applied
    between the matmuls. The result is channels_last (what the model takes). Bicubic overshoots the
    pixel range: each pass is clamped to it, as torchvision's uint8 resize does."""
    n, _, height, width = images.shape
    rows, cols, shift, scale = _fused_plan(height, width, pre, images.device)
    low, high = -shift * scale, (255 - shift) * scale
    clamp = OVERSHOOTS[pre.interpolation]
    crop = pre.image_size
    columns = (images.float() - shift) @ cols * scale  # (N, 3, H, crop): small
    if clamp:
        columns.clamp_(low, high)
    columns = columns.permute(0, 2, 3, 1).reshape(n, height, crop * 3)  # channels innermost
    out = (rows @ columns).view(n, crop, crop, 3).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
    return out.clamp_(low, high) if clamp else out


def eval_transform(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 NCHW batch (one size) -> normalized float NCHW (image_size x image_size), torchvision's
    Resize + CenterCrop + Normalize. Inputs no larger than the resized image (CIFAR's 32 px) take the
    fused matmul pass; larger ones torch's separable resize, which reads only the taps it needs."""
    if images.shape[-2] * images.shape[-1] <= pre.resize**2:
        return resize_crop_normalize(images, pre)
    return normalize(resize_center_crop(images, pre).float() / 255.0, pre.mean, pre.std)


def resize_center_crop(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """The eval geometry on uint8 NCHW: torchvision's Resize(resize) (antialiased) + CenterCrop(image_size)."""
    images = TF.resize(images, [pre.resize], interpolation=TF.InterpolationMode(pre.interpolation), antialias=True)
    return TF.center_crop(images, [pre.image_size, pre.image_size])


def per_size(images: torch.Tensor | list[torch.Tensor], transform) -> torch.Tensor:
    """Apply a batched `transform` to a uint8 NCHW batch, or to a list of CHW images of possibly
    different sizes (stacked when they agree, one by one otherwise)."""
    if isinstance(images, torch.Tensor):
        return transform(images)
    if all(img.shape == images[0].shape for img in images):
        return transform(torch.stack(images))
    return torch.cat([transform(img[None]) for img in images])


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
