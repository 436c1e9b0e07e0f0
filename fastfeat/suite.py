"""`fastfeat suite`: many backbones x many datasets, each cached once into OUT/caches/, then every probe, shots
setting and trial on the cached features, into one results table.

A K-shot trial t draws K train rows per class and `val_shots` more for validation with seed t, into a small
cache of its own (OUT/caches/shots/: train = the shots, val = the validation rows, test = all of test), so every
probe validates on train rows it never fits, never on test, and every row of the table is what the same probe
run alone on that cache file with that seed gives. A cell's row is written as it ends; rerunning the same command
skips finished cells, reuses finished caches and continues a partial one; a failing cell is recorded with its
one-line reason and the suite goes on.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from .cache import build_cache, cache_attrs
from .cache_file import BlockReader, describe_cache, partial_path, read_attrs, read_cache, write_subset
from .errors import FastfeatError, InputError
from .finetune import finetune
from .head import train_head, validation_plan
from .knn import knn_evaluate
from .outputs import OutputLock, check_output
from .reporting import atomic_write, progress
from .settings import CacheOptions, FinetuneOptions, SuiteOptions
from .sources import few_shot_rows, open_dataset
from .spec import FeatureSpec, plain
from .suite_config import DatasetEntry, SuiteConfig, changed_settings, read_toml, resolve, to_toml
from .suite_report import CACHE, FAILED, NO_CACHE, ResultsTable, Row, shots_label, write_summary

FINETUNE_DEFAULTS = {f.name: f.default for f in fields(FinetuneOptions)}
# what must agree for an existing cache to be reused, beside its feature spec
SOURCE_KEYS = ("dataset", "dataset_path", "dataset_source", "dataset_sha256", "classes", "limit", "seed", "tta",
               "views", "view_augment", "view_seed")


@dataclass(frozen=True)
class Cell:
    """One row of the table: a cache (probe "cache") or a probe at one shots setting (None: full) and trial."""

    arch: str
    dataset: DatasetEntry
    probe: str
    shots: int | None = None
    trial: int = 0

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return self.arch, self.dataset.name, self.probe, shots_label(self.shots), self.trial

    def describe(self) -> str:
        what = f"{self.arch} {self.dataset.name} {self.probe}"
        return what if self.probe == CACHE else f"{what} {shots_label(self.shots)} shots trial {self.trial}"


@dataclass
class SuiteResult:
    """What a run did: every cell of the plan, how many it ran now and skipped as finished, which failed."""

    out: Path
    cells: int
    ran: int
    skipped: int
    failed: list[Row] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    seconds: float = 0.0


class CellFailed(Exception):
    """A cell's failure, already recorded: the cells that need its output fail with its reason."""


def plan_cells(config: SuiteConfig) -> list[Cell]:
    """Per (arch, dataset): its cache, then per shots setting and trial every probe (finetune at full only)."""
    cells = []
    for arch in config.archs:
        for dataset in config.datasets:
            cells.append(Cell(arch, dataset, CACHE))
            cells += [Cell(arch, dataset, probe, shots, trial) for shots in config.shots for trial in range(config.trials)
                      for probe in config.probes if probe != "finetune" or shots is None]
    return cells


def cache_path(config: SuiteConfig, arch: str, dataset: DatasetEntry) -> Path:
    return config.out / "caches" / f"{dataset.name}-{arch.replace(':', '-')}.h5"


def cell_path(config: SuiteConfig, cell: Cell, folder: str, suffix: str = "") -> Path:
    """Where a cell's own file goes: OUT/<folder>/<dataset>-<arch>-<probe>-<shots>-trial<t><suffix>."""
    name = f"{cell.dataset.name}-{cell.arch.replace(':', '-')}-{cell.probe}-{shots_label(cell.shots)}-trial{cell.trial}"
    return config.out / folder / f"{name}{suffix}"


def run_suite(opts: SuiteOptions, log: Callable[[str], None] = print) -> SuiteResult:
    """Resolve and check the configuration (one line on error, before any work), then run every unfinished cell
    (or, with `dry_run`, print the plan)."""
    config = resolve(opts)
    cells = plan_cells(config)
    check_output(config.out, "--out", directory=True)
    if opts.dry_run:
        for line in plan_lines(config, cells, ResultsTable(config.out / "results.csv")):
            log(line)
        return SuiteResult(config.out, len(cells), 0, 0)
    with OutputLock(config.out / "results.csv"):
        write_settings(config)
        return SuiteRun(config, log).run(cells)


