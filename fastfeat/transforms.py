"""Batched image transforms in torch, on the batch's device: the recipe's preprocessing, vectorised."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, center-crop `image_size`, normalize: torchvision's
    `Resize(256)`, `CenterCrop(224)`, `ToTensor()`, `Normalize(mean, std)`."""

    resize: int = 256
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 NCHW -> float32 NCHW, scaled to [0, 1] then standardised per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def eval_transform(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 NCHW batch (one size) -> normalized float NCHW (image_size x image_size)."""
    images = TF.resize(images, [pre.resize], antialias=True)
    images = TF.center_crop(images, [pre.image_size, pre.image_size])
    return normalize(images, pre.mean, pre.std)


def eval_transform_list(images: list[torch.Tensor], pre: Preprocess) -> torch.Tensor:
    """Like `eval_transform` for CHW images of possibly different sizes (stacked when they agree)."""
    if all(img.shape == images[0].shape for img in images):
        return eval_transform(torch.stack(images), pre)
    return torch.cat([eval_transform(img[None], pre) for img in images])
