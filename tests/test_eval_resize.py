"""The fused resize + crop + normalize against torchvision's own resize and center crop."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from fastfeat.loaders import dali_available
from fastfeat.sources import Split
from fastfeat.transforms import Preprocess, eval_transform, normalize, resize_crop_normalize

# (height, width, resize, crop): CIFAR up to 224, mild and strong upsampling, downsampling, equal size, non-square
SIZES = [(32, 32, 256, 224), (32, 32, 36, 32), (40, 50, 64, 56), (37, 29, 32, 24), (64, 48, 40, 32),
         (120, 90, 40, 36), (31, 33, 31, 31)]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("height, width, resize, crop", SIZES)
def test_fused_resize_matches_torchvision(interpolation, height, width, resize, crop):
    """torchvision's uint8 resize rounds (and clamps) between its two passes, the fused one does not:
    at most one grey level apart, and closer than a third of one on average."""
    pre = Preprocess(resize=resize, image_size=crop, interpolation=interpolation)
    images = torch.randint(0, 256, (3, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    resized = TF.resize(images, [resize], interpolation=TF.InterpolationMode(interpolation), antialias=True)
    reference = normalize(TF.center_crop(resized, [crop, crop]).float() / 255, pre.mean, pre.std)
    for got in (resize_crop_normalize(images, pre), eval_transform(images, pre)):
        assert got.shape == reference.shape == (3, 3, crop, crop)
        levels = (got - reference).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255
        assert levels.max() <= 1.1 and levels.mean() < 0.35, (levels.max(), levels.mean())


def test_large_inputs_take_torchvision_resize():
    pre = Preprocess(resize=32, image_size=28)
    images = torch.randint(0, 256, (2, 3, 80, 60), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    reference = TF.center_crop(TF.resize(images, [32], antialias=True), [28, 28]).float() / 255
    torch.testing.assert_close(eval_transform(images, pre), normalize(reference, pre.mean, pre.std))


@pytest.mark.parametrize("height, width, resize, crop", [(32, 32, 256, 224), (40, 50, 64, 56), (300, 411, 64, 56)])
def test_dali_resizes_only_the_crop_like_torchvision(height, width, resize, crop):
    """DALI's one resize of the region the crop keeps: torchvision's geometry (bilinear: DALI's and torch's
    filters agree within a grey level), handed on as channels_last."""
    if not dali_available():
        pytest.skip("nvidia-dali is not installed")
    from fastfeat import dali_loader

    pre = Preprocess(resize=resize, image_size=crop)
    pixels = np.random.default_rng(0).integers(0, 256, (5, height, width, 3), dtype=np.uint8)
    split = Split("train", np.zeros(5, dtype=np.int64), images=pixels)
    got = torch.cat(list(dali_loader.eval_batches(split, pre, 3, torch.device("cpu"))))
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    reference = normalize(TF.center_crop(TF.resize(images, [resize], antialias=True), [crop, crop]).float() / 255,
                          pre.mean, pre.std)
    levels = (got - reference).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255
    assert levels.max() <= 1.01 and levels.mean() < 0.3, (levels.max(), levels.mean())
    first = next(dali_loader.eval_batches(split, pre, 3, torch.device("cpu")))
    assert first.is_contiguous(memory_format=torch.channels_last)