def write_settings(config: SuiteConfig) -> None:
    """OUT/suite.toml: the resolved configuration, refused when the finished cells were made with other settings."""
    path = config.out / "suite.toml"
    text = to_toml(config.settings())
    if path.exists():
        import tomllib

        changed = changed_settings(read_toml(str(path)), tomllib.loads(text))
        if changed:
            raise InputError(f"{config.out} holds a suite run with other settings ({'; '.join(changed)}): rerun it "
                             f"with --config {path}, or choose another --out")
    atomic_write(path, lambda tmp: tmp.write_text(text))


class SuiteRun:
    """The cells of one run, in plan order, with the table they are recorded in and the progress shown."""

    def __init__(self, config: SuiteConfig, log: Callable[[str], None]):
        self.config, self.log = config, log
        self.table = ResultsTable(config.out / "results.csv")
        self.spent: dict[str, list[float]] = {}  # seconds per probe of the cells run now: the estimate of the rest
        self.remaining: list[Cell] = []
        self.done = 0

    def run(self, cells: list[Cell]) -> SuiteResult:
        start = time.perf_counter()
        pending = [c for c in cells if not self.table.finished(c.key)]
        self.remaining = list(pending)
        if len(pending) < len(cells):
            self.log(f"suite: {len(cells) - len(pending)} of {len(cells)} cells finished in {self.table.path}: "
                     "skipping them")
        with progress(len(cells), "suite", self.config.progress, initial=len(cells) - len(pending), unit="cell") as bar:
            for group in groups(pending):
                self.run_group(group, bar)
        rows = [self.table.rows[c.key] for c in cells if c.key in self.table.rows]
        written = write_summary(self.config.out, rows, list(self.config.archs), [d.name for d in self.config.datasets],
                                list(self.config.probes), [shots_label(s) for s in self.config.shots],
                                self.config.trials)
        failed = [r for r in rows if r.status == FAILED]
        return SuiteResult(self.config.out, len(cells), len(pending), len(cells) - len(pending), failed, written,
                           time.perf_counter() - start)

    def run_group(self, group: list[Cell], bar) -> None:
        """One (arch, dataset)'s pending cells: its cache first (when any cell needs it), then its probes."""
        first = group[0]
        cache_cell = Cell(first.arch, first.dataset, CACHE)
        try:
            cache = self.cache(cache_cell, bar)
        except CellFailed as failure:
            for cell in group:
                if cell.probe != CACHE:
                    self.record(cell, self.failed_row(cell, f"{NO_CACHE}{failure}", 0.0), bar)
            return
        parent = {}  # the cache's rows, read once for every shots draw
        for cell in group:
            if cell.probe != CACHE:
                start = time.perf_counter()
                try:
                    row = self.probe(cell, cache, parent)
                except Exception as exc:  # any failure of one cell is its row; the suite goes on
                    row = self.failed_row(cell, one_line(exc), time.perf_counter() - start)
                self.record(cell, row, bar)

    def cache(self, cell: Cell, bar) -> Path:
        """The cache of the cell's (arch, dataset): kept when finished, reused when an existing file has the same
        spec and source, continued when partial, else computed; its own row records which."""
        path = cache_path(self.config, cell.arch, cell.dataset)
        if self.table.finished(cell.key) and path.exists():
            return path
        start = time.perf_counter()
        try:
            opts = self.config.cache_options(cell.arch, cell.dataset, path)
            if path.exists():
                check_reusable(path, opts)
                images, note = 0, "reused an existing cache"
            else:
                note = "continued a partial cache" if partial_path(path).exists() else "computed"
                result = build_cache(opts)
                images = result.images + result.views
            row = Row(*cell.key, seed=0, seconds=time.perf_counter() - start, backbone_images=images,
                      cache=self.relative(path), chosen=note)
        except Exception as exc:
            row = self.failed_row(cell, one_line(exc), time.perf_counter() - start)
        self.record(cell, row, bar)
        if row.status == FAILED:
            raise CellFailed(row.reason)
        return path

    def probe(self, cell: Cell, cache: Path, parent: dict) -> Row:
        """One probe cell on the cache (full) or on its trial's shots cache."""
        start = time.perf_counter()
        source = cache if cell.shots is None else self.shots_cache(cell, cache, parent)
        report, validation, chosen, images = run_probe(self.config, cell, source)
        if cell.shots is not None:
            val = self.config.val_shots or cell.shots
            validation = f"{val} per class of the train rows outside the {cell.shots} shots"
        return Row(*cell.key, seed=cell.trial, top1=report["top1"], top5=report.get("top5"),
                   mean_per_class=report["mean_per_class"], seconds=time.perf_counter() - start,
                   backbone_images=images, cache="" if cell.probe == "finetune" else self.relative(source),
                   validation=validation, chosen=chosen)

    def shots_cache(self, cell: Cell, cache: Path, parent: dict) -> Path:
        """OUT/caches/shots/...: the trial's K shots per class as train, `val_shots` more as val, all of test."""
        path = self.config.out / "caches" / "shots" / f"{cache.stem}-{cell.shots}shot-seed{cell.trial}.h5"
        if path.exists():
            return path
        if "data" not in parent:
            parent["data"] = read_cache(cache, ("train", "test"))
        data = parent["data"]
        val = self.config.val_shots or cell.shots
        shots, held = few_shot_rows(data.labels["train"], cell.shots, val, cell.trial)
        subset = {"of": cache.name, "shots": cell.shots, "val_per_class": val, "seed": cell.trial}
        write_subset(data, path, {"train": ("train", shots), "val": ("train", held),
                                  "test": ("test", np.arange(len(data.labels["test"])))}, {"subset": json.dumps(subset)})
        return path

    def failed_row(self, cell: Cell, reason: str, seconds: float) -> Row:
        return Row(*cell.key, seed=cell.trial, status=FAILED, seconds=seconds, reason=reason)

    def record(self, cell: Cell, row: Row, bar) -> None:
        """The cell's row into the table (on disk at once), and its progress line with the time left."""
        self.table.add(row)
        self.spent.setdefault(cell.probe, []).append(row.seconds)
        if cell in self.remaining:
            self.remaining.remove(cell)
        self.done += 1
        outcome = (f"FAILED: {row.reason}" if row.status == FAILED else
                   f"{row.chosen}, {row.backbone_images} backbone images" if cell.probe == CACHE else
                   f"top-1 {row.top1:.4f}" + (f" ({row.chosen})" if row.chosen else ""))
        self.log(f"[{self.done}/{self.done + len(self.remaining)}] {cell.describe()}: {outcome} in {row.seconds:.2f} s; "
                 f"about {self.time_left(self.remaining):.0f} s left")
        bar.update(1)

    def time_left(self, cells: list[Cell]) -> float:
        """The cells left, each at the mean time of the cells of its probe run so far (or of all of them)."""
        every = [s for spent in self.spent.values() for s in spent]
        overall = sum(every) / len(every)
        return sum(np.mean(self.spent[c.probe]) if c.probe in self.spent else overall for c in cells)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.config.out))


