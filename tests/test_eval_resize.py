"""The eval preprocessing against Pillow: pixel for pixel against `PIL.Image.resize` and torchvision's PIL
transforms, and per image in the model's features for both loaders, at the real sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import LOADERS
from PIL import Image
from torchvision import models
from torchvision import transforms as T

from fastfeat.backbone import build_backbone
from fastfeat.loaders import eval_batches
from fastfeat.sources import Split
from fastfeat.transforms import Preprocess, crop_start, eval_transform, per_size, resize_center_crop, resized_size

# (height, width, resize, crop): CIFAR up to 256 / 224 and to 224, large photos down to 256 / 224, mild up- and
# downsampling, equal size, non-square
SIZES = [(32, 32, 256, 224), (32, 32, 224, 224), (375, 500, 256, 224), (768, 1024, 256, 224), (40, 50, 64, 56),
         (37, 29, 32, 24), (120, 90, 40, 36), (31, 33, 31, 31)]


def random_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def pil_transform(pre: Preprocess) -> T.Compose:
    """The weights' `transforms()`, as torchvision builds them: Resize, CenterCrop, ToTensor, Normalize."""
    return T.Compose([T.Resize(pre.resize, interpolation=T.InterpolationMode(pre.interpolation)),
                      T.CenterCrop(pre.image_size), T.ToTensor(), T.Normalize(pre.mean, pre.std)])


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("height, width, resize, crop", SIZES)
def test_resize_equals_pillow(interpolation, height, width, resize, crop):
    """Every pixel equals `PIL.Image.resize` + crop, and the normalized output torchvision's PIL transforms."""
    pre = Preprocess(resize=resize, image_size=crop, interpolation=interpolation)
    pixels = random_images(2, height, width)
    out_h, out_w = resized_size(height, width, resize)
    top, left = crop_start(out_h, crop), crop_start(out_w, crop)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    reference = np.stack([np.asarray(Image.fromarray(p).resize((out_w, out_h), resample))[top:top + crop, left:left + crop]
                          for p in pixels])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    got = resize_center_crop(images, pre)
    assert got.dtype == torch.uint8 and got.shape == (2, 3, crop, crop)
    assert torch.equal(got.permute(0, 2, 3, 1), torch.from_numpy(reference))
    normalized = torch.stack([pil_transform(pre)(Image.fromarray(p)) for p in pixels])
    torch.testing.assert_close(eval_transform(images, pre), normalized, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 40])
def test_the_cpu_transforms_a_batch_in_chunks_of_any_size(monkeypatch, chunk_bytes):
    """One image per chunk, or the whole batch at once: the same normalized crops as PIL's."""
    pre = Preprocess(resize=40, image_size=32, interpolation="bicubic")
    pixels = random_images(5, 37, 29)
    monkeypatch.setattr("fastfeat.transforms.CPU_CHUNK_BYTES", chunk_bytes)
    normalized = torch.stack([pil_transform(pre)(Image.fromarray(p)) for p in pixels])
    got = eval_transform(torch.from_numpy(pixels).permute(0, 3, 1, 2), pre)
    torch.testing.assert_close(got, normalized, rtol=0, atol=1e-5)


def test_images_of_several_sizes_are_transformed_per_size_in_order():
    pre = Preprocess(resize=40, image_size=32, interpolation="bicubic")
    images = [torch.from_numpy(random_images(1, *size, seed=i)[0]).permute(2, 0, 1)
              for i, size in enumerate([(40, 50), (37, 29), (40, 50), (64, 64)])]
    one_by_one = torch.cat([eval_transform(img[None], pre) for img in images])
    torch.testing.assert_close(per_size(images, lambda batch: eval_transform(batch, pre)), one_by_one, rtol=0, atol=0)


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth image with edges and noise (JPEG-friendly, unlike pure noise), as a photo's pixels."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC)).astype(np.int16)
    return np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> tuple[str, ...]:
    """JPEG files at the real sizes: CIFAR's 32 px and two photo sizes."""
    root = tmp_path_factory.mktemp("jpegs")
    files = []
    for i, (height, width) in enumerate([(32, 32), (32, 32), (32, 32), (375, 500), (768, 1024)]):
        path = root / f"{i}.jpg"
        Image.fromarray(photo_like(height, width, i)).save(path, quality=90)
        files.append(str(path))
    return tuple(files)


def feature_cosines(model: torch.nn.Module, got: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image cosine of the features, BatchNorm calibrated on `reference` first: random weights with
    BatchNorm's initial statistics give features near zero, where the cosine means nothing."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # the plain average of the batches seen
    with torch.inference_mode():
        model.train()(reference)
        model.eval()
        return torch.nn.functional.cosine_similarity(model(got), model(reference))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("arch, weights_enum, interpolation", [
    ("efficientnet_b0", models.EfficientNet_B0_Weights, "bicubic"), ("resnet18", models.ResNet18_Weights, "bilinear")])
@pytest.mark.slow
def test_loaders_match_the_weights_transforms_on_pil(jpegs, loader, arch, weights_enum, interpolation):
    """Each loader's eval batches of JPEG files against the weights' own `transforms()` applied to the
    PIL images: the same pixels, so features of cosine >= 0.999 per image (random weights, fp32)."""
    backbone = build_backbone(arch, "none")
    pre = backbone.spec.pre
    preset = weights_enum.DEFAULT.transforms()
    assert (pre.resize, pre.image_size, pre.interpolation) == (preset.resize_size[0], preset.crop_size[0], interpolation)
    split = Split("test", np.zeros(len(jpegs), dtype=np.int64), files=jpegs)
    got = torch.cat(list(eval_batches(split, loader, pre, 3, torch.device("cpu"))))
    reference = torch.stack([preset(Image.open(path).convert("RGB")) for path in jpegs])
    levels = (got - reference).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255
    assert levels.max() < 0.01, levels.amax((1, 2, 3))
    assert feature_cosines(backbone.model, got, reference).min() >= 0.999


@pytest.mark.parametrize("loader", LOADERS)
def test_array_batches_match_pil(loader):
    """CIFAR-style arrays (both loaders): the eval batches equal torchvision's PIL transforms, channels_last."""
    pre = Preprocess(resize=256, image_size=224, interpolation="bicubic")
    pixels = random_images(4, 32, 32, seed=3)
    split = Split("test", np.zeros(4, dtype=np.int64), images=pixels)
    batches = list(eval_batches(split, loader, pre, 3, torch.device("cpu")))
    assert batches[0].is_contiguous(memory_format=torch.channels_last)
    reference = torch.stack([pil_transform(pre)(Image.fromarray(p)) for p in pixels])
    torch.testing.assert_close(torch.cat(batches), reference, rtol=0, atol=1e-5)
