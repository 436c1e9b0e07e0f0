"""Shared fixtures: a generated CIFAR-10-like sample (and the real one where present), a resnet18
weights file, small image folders. Shared plain code (constants, data makers) is in helpers.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import REAL_SAMPLE, REPO, SAMPLE_TEST_PER_CLASS, SAMPLE_TRAIN_PER_CLASS, make_cifar, make_folder

from fastfeat.synthetic import write_sample

sys.path.insert(0, str(REPO / "benchmarks"))  # the probe reference lives there


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Path:
    """A generated CIFAR-10 sample laid out like the real one: `cifar-10-batches-py/` and `folder/`
    holding the same images (see fastfeat.synthetic), so the suite runs on a fresh clone."""
    return write_sample(tmp_path_factory.mktemp("sample"), SAMPLE_TRAIN_PER_CLASS, SAMPLE_TEST_PER_CLASS,
                        formats=("jpg", "jpg", "jpg", "png"))


@pytest.fixture(scope="session")
def real_sample() -> Path:
    """The real CIFAR-10 sample (5,000 train and 1,000 test images) next to the repository, if there."""
    if not (REAL_SAMPLE / "cifar-10-batches-py").is_dir() or not (REAL_SAMPLE / "folder").is_dir():
        pytest.skip(f"the real CIFAR-10 sample is not at {REAL_SAMPLE} (only the generated one is used)")
    return REAL_SAMPLE


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A resnet18 state dict (random init, fixed seed, with fc) as a user would pass with --weights."""
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "folder")


@pytest.fixture(scope="session")
def learnable(tmp_path_factory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("learnable"), n_train=160, n_test=40)