def groups(cells: list[Cell]) -> list[list[Cell]]:
    """The cells per (arch, dataset), in plan order."""
    found: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        found.setdefault((cell.arch, cell.dataset.name), []).append(cell)
    return list(found.values())


def run_probe(config: SuiteConfig, cell: Cell, cache: Path) -> tuple[dict, str, str, int]:
    """(test report, what validated, what it chose, backbone images) of one probe on `cache` with seed = trial."""
    quiet = lambda line: None  # noqa: E731: the cell's own progress line says what happened
    if cell.probe in ("head", "sweep"):
        result = train_head(config.head_options(cell.probe, cache, cell.trial, cell_path(config, cell, "heads", ".head.pt")),
                            quiet)
        options = result.options
        chosen = f"lr {options['lr']:g}, weight decay {options['weight_decay']:.3g}"
        return result.test, result.plan.describe(), chosen, 0
    if cell.probe == "knn":
        result = knn_evaluate(config.knn_options(cache, cell.trial, neighbours(config, cache, cell)), quiet)
        return result.reports["test"], result.plan.describe(), f"k {result.best_k}", 0
    opts = config.finetune_options(cell.arch, cell.dataset, cell.trial, cell_path(config, cell, "finetune"))
    result = finetune(opts, quiet)
    return result.test, result.plan.describe(), "the last epoch's model", finetune_images(result, opts.recompute_bn)


def neighbours(config: SuiteConfig, cache: Path, cell: Cell) -> int:
    """The train rows a kNN query of `cache` can have as neighbours: all of a shots cache's train split, the
    rows outside the validation holdout of a full one."""
    labels = BlockReader(cache, "train", 1).labels()
    if cell.shots is not None:
        return len(labels)
    fraction = config.knn_options(cache, cell.trial, len(labels)).val_fraction
    rows = validation_plan(cache, fraction, cell.trial).split(labels)
    return len(labels) if rows is None else len(rows[0])


