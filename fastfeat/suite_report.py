"""The suite's results: one `Row` per cell in OUT/results.csv (rewritten atomically as each cell ends, one row
per cell: a rerun's row replaces a failed one), and what is read from it: OUT/summary.md (archs x datasets x
probes, mean ± std over trials, per shots setting) and, with matplotlib, OUT/summary.png and OUT/shots.png."""
from __future__ import annotations

import csv
import io
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from . import __version__
from .reporting import atomic_write
from .settings import FULL

OK, FAILED = "ok", "failed"
CACHE = "cache"  # the probe column of a cache's own row: its backbone pass
NO_CACHE = "no cache: "  # the reason of a cell whose cache failed, before the cache's own


@dataclass(frozen=True)
class Row:
    """One cell: which (arch, dataset, probe, shots, trial) and its seed; its test numbers (evaluated once),
    seconds, backbone images run for it, the cache it read (relative to OUT), what validated its choices,
    what it chose, and its status with the one-line reason of a failure."""

    arch: str
    dataset: str
    probe: str
    shots: str
    trial: int
    seed: int
    status: str = OK
    top1: float | None = None
    top5: float | None = None
    mean_per_class: float | None = None
    seconds: float = 0.0
    backbone_images: int = 0
    cache: str = ""
    validation: str = ""
    chosen: str = ""
    version: str = __version__
    reason: str = ""

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return self.arch, self.dataset, self.probe, self.shots, self.trial

    @classmethod
    def from_csv(cls, record: dict[str, str]) -> Row:
        values = {}
        for f in fields(cls):
            text = record.get(f.name, "")
            kind = f.type
            values[f.name] = (None if text == "" and "None" in kind else int(text) if kind == "int" else
                              float(text) if "float" in kind else text)
        return cls(**values)

    def csv(self) -> dict[str, str]:
        return {k: "" if v is None else repr(v) if isinstance(v, float) else str(v) for k, v in asdict(self).items()}


COLUMNS = tuple(f.name for f in fields(Row))


def shots_label(shots: int | None) -> str:
    return FULL if shots is None else str(shots)


class ResultsTable:
    """OUT/results.csv in memory, keyed by cell: `add` replaces the cell's row and rewrites the file atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple, Row] = {}
        if path.exists():
            with open(path, newline="") as f:
                for record in csv.DictReader(f):
                    row = Row.from_csv(record)
                    self.rows[row.key] = row

    def finished(self, key: tuple) -> bool:
        return key in self.rows and self.rows[key].status == OK

    def add(self, row: Row) -> None:
        self.rows[row.key] = row
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, COLUMNS)
        writer.writeheader()
        writer.writerows(r.csv() for r in self.rows.values())
        atomic_write(self.path, lambda tmp: tmp.write_text(buffer.getvalue()))


# ---- the summary -------------------------------------------------------------------------------------------


def cell_stats(rows: list[Row]) -> dict[tuple[str, str, str, str], tuple[float, float, int]]:
    """(mean, std, trials) of top-1 per (arch, dataset, probe, shots) over the finished trials."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if row.probe != CACHE and row.status == OK and row.top1 is not None:
            groups.setdefault((row.arch, row.dataset, row.probe, row.shots), []).append(row.top1)
    return {key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for key, v in groups.items()}


def mean_ranks(archs: list[str], columns: list[tuple[str, str]], means: dict[tuple[str, str, str], float]) -> dict[str, float]:
    """Each arch's rank (1 best, ties shared as their mean rank) in every column it has a number in, averaged."""
    ranks: dict[str, list[float]] = {arch: [] for arch in archs}
    for dataset, probe in columns:
        scored = {a: means[a, dataset, probe] for a in archs if (a, dataset, probe) in means}
        for arch, value in scored.items():
            better, tied = sum(v > value for v in scored.values()), sum(v == value for v in scored.values())
            ranks[arch].append(better + (tied + 1) / 2)
    return {arch: statistics.fmean(r) for arch, r in ranks.items() if r}


