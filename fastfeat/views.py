"""Cached views: extra features per image beside the center crop, made in the cache's one pass and used
by train-head (one view per row per epoch), knn and predict (test-time flip).

A view is named by its transform: `flip` is the mirror of the center crop (the center crop of the
mirrored image when the crop's left and right margins are equal, as at 256 -> 224; else one pixel off),
flipped on the device; an augmentation name (`VIEW_AUGMENTS`) is a random view of the decoded image by
`transforms.augment`, drawn from a generator seeded by (view seed, split, first row of the batch), so a
rerun or a resumed run with the same batch size (and ranks) makes the same views.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .settings import DEFAULT_AUGMENT, FLIP, VIEW_AUGMENTS, VIEW_POLICIES
from .transforms import Augment, Preprocess, augment, per_size

AUGMENTED_SPLIT = "train"  # augmented views are for training: only this split gets them


def view_augment(name: str) -> Augment:
    """The `Augment` a `--view-augment` name stands for: the one place names become augmentations."""
    if name not in VIEW_AUGMENTS:
        raise InputError(f"unknown --view-augment {name!r}: choose {', '.join(VIEW_AUGMENTS)}")
    return Augment(preset=name)


@dataclass(frozen=True)
class ViewPlan:
    """Which extra views `fastfeat cache` makes: the flip of every split's center crop, and `views`
    augmented views (`augment`, seeded with `seed`) of every train image."""

    flip: bool = False
    views: int = 0
    augment: str = DEFAULT_AUGMENT
    seed: int = 0

    def __post_init__(self) -> None:
        if self.views < 0:
            raise InputError(f"--views must be 0 or more, got {self.views}")
        view_augment(self.augment)

    def transforms(self, split: str) -> list[dict]:
        """Each extra view of `split` as {"transform", "seed"} (seed None: not random)."""
        flips = [{"transform": FLIP, "seed": None}] if self.flip else []
        augmented = self.views if split == AUGMENTED_SPLIT else 0
        return flips + [{"transform": self.augment, "seed": self.seed}] * augmented

    def by_split(self, splits) -> dict[str, list[dict]]:
        return {split: self.transforms(split) for split in splits}

    def attrs(self) -> dict:
        """Cache attributes: a partial cache resumes only with the same plan."""
        return {"tta": FLIP if self.flip else "none", "views": self.views, "view_augment": self.augment,
                "view_seed": self.seed}

    def needs_decoded(self) -> bool:
        """Whether the views need the decoded images (augmented views), not just the center crop."""
        return self.views > 0

    def images(self, split: str, first_row: int, center: torch.Tensor, decoded, pre: Preprocess) -> list[torch.Tensor]:
        """The normalized float NCHW batch of each extra view of `split`'s rows from `first_row` on:
        `center` is their center crops, `decoded` their uint8 images (NCHW or a list of CHW)."""
        transforms = self.transforms(split)
        if not transforms:
            return []
        g = batch_generator(self.seed, split, first_row, center.device)
        return [VIEW_MAKERS[t["transform"]](center, decoded, pre, t["transform"], g) for t in transforms]


NO_VIEWS = ViewPlan()


def _flipped(center: torch.Tensor, decoded, pre: Preprocess, name: str, g: torch.Generator) -> torch.Tensor:
    return center.flip(-1)


def _augmented(center: torch.Tensor, decoded, pre: Preprocess, name: str, g: torch.Generator) -> torch.Tensor:
    aug = view_augment(name)
    return per_size(decoded, lambda images: augment(images, pre, aug, g))


VIEW_MAKERS: dict[str, Callable] = {FLIP: _flipped, **{name: _augmented for name in VIEW_AUGMENTS}}


def batch_generator(seed: int, split: str, first_row: int, device: torch.device) -> torch.Generator:
    """The generator of one batch's augmented views: a function of (seed, split, first row) only."""
    state = np.random.SeedSequence([seed, zlib.crc32(split.encode()), first_row]).generate_state(2, np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


# ---- using cached views: train-head's sampling and the test-time flip ------------------------------------


class ViewChoices:
    """Which view each of `rows` rows reads each epoch: the center or one of its extra views `names`. Views
    are drawn in cycles of (1 + V) epochs, each cycle a seeded random permutation per row, so over a cycle
    every row reads every view exactly once. A streamed train asks only this; `ViewSampler` also gathers."""

    def __init__(self, rows: int, names: list[str], seed: int, device: torch.device):
        self.rows, self.device, self.names = rows, device, ["center", *names]
        self.generator = torch.Generator(device).manual_seed(seed)
        self.rows_read = torch.zeros(len(self.names), dtype=torch.long)
        self.cycle, self.order = -1, torch.empty(0)

    def choices(self, epoch: int) -> torch.Tensor:
        """(N,) the view each row reads in `epoch` (epochs in order): 0 the center, v > 0 extra view v - 1."""
        views = len(self.names)
        if epoch // views != self.cycle:
            self.cycle = epoch // views
            self.order = torch.rand(self.rows, views, generator=self.generator, device=self.device).argsort(1)
        return self.order[:, epoch % views]

    def read(self, epoch: int) -> torch.Tensor:
        """`choices(epoch)`, counted as read (once an epoch, however many passes it makes)."""
        choice = self.choices(epoch)
        self.rows_read += torch.bincount(choice, minlength=len(self.names)).cpu()
        return choice

    def report(self) -> dict:
        return {"names": self.names, "rows_read": self.rows_read.tolist()}


class ViewSampler(ViewChoices):
    """`ViewChoices` over rows in memory: `buffer` (float32, the center at first) holds the epoch's rows
    after `refresh`. The center and the views stay in the cache's dtype (float16 by default) on the device,
    as one (N * (1 + V), D) table: an epoch is one row gather from it and one conversion into `buffer`."""

    def __init__(self, center: torch.Tensor, views: torch.Tensor, names: list[str], seed: int):
        n, v, dim = views.shape
        super().__init__(n, names, seed, center.device)
        self.table = torch.cat([center.to(views.dtype)[:, None], views], 1).view(n * (v + 1), dim)
        self.buffer, self.gathered = center.clone(), views.new_empty(n, dim)

    def refresh(self, epoch: int) -> torch.Tensor:
        """Fill `buffer` with `epoch`'s view of every row and return it."""
        choice = self.read(epoch)
        rows = torch.arange(len(choice), device=choice.device) * len(self.names) + choice
        self.buffer.copy_(torch.index_select(self.table, 0, rows, out=self.gathered))
        return self.buffer


class FlipAverage(nn.Module):
    """Test-time flip: log of the mean of the probabilities of a (N, 2, D) batch's two views (center, flip).
    Log-probabilities are logits whose cross-entropy is -log p(label), so every evaluation can use them."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return flip_average(self.head(pairs[:, 0]), self.head(pairs[:, 1]))


def flip_average(center_logits: torch.Tensor, flip_logits: torch.Tensor) -> torch.Tensor:
    """log((softmax(center) + softmax(flip)) / 2), computed stably."""
    both = torch.stack([center_logits.float().log_softmax(-1), flip_logits.float().log_softmax(-1)])
    return both.logsumexp(0) - np.log(2.0)


def flip_index(names: list[str]) -> int | None:
    """Where the flip is among a split's extra views, if cached."""
    return names.index(FLIP) if FLIP in names else None


def resolve_tta(wanted: bool | None, available: bool, cache: str) -> bool:
    """--tta: None uses the flips when the cache holds them; True requires them; False turns them off."""
    if wanted and not available:
        raise InputError(f"--tta: {cache} holds no flipped views (build it with fastfeat cache --tta flip), "
                         "or pass --no-tta")
    return available if wanted is None else wanted


@dataclass
class HeadViews:
    """A cache's views as train-head uses them: `train` (N, V, D) views (the cache's dtype, float16 by
    default) that each epoch samples from (None: center only, by policy or because the cache has none),
    named `names`, and under `tta` the flipped center crops of each split that has them, (N, D) float16."""

    train: torch.Tensor | None
    names: list[str]
    policy: str
    tta: bool
    flips: dict[str, torch.Tensor]

    def sampler(self, center: torch.Tensor, rows: torch.Tensor | None, seed: int) -> ViewSampler | None:
        """The sampler over the train rows `rows` (None: all), whose center features are `center`."""
        if self.train is None:
            return None
        return ViewSampler(center, self.train if rows is None else self.train[rows], self.names, seed)

    def evaluation_input(self, x: torch.Tensor, flips: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`x`, or under TTA the (N, 2, D) pairs of `x` and its rows' flips (`flips[rows]`)."""
        if not self.tta:
            return x
        return torch.stack([x, (flips if rows is None else flips[rows]).float()], 1)

    def report(self, sampler: ViewSampler | None) -> dict:
        """What the output says was used: the policy, each train view's rows read, and the TTA."""
        return {"policy": self.policy, **(sampler.report() if sampler else {"names": ["center"]}),
                "tta": FLIP if self.tta else "none"}


def load_views(cache: str, device: torch.device, policy: str, tta: bool | None, validation: str,
               streamed: bool = False) -> HeadViews:
    """The views of `cache` that train-head (and knn, center-only) will use: TTA needs the test split's flips
    and those of the split validated on (`validation`: "holdout" = rows of train, "val" or "test"). A
    `streamed` train's views stay in the file (only their names are read): its blocks bring them."""
    if policy not in VIEW_POLICIES:
        raise InputError(f"unknown --views-policy {policy!r}: choose {', '.join(VIEW_POLICIES)}")
    if policy == "center-only" and tta is False:  # nothing to read
        return HeadViews(None, [], policy, False, {})
    from .cache_file import read_views, view_names

    names = view_names(cache)
    found = {split: (torch.from_numpy(views).to(device), split_names) for split, (views, split_names)
             in read_views(cache, ("val", "test") if streamed else ("train", "val", "test")).items()}
    flips = {split: views[:, flip_index(split_names)] for split, (views, split_names) in found.items()
             if FLIP in split_names}
    validated = "train" if validation == "holdout" else validation
    use_tta = resolve_tta(tta, FLIP in names.get("test", []) and FLIP in names.get(validated, []), cache)
    sampled = policy == "sample"
    return HeadViews(found["train"][0] if sampled and "train" in found else None,
                     names.get("train", []) if sampled else [], policy, use_tta, flips)