def finetune_images(result, recompute_bn: int) -> int:
    """The images a fine-tune ran through the backbone: every epoch's training, BatchNorm and validation
    images, then test once (once more for best.pt when it is not the last model)."""
    epochs = len(result.history)
    train = sum(h["train_images"] for h in result.history)
    val, test = (sum(map(sum, report["confusion"])) for report in (result.val, result.test))
    per_epoch_bn = min(recompute_bn, train // max(epochs, 1))
    return train + epochs * (per_epoch_bn + val) + test * (1 + (result.best_test is not result.test))


def check_reusable(path: Path, opts: CacheOptions) -> None:
    """Refuse, in one line saying what differs, an existing cache made with other features or from other data."""
    backbone = opts.build()
    dataset = open_dataset(opts.data, opts.dataset, opts.splits, opts.limit, False, opts.seed, opts.source_inputs())
    attrs = read_attrs(path)
    expected = cache_attrs(dataset, backbone.spec, 0, opts.limit, opts.seed, opts.view_plan())
    differ = FeatureSpec.from_attrs(attrs, str(path)).differences(backbone.spec)
    differ += [key for key in SOURCE_KEYS if plain(attrs.get(key)) != plain(expected[key])]
    if differ:
        raise InputError(f"{path} holds other features or data than this suite's ({'; '.join(differ)}): delete it "
                         "to recompute")


def one_line(exc: Exception) -> str:
    """A failure's one line: fastfeat's own message, else the exception's type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, FastfeatError) else f"{type(exc).__name__}: {text}".rstrip(": ")


# ---- the plan, for --dry-run --------------------------------------------------------------------------------


def plan_lines(config: SuiteConfig, cells: list[Cell], table: ResultsTable) -> list[str]:
    """What a run would do: the cells, each cache's state (finished, reused, continued or computed, with the
    backbone images it would run) and the total."""
    probe_cells = [c for c in cells if c.probe != CACHE]
    finished = sum(table.finished(c.key) for c in cells)
    shots = ",".join(shots_label(s) for s in config.shots)
    lines = [f"suite: {len(config.archs)} archs x {len(config.datasets)} datasets; probes {','.join(config.probes)}; "
             f"shots {shots}; {config.trials} trial(s): {len(cells)} cells ({len(cells) - len(probe_cells)} caches, "
             f"{len(probe_cells)} probe cells), {finished} finished in {table.path}"]
    total = 0
    for cell in cells:
        if cell.probe == CACHE:
            path = cache_path(config, cell.arch, cell.dataset)
            state, images = cache_state(config, cell, path, table)
            total += images
            lines.append(f"cache {cell.arch} {cell.dataset.name}: {state} -> {path}")
    tuned = sum(not table.finished(c.key) for c in probe_cells if c.probe == "finetune")
    epochs = config.probe_options.get("finetune", {}).get("epochs", FINETUNE_DEFAULTS["epochs"])
    more = f", and {tuned} fine-tune cells of {epochs} epochs over their train splits" if tuned else ""
    lines.append(f"backbone images to run: {total} for the caches{more}; the other probes read the caches")
    return lines


def cache_state(config: SuiteConfig, cell: Cell, path: Path, table: ResultsTable) -> tuple[str, int]:
    """(what a run would do with this cache, the backbone images it would run)."""
    if path.exists():
        return ("finished" if table.finished(cell.key) else "reuse (if its spec and source match)"), 0
    opts = config.cache_options(cell.arch, cell.dataset, path)
    try:
        dataset = open_dataset(opts.data, opts.dataset, opts.splits, opts.limit, False, opts.seed, opts.source_inputs())
    except InputError as exc:
        return f"fails: {exc}", 0
    plan = opts.view_plan()
    rows = {name: len(split) for name, split in dataset.splits.items()}
    if partial_path(path).exists():
        written = {name: s["rows_written"] for name, s in describe_cache(partial_path(path))["splits"].items()}
        rows = {name: n - written.get(name, 0) for name, n in rows.items()}
    images = sum(n * (1 + len(plan.transforms(name))) for name, n in rows.items())
    verb = "continue the partial cache" if partial_path(path).exists() else "compute"
    return f"{verb}: {images} backbone images", images
