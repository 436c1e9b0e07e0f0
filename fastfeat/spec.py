"""FeatureSpec: which features these are. Caches, heads, checkpoints and predict share this one type,
so "can this head read these features?" is one comparison, made in one place."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from .errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")  # what torchvision's and timm's weights were trained with
FEATURE_DTYPES = ("float16", "float32")  # what a cache stores features as


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize` (bilinear or bicubic, antialiased), center-crop `image_size`,
    normalize: torchvision's `Resize(256)`, `CenterCrop(224)`, `ToTensor()`, `Normalize(mean, std)`,
    the preset that torchvision's weights carry as `weights.transforms()`."""

    resize: int = 256
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(f"unknown --interpolation {self.interpolation!r}: choose {' or '.join(INTERPOLATIONS)}")
        if self.image_size < 1 or self.resize < 1:
            raise InputError(f"--image-size and --resize must be at least 1, got {self.image_size} and {self.resize}")
        if self.image_size > self.resize:
            raise InputError(f"--image-size {self.image_size} is larger than --resize {self.resize}: "
                             "the center crop must fit inside the resized image")


# What must agree for a head or checkpoint to be reused on other features: the precision may differ.
MATCHED = ("arch", "weights_sha256", "feature_dim", "resize", "image_size", "interpolation", "mean", "std")


def plain(value):
    """HDF5 attributes and loaded files hold numpy scalars, arrays and tuples: compare plain values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


@dataclass(frozen=True)
class FeatureSpec:
    """A feature space: the backbone (`arch`, where its weights came from and their sha256), the
    size of its features, the preprocessing that feeds it and the precision it ran in."""

    arch: str
    weights: str  # where the weights came from: "imagenet:IMAGENET1K_V1", "none:seed=0", "file:NAME", "timm:TAG"
    weights_sha256: str
    feature_dim: int
    pre: Preprocess
    amp_dtype: str = "float32"

    def to_attrs(self) -> dict:
        """Flat, HDF5- and weights_only-safe attributes (lists, str, int, float)."""
        pre = {f.name: plain(getattr(self.pre, f.name)) for f in fields(Preprocess)}
        return {"arch": self.arch, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "feature_dim": int(self.feature_dim), **pre, "amp_dtype": self.amp_dtype}

    @classmethod
    def from_attrs(cls, attrs: dict, source: str = "the file") -> FeatureSpec:
        """The spec recorded in a cache, head or checkpoint (fastfeat 0.1 files: `backbone`, bilinear)."""
        try:
            pre = Preprocess(resize=int(attrs["resize"]), image_size=int(attrs["image_size"]),
                             mean=tuple(plain(attrs["mean"])), std=tuple(plain(attrs["std"])),
                             interpolation=str(attrs.get("interpolation", "bilinear")))
            return cls(arch=str(attrs.get("arch", attrs.get("backbone"))), weights=str(attrs["weights"]),
                       weights_sha256=str(attrs["weights_sha256"]), feature_dim=int(attrs.get("feature_dim", 512)),
                       pre=pre, amp_dtype=str(attrs.get("amp_dtype", "float32")))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{source} does not record which features it holds (arch, weights, preprocessing)") from None

    def with_precision(self, amp_dtype: str) -> FeatureSpec:
        return replace(self, amp_dtype=amp_dtype)

    def differences(self, other: FeatureSpec) -> list[str]:
        """The matched attributes that differ, as "name this vs other"."""
        mine, theirs = self.to_attrs(), other.to_attrs()
        return [f"{key} {_short(mine[key])} vs {_short(theirs[key])}" for key in MATCHED if mine[key] != theirs[key]]

    def check_matches(self, other: FeatureSpec, what: str, against: str) -> None:
        """Refuse, in one line saying what differs, to use `what` (made on self) with `against` (other)."""
        differ = self.differences(other)
        if differ:
            raise InputError(f"{what} was made on other features than {against}: {'; '.join(differ)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."