def pivot(rows: list[Row], archs: list[str], datasets: list[str], probes: list[str], shots: str) -> list[str]:
    """The markdown table of one shots setting: archs as rows; datasets x probes, the mean over datasets per
    probe (over the datasets every arch has a number for) and the mean rank as columns; mean ± std top-1 in %,
    the best of each column in bold."""
    stats = cell_stats(rows)
    columns = [(d, p) for d in datasets for p in probes]
    means = {(a, d, p): stats[a, d, p, shots][0] for a in archs for d, p in columns if (a, d, p, shots) in stats}
    common = {p: [d for d in datasets if all((a, d, p) in means for a in archs)] for p in probes}
    over = {(a, "mean", p): statistics.fmean(means[a, d, p] for d in common[p]) for a in archs for p in probes
            if common[p]}
    ranks = mean_ranks(archs, columns, means)
    header = ["arch", *(f"{d} {p}" for d, p in columns), *(f"mean {p}" for p in probes), "mean rank"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arch in archs:
        cells = [_cell(stats.get((arch, d, p, shots)), means, (d, p), arch, archs) for d, p in columns]
        cells += [_best(over.get((arch, "mean", p)), [over.get((a, "mean", p)) for a in archs], f"{100 * over[arch, 'mean', p]:.1f}"
                        if (arch, "mean", p) in over else "—") for p in probes]
        rank = ranks.get(arch)
        cells.append(_best(None if rank is None else -rank, [None if a not in ranks else -ranks[a] for a in archs],
                           "—" if rank is None else f"{rank:.2f}"))
        lines.append("| " + " | ".join([arch, *cells]) + " |")
    return lines


def _cell(stat: tuple[float, float, int] | None, means: dict, column: tuple[str, str], arch: str, archs: list[str]) -> str:
    if stat is None:
        return "—"
    text = f"{100 * stat[0]:.1f} ± {100 * stat[1]:.1f}" if stat[2] > 1 else f"{100 * stat[0]:.1f}"
    return _best(stat[0], [means.get((a, *column)) for a in archs], text)


def _best(value: float | None, column: list[float | None], text: str) -> str:
    """`text` in bold where `value` is the column's best."""
    present = [v for v in column if v is not None]
    return f"**{text}**" if value is not None and len(present) > 1 and value == max(present) else text


def summary_markdown(rows: list[Row], archs: list[str], datasets: list[str], probes: list[str], shots: list[str],
                     trials: int) -> str:
    """OUT/summary.md: one pivot per shots setting, what validated each probe, and the failed cells."""
    lines = ["# fastfeat suite", "",
             f"Top-1 test accuracy (%), mean ± std over {trials} trial(s); test was evaluated once per cell and chose "
             "nothing (every sweep cell and k was chosen on validation rows). Bold: the best of each column; "
             "mean rank: over the dataset and probe columns (1 is best).", ""]
    for setting in shots:
        probes_here = [p for p in probes if p != "finetune" or setting == FULL]
        lines += [f"## {setting} shot(s) per class" if setting != FULL else "## full train split", "",
                  *pivot(rows, archs, datasets, probes_here, setting), ""]
    validated = sorted({(r.probe, r.shots, r.validation) for r in rows if r.status == OK and r.probe != CACHE})
    if validated:
        lines += ["## Validation", "", *(f"- {probe}, {shots} shots: {how}" for probe, shots, how in validated), ""]
    failed = [r for r in rows if r.status == FAILED]
    first = [r for r in failed if not r.reason.startswith(NO_CACHE)]
    if failed:
        lines += ["## Failed cells", "", *(f"- {r.arch} {r.dataset} {r.probe} {r.shots} trial {r.trial}: {r.reason}"
                                           for r in first)]
        lines += [f"- and {len(failed) - len(first)} cells that needed a failed cache", ""]
    return "\n".join(lines)


def write_summary(out: Path, rows: list[Row], archs: list[str], datasets: list[str], probes: list[str],
                  shots: list[str], trials: int) -> list[Path]:
    """summary.md, and with matplotlib summary.png and shots.png; returns the files written."""
    path = out / "summary.md"
    text = summary_markdown(rows, archs, datasets, probes, shots, trials)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    written = [path]
    stats = cell_stats(rows)
    if stats and _have_matplotlib():
        from .plots import shots_curves, suite_heatmap

        largest = FULL if FULL in shots else max(shots, key=int)
        measured = [d for d in datasets if any(key[1] == d for key in stats)]
        written.append(suite_heatmap(stats, archs, measured, probes, largest, out / "summary.png"))
        written.append(shots_curves(stats, archs, measured, probes, shots, out / "shots.png"))
    return written


def _have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None
