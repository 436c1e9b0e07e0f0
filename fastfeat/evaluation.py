"""Results people can read: top-1, top-5, mean per-class accuracy, per-class accuracy and the
confusion matrix, from one (N, K) score tensor, and a CSV of every prediction."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from .plots import plot_run
from .reporting import atomic_write
from .validation import LABELS

TOP5_MIN_CLASSES = 6  # top-5 says something only when there are more than five classes


def classification_report(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """Metrics of (N, K) scores (logits or probabilities) against (N,) labels, as plain values:
    `top1`, `top5` (more than five classes), `mean_per_class` (over the classes that have rows),
    `per_class` (class order; None for a class with no rows) and `confusion` (K x K, rows = true class)."""
    num_classes = scores.shape[1]
    predicted = scores.argmax(1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(num_classes, num_classes)
    rows = confusion.sum(1)
    per_class = confusion.diagonal().double() / rows.clamp(min=1)
    report = {
        "top1": (predicted == labels).float().mean().item(),  # as every other accuracy in fastfeat
        "mean_per_class": per_class[rows > 0].mean().item(),
        "per_class": [acc if n else None for acc, n in zip(per_class.tolist(), rows.tolist())],
        "confusion": confusion.tolist(),
    }
    if num_classes >= TOP5_MIN_CLASSES:
        report["top5"] = (scores.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    return report


def write_predictions(path: str | Path, probabilities: torch.Tensor, labels: torch.Tensor, classes: list[str],
                      files: list[str] | None = None) -> None:
    """One CSV row per image: row index, file (image folders), true and predicted class, its probability."""
    confidence, predicted = probabilities.max(1)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "file", "label", "predicted", "probability"])
    for row, (label, guess, p) in enumerate(zip(labels.tolist(), predicted.tolist(), confidence.tolist())):
        writer.writerow([row, files[row] if files else "", classes[label], classes[guess], f"{p:.6f}"])
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))


def write_reports(predictions: str | None, plot: str | None, probabilities: torch.Tensor, labels: torch.Tensor,
                  classes: list[str], files: list[str] | None, history: list[dict], test: dict, validation: str,
                  sweep: dict | None = None) -> None:
    """A finished run's `--predictions` CSV (the test rows' `probabilities`) and `--plot` PNGs (learning
    curves of `history`, validated on `validation`; the test confusion matrix; a --sweep grid)."""
    if predictions:
        write_predictions(predictions, probabilities, labels, classes, files)
    if plot:
        plot_run(plot, classes, history, test, sweep, LABELS[validation])
