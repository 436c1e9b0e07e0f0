"""`--plot DIR`: learning curves, the confusion matrix and the sweep's lr x weight-decay heatmap as PNGs; and
the suite's arch x dataset heatmaps and accuracy-against-shots curves.

matplotlib is an optional extra (`pip install 'fastfeat[plot]'`): `require_matplotlib` is called when
the options are checked, so a missing install is one line before any training, not after it.
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError
from .reporting import atomic_write


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib: pip install 'fastfeat[plot]' (or drop --plot)")


def _figure(**kw):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot

    return pyplot.subplots(**kw)


def _save(fig, path: Path) -> Path:
    from matplotlib import pyplot

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    pyplot.close(fig)
    return path


def learning_curves(history: Sequence[dict], path: Path, validation: str = "validation") -> Path:
    """Loss and accuracy per epoch, train and `validation` (the epoch lines' two columns; a refit has no
    validation column)."""
    epochs = [h["epoch"] for h in history]
    fig, (loss, acc) = _figure(ncols=2, figsize=(9, 3.5))
    for axis, key, title in ((loss, "loss", "loss"), (acc, "acc", "accuracy")):
        axis.plot(epochs, [h[f"train_{key}"] for h in history], marker="o", label="train")
        if f"valid_{key}" in history[0]:
            axis.plot(epochs, [h[f"valid_{key}"] for h in history], marker="o", label=validation)
        axis.set(xlabel="epoch", title=title)
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
        axis.legend()
    return _save(fig, path)


def confusion_matrix(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "test") -> Path:
    """Counts, rows = true class, columns = predicted; the diagonal is the per-class hits."""
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, axis = _figure(figsize=(size, size))
    image = axis.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=axis, fraction=0.046)
    ticks = range(len(classes))
    label_size = 8 if len(classes) <= 20 else 4
    axis.set_xticks(ticks, classes, rotation=90, fontsize=label_size)
    axis.set_yticks(ticks, classes, fontsize=label_size)
    axis.set(xlabel="predicted", ylabel="true", title=f"confusion matrix ({title})")
    if len(classes) <= 20:
        peak = max(max(row) for row in confusion) or 1
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                axis.text(j, i, str(count), ha="center", va="center", fontsize=7,
                          color="white" if count > peak / 2 else "black")
    return _save(fig, path)


def sweep_heatmap(sweep: dict, path: Path) -> Path:
    """Validation accuracy per lr (rows) x weight decay (columns), the chosen cell outlined."""
    grid = [[float("nan") if acc is None else acc for acc in row] for row in sweep["val_acc"]]
    lrs, wds, best = sweep["lrs"], sweep["weight_decays"], sweep["best"]
    fig, axis = _figure(figsize=(1.1 * len(wds) + 2.5, 0.5 * len(lrs) + 2))
    image = axis.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=axis, label="validation accuracy")
    axis.set_xticks(range(len(wds)), [f"{wd:.3g}" for wd in wds])
    axis.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    axis.set(xlabel="weight decay", ylabel="lr", title="train-head --sweep")
    for i, row in enumerate(grid):
        for j, acc in enumerate(row):
            axis.text(j, i, "-" if math.isnan(acc) else f"{100 * acc:.1f}", ha="center", va="center", fontsize=7, color="white")
    from matplotlib.patches import Rectangle

    i, j = lrs.index(best["lr"]), wds.index(best["weight_decay"])
    axis.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    return _save(fig, path)


def plot_run(directory: str | Path, classes: Sequence[str], history: Sequence[dict] = (), test: dict | None = None,
             sweep: dict | None = None, validation: str = "validation") -> list[Path]:
    """Every plot a run has data for, into `directory`: learning_curves.png (epochs), confusion.png
    (a report with a confusion matrix), sweep.png (a --sweep grid). Returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if history:
        written.append(learning_curves(history, directory / "learning_curves.png", validation))
    if test is not None:
        written.append(confusion_matrix(test["confusion"], classes, directory / "confusion.png"))
    if sweep is not None:
        written.append(sweep_heatmap(sweep, directory / "sweep.png"))
    return written


def suite_heatmap(stats: dict, archs: Sequence[str], datasets: Sequence[str], probes: Sequence[str], shots: str,
                  path: Path) -> Path:
    """Mean top-1 per arch (rows) x dataset (columns), one panel per probe, at one shots setting; `stats` maps
    (arch, dataset, probe, shots) to (mean, std, trials)."""
    fig, axes = _figure(ncols=len(probes), figsize=(1.2 * len(datasets) * len(probes) + 2.5, 0.5 * len(archs) + 2),
                        squeeze=False)
    for axis, probe in zip(axes[0], probes):
        grid = [[stats.get((a, d, probe, shots), (math.nan,))[0] for d in datasets] for a in archs]
        image = axis.imshow(grid, cmap="viridis", aspect="auto", vmin=0, vmax=1)
        axis.set_xticks(range(len(datasets)), datasets, rotation=45, ha="right")
        axis.set_yticks(range(len(archs)), archs)
        axis.set(title=f"{probe} ({shots} shots)")
        for i, row in enumerate(grid):
            for j, acc in enumerate(row):
                axis.text(j, i, "-" if math.isnan(acc) else f"{100 * acc:.1f}", ha="center", va="center", fontsize=7,
                          color="white")
        fig.colorbar(image, ax=axis, label="test top-1")
    return _save(fig, path)


def shots_curves(stats: dict, archs: Sequence[str], datasets: Sequence[str], probes: Sequence[str],
                 shots: Sequence[str], path: Path) -> Path:
    """Mean top-1 (± std over trials) against the shots settings, one panel per dataset, a line per arch
    (colour) and probe (marker)."""
    order = sorted(shots, key=lambda s: math.inf if not s.isdigit() else int(s))
    fig, axes = _figure(ncols=len(datasets), figsize=(4 * len(datasets), 3.5), squeeze=False)
    markers = "osd^v<>"
    for axis, dataset in zip(axes[0], datasets):
        for i, arch in enumerate(archs):
            for j, probe in enumerate(probes):
                points = [(x, stats[arch, dataset, probe, s]) for x, s in enumerate(order)
                          if (arch, dataset, probe, s) in stats]
                if points:
                    axis.errorbar([x for x, _ in points], [m for _, (m, _, _) in points], [sd for _, (_, sd, _) in points],
                                  color=f"C{i}", marker=markers[j % len(markers)], capsize=2, label=f"{arch} {probe}")
        axis.set_xticks(range(len(order)), order)
        axis.set(xlabel="shots per class", ylabel="test top-1", title=dataset)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)
