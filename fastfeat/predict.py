"""`fastfeat predict`: classify images with a fine-tuned checkpoint or a head (backbone rebuilt)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .backbone import build_backbone, rebuild_backbone
from .errors import InputError
from .evaluation import classification_report
from .loaders import eval_batches, resolve_loader
from .model_files import (
    CHECKPOINT_FORMAT,
    checkpoint_spec,
    head_from_state,
    read_model_file,
)
from .runtime import autocast, choose_precision, image_device
from .sources import open_dataset
from .torch_loader import decode_file
from .transforms import Preprocess, eval_transform, per_size
from .views import flip_average


@dataclass
class Classifier:
    """A full image classifier (backbone + head) with its class names and preprocessing."""

    model: nn.Module
    classes: list[str]
    pre: Preprocess


def load_classifier(path: str | Path, weights: str | None = None) -> Classifier:
    """Load a `fastfeat finetune` checkpoint or a `fastfeat train-head` head as a full classifier; a
    head's backbone is rebuilt from the weights its features came from (or `weights`, that FILE)."""
    state = read_model_file(path)
    if state["format"] == CHECKPOINT_FORMAT:
        if weights is not None:
            raise InputError(f"--weights applies to heads only: the checkpoint {path} holds its own backbone weights")
        spec, classes = checkpoint_spec(state, Path(path)), list(state.get("classes", []))
        model = build_backbone(spec.arch, "none", 0, spec.pre).with_head(nn.Linear(spec.feature_dim, len(classes)))
        try:
            model.load_state_dict(state["model"])
        except (KeyError, RuntimeError):
            raise InputError(f"{path} is a damaged fastfeat checkpoint (missing or misshapen weights)") from None
    else:
        head, classes, spec = head_from_state(state, path)
        model = nn.Sequential(rebuild_backbone(spec, weights).model, head)
    return Classifier(model.eval(), list(classes), spec.pre)


class Predictor:
    """A classifier on a device, with autocast: probabilities for normalized batches; with `tta`, the mean
    of the probabilities of each center crop and its mirror (as train-head's test-time flip)."""

    def __init__(self, classifier: Classifier, device: str = "auto", amp: bool = True, tta: bool = False):
        self.device = image_device(device)
        self.precision = choose_precision(self.device, amp)
        self.dtype = self.precision.dtype
        self.classifier = classifier
        self.model = classifier.model.to(self.device)
        self.tta = tta

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        with autocast(self.device, self.dtype):
            if self.tta:
                return flip_average(self.model(images), self.model(images.flip(-1))).exp()
            return self.model(images).float().softmax(1)

    def predict_files(self, files: list[str], topk: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (class, probability) for each image file."""
        images = []
        for f in files:
            image = decode_file(f)
            if image is None:
                raise InputError(f"corrupt or missing image: {f}")
            images.append(image.to(self.device))
        probs = self.probabilities(per_size(images, lambda batch: eval_transform(batch, self.classifier.pre)))
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        return [[(self.classifier.classes[i], v) for v, i in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, indices)]

    def evaluate(self, data: str, split: str = "test", loader: str = "auto", batch_size: int = 128,
                 limit: int | None = None) -> Evaluation:
        """Probabilities for every image of a dataset split (its classes must be the model's)."""
        dataset = open_dataset(data, "auto", (split,), limit)
        if list(dataset.classes) != self.classifier.classes:
            raise InputError(f"{data} has classes {list(dataset.classes)}, the model has {self.classifier.classes}")
        rows = dataset.splits[split]
        batches = eval_batches(rows, resolve_loader(loader), self.classifier.pre, batch_size, self.device)
        probabilities = torch.cat([self.probabilities(images).cpu() for images in batches])
        files = None if rows.files is None else [str(Path(f).relative_to(dataset.root)) for f in rows.files]
        return Evaluation(probabilities, torch.from_numpy(rows.labels), files)

    def accuracy(self, data: str, split: str = "test", loader: str = "auto", batch_size: int = 128,
                 limit: int | None = None) -> tuple[float, int]:
        """Top-1 accuracy on a dataset split, and its number of images."""
        evaluation = self.evaluate(data, split, loader, batch_size, limit)
        return classification_report(evaluation.probabilities, evaluation.labels)["top1"], len(evaluation.labels)


@dataclass
class Evaluation:
    """A split's (N, K) probabilities, its labels and, for image folders, each row's file."""

    probabilities: torch.Tensor
    labels: torch.Tensor
    files: list[str] | None
