"""Augmentation presets: geometry against direct per-image references, randomness, both loaders alike."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import LOADERS, NEEDS_DALI, run
from torchvision.transforms.v2 import functional as TF

from fastfeat.errors import InputError
from fastfeat.loaders import train_batches
from fastfeat.sources import Split
from fastfeat.transforms import Augment, Preprocess, normalize

PRE = Preprocess(resize=32, image_size=32)
N = 192


def copies(image: np.ndarray, n: int = N) -> Split:
    """`n` copies of one HWC uint8 image: every difference between outputs is the augmentation's."""
    return Split("train", np.zeros(n, dtype=np.int64), images=np.repeat(image[None], n, axis=0))


def augmented(split: Split, loader: str, aug: Augment, seed: int = 1, pre: Preprocess = PRE) -> torch.Tensor:
    batches = train_batches(split, loader, pre, aug, 64, torch.device("cpu"), np.arange(len(split)), seed)
    return torch.cat(list(batches))


def noise_image(size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def nearest(out: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance from each output to its nearest reference image, and which one (exact arithmetic, no GEMM)."""
    distance = torch.cdist(out.flatten(1), reference.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    return distance.min(1)


def crop_flip_reference(image: np.ndarray, pad: int, pre: Preprocess = PRE) -> tuple[torch.Tensor, list]:
    """Every crop of the reflect-padded image, plain and mirrored, normalized, made with torchvision's
    own pad, crop and flip; and their (dy, dx, flip)."""
    chw = TF.pad(torch.from_numpy(image).permute(2, 0, 1), [pad], padding_mode="reflect")
    size, crops, keys = pre.image_size, [], []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = TF.crop(chw, dy, dx, size, size)
            for flip in (False, True):
                crops.append(TF.horizontal_flip(crop) if flip else crop)
                keys.append((dy, dx, flip))
    return normalize(torch.stack(crops).float() / 255, pre.mean, pre.std), keys


@pytest.mark.parametrize("loader", LOADERS)
def test_crop_flip_is_a_crop_of_the_reflect_padded_image_flipped_half_the_time(loader):
    image = noise_image()
    out = augmented(copies(image), loader, Augment(preset="crop-flip"))
    reference, keys = crop_flip_reference(image, pad=4)
    distance, best = nearest(out, reference)
    assert (distance < 1e-3).all()  # every output is exactly one of the crops: inside the padding
    drawn = [keys[i] for i in best.tolist()]
    flips = sum(flip for _, _, flip in drawn)
    assert 0.35 * N < flips < 0.65 * N  # half the time (binomial sd: 0.036 N)
    for axis in (0, 1):  # every offset of -4..4 occurs, none dominates (uniform: N / 9 = 21 each)
        counts = np.bincount([key[axis] for key in drawn], minlength=9)
        assert counts.min() >= 5 and counts.max() <= 45, counts
    assert torch.equal(out, augmented(copies(image), loader, Augment(preset="crop-flip")))  # same seed, same batch
    assert not torch.equal(out, augmented(copies(image), loader, Augment(preset="crop-flip"), seed=2))


@pytest.mark.parametrize("loader", LOADERS)
def test_crop_flip_padding_scales_with_the_image_size(loader):
    """At 64 px the default pad is 8 px; pad 0 is a flip only; the eval resize comes first."""
    image = noise_image(64)
    pre = Preprocess(resize=64, image_size=64)
    out = augmented(copies(image, 64), loader, Augment(preset="crop-flip"), pre=pre)
    reference, _ = crop_flip_reference(image, pad=8, pre=pre)
    assert (nearest(out, reference)[0] < 1e-3).all()
    unpadded = augmented(copies(image, 64), loader, Augment(preset="crop-flip", pad=0), pre=pre)
    reference, _ = crop_flip_reference(image, pad=0, pre=pre)
    assert (nearest(unpadded, reference)[0] < 1e-3).all()


def ramps(size: int = 32) -> np.ndarray:
    """Red = x, green = y (8 levels a pixel), blue 128: a crop's box can be read off its pixels."""
    x = np.arange(size) * 8
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    image[..., 0], image[..., 1] = x[None, :], x[:, None]
    return image


def boxes(out: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(area share, mirrored) of each output of the ramp image, from its red and green ranges."""
    pixels = (out * torch.tensor(PRE.std).view(1, 3, 1, 1) + torch.tensor(PRE.mean).view(1, 3, 1, 1)) * 255 / 8
    size = out.shape[-1]
    red, green = pixels[:, 0], pixels[:, 1]
    width = (red[:, :, -1] - red[:, :, 0]).mean(1).numpy() * size / (size - 1)  # signed: negative when mirrored
    height = (green[:, -1, :] - green[:, 0, :]).mean(1).numpy() * size / (size - 1)
    return np.abs(width * height) / size**2, width < 0


@pytest.mark.parametrize("loader", LOADERS)
def test_rrc_flip_crops_cover_the_crop_scale_and_flip_half_the_time(loader):
    out = augmented(copies(ramps()), loader, Augment(preset="rrc-flip", crop_scale=(0.25, 1.0)))
    area, mirrored = boxes(out)
    assert area.min() > 0.2 and area.max() < 1.05, (area.min(), area.max())
    assert 0.5 < area.mean() < 0.75  # uniform in [0.25, 1] (less where a box does not fit): about 0.6
    assert 0.35 * N < mirrored.sum() < 0.65 * N
    small = boxes(augmented(copies(ramps()), loader, Augment(preset="rrc-flip", crop_scale=(0.1, 0.2))))[0]
    assert 0.07 < small.min() and small.max() < 0.25, (small.min(), small.max())
    assert torch.equal(out, augmented(copies(ramps()), loader, Augment(preset="rrc-flip", crop_scale=(0.25, 1.0))))


@NEEDS_DALI
@pytest.mark.parametrize("preset", ["recipe", "rrc-flip", "crop-flip"])
def test_both_loaders_agree_in_distribution(preset):
    """Mean crop area and flip rate of the ramp image, and the mean output image, alike in torch and DALI."""
    aug = Augment(preset=preset)
    torch_out, dali_out = (augmented(copies(ramps(), 256), loader, aug) for loader in ("torch", "dali"))
    (torch_area, torch_flip), (dali_area, dali_flip) = boxes(torch_out), boxes(dali_out)
    assert abs(torch_area.mean() - dali_area.mean()) < 0.06, (torch_area.mean(), dali_area.mean())
    assert abs(torch_flip.mean() - dali_flip.mean()) < 0.15
    assert (torch_out.mean(0) - dali_out.mean(0)).abs().mean() < 0.1


def test_augment_keeps_the_recipe_by_default_and_refuses_bad_values():
    assert Augment().preset == "recipe"
    with pytest.raises(InputError, match="unknown --augment 'cutout'"):
        Augment(preset="cutout")
    for scale in ((0.0, 1.0), (0.5, 0.2), (0.5, 1.5), (0.5,)):
        with pytest.raises(InputError, match="--crop-scale"):
            Augment(preset="rrc-flip", crop_scale=scale)
    with pytest.raises(InputError, match="--pad"):
        Augment(preset="crop-flip", pad=-1)


@pytest.mark.parametrize("argv, message", [
    (["--crop-scale", "0"], "--crop-scale must be two numbers"),
    (["--crop-scale", "0,1"], "--crop-scale must be two numbers"),
    (["--augment", "cutout"], "--augment must be one of recipe, crop-flip, rrc-flip, got 'cutout'"),
    (["--pad", "-2"], "--pad must be a finite number >= 0 and < 32"),
    (["--val-fraction", "1.5"], "--val-fraction"),
])
def test_bad_augment_values_are_one_line(argv, message, tmp_path, capsys):
    code, _, err = run(["finetune", "--data", str(tmp_path), "--weights", "none", "--device", "cpu", *argv], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
