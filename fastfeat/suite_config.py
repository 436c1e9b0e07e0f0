"""The suite's configuration: its flags, a `--config` TOML file and the defaults resolved into one checked
`SuiteConfig` before any work, and written back as OUT/suite.toml so that a run can be repeated exactly.

The TOML file holds the flags' keys (`archs = ["resnet18"]`, `data_root`, `trials = 3`, ...), a `[cache]`
table of `fastfeat cache`'s options for every cache, and `[probes.NAME]` tables of each probe's options
(`[probes.sweep] lrs = [0.1, 0.2]`); the options the suite sets itself (the cache file, the seed, the device,
...) are refused there, as is any unknown key, in one line.
"""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import InputError
from .options import cli_fields
from .settings import (FULL, PROBES, SUITE_DATA_ROOT, SUITE_OUT, SUITE_PROBES, CacheOptions, FinetuneOptions,
                       HeadOptions, KnnOptions, SuiteOptions)
from .sources import DATASET_KINDS

# what each probe runs with, and the options of it that the suite sets itself (per cell or from its flags)
PROBE_OPTIONS = {"head": HeadOptions, "sweep": HeadOptions, "knn": KnnOptions, "finetune": FinetuneOptions}
SUITE_SET = {"cache", "out", "seed", "device", "sweep", "data", "dataset", "arch", "weights", "resize", "image_size",
             "loader", "limit", "checkpoint_dir", "resume", "predictions", "plot", "download", "progress", "splits",
             "overwrite", "init_head", "train_data", "test_data"}
# the flags that say which cells run; every other setting must match the one a finished cell was made with
CELL_KEYS = ("archs", "datasets", "probes", "shots", "trials", "out")
NOT_IN_FILE = ("config", "dry_run", "progress")


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the suite: its name in the table, where it is, its --dataset kind, and whether it was
    named alone (read from --data-root) or as NAME=PATH."""

    name: str
    data: str
    kind: str
    from_root: bool = False

    def spelled(self) -> str:
        return self.name if self.from_root else f"{self.name}={self.data}"


@dataclass(frozen=True)
class SuiteConfig:
    """Everything a suite runs with, resolved: the cells' axes, the cache options every cache shares, and
    each probe's options (only what differs from the probe's defaults)."""

    archs: tuple[str, ...]
    datasets: tuple[DatasetEntry, ...]
    probes: tuple[str, ...]
    shots: tuple[int | None, ...]  # None: the whole train split
    trials: int
    val_shots: int | None
    out: Path
    cache: dict
    probe_options: dict[str, dict]
    progress: bool = True

    def cache_options(self, arch: str, dataset: DatasetEntry, out: Path) -> CacheOptions:
        return CacheOptions(**{**self.cache, "data": dataset.data, "dataset": dataset.kind, "arch": arch,
                               "out": str(out), "resume": True, "progress": self.progress})

    def head_options(self, probe: str, cache: Path, seed: int, out: Path) -> HeadOptions:
        return HeadOptions(**self.probe_options.get(probe, {}), cache=str(cache), seed=seed, out=str(out),
                           device=self.cache.get("device", "auto"), sweep=probe == "sweep")

    def knn_options(self, cache: Path, seed: int, neighbours: int) -> KnnOptions:
        """kNN on `cache` with every k capped at the `neighbours` rows a K-shot train split has."""
        opts = KnnOptions(**self.probe_options.get("knn", {}), cache=str(cache), seed=seed,
                          device=self.cache.get("device", "auto"))
        return replace(opts, k=tuple(sorted({min(k, neighbours) for k in opts.k})))

    def finetune_options(self, arch: str, dataset: DatasetEntry, seed: int, checkpoint_dir: Path) -> FinetuneOptions:
        shared = {k: v for k, v in self.cache.items() if k in (*SUITE_CACHE_KEYS, "interpolation")}
        return FinetuneOptions(**{**shared, **self.probe_options.get("finetune", {})}, data=dataset.data,
                               dataset=dataset.kind, arch=arch, seed=seed, checkpoint_dir=str(checkpoint_dir),
                               resume=True, progress=self.progress)

    def settings(self) -> dict:
        """The TOML document of this configuration (None values left out: TOML has no null)."""
        doc = {"archs": list(self.archs), "datasets": [d.spelled() for d in self.datasets],
               "data_root": next((d.data for d in self.datasets if d.from_root), None),
               "shots": [FULL if s is None else s for s in self.shots],
               "trials": self.trials, "val_shots": self.val_shots, "out": str(self.out),
               **{k: self.cache[k] for k in SUITE_CACHE_KEYS if k in self.cache},
               "cache": {k: v for k, v in self.cache.items() if k not in SUITE_CACHE_KEYS},
               "probes": {p: self.probe_options.get(p, {}) for p in self.probes}}
        return _without_none(doc)


SUITE_CACHE_KEYS = ("weights", "resize", "image_size", "loader", "device", "limit")


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def resolve(opts: SuiteOptions) -> SuiteConfig:
    """The flags over the `--config` file over the defaults, every value checked, in one line on error."""
    file = read_toml(opts.config) if opts.config else {}
    where = f"--config {opts.config}"
    known = {f.name for f in cli_fields(SuiteOptions)} - set(NOT_IN_FILE)
    unknown = sorted(set(file) - known - {"cache", "probes"})
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(known))}, [cache], "
                         "[probes.NAME]")
    tables = file.pop("probes", None)
    if isinstance(tables, dict):  # [probes.NAME] tables: these probes run, with these options
        file["probes"], tables = list(tables), tables
    elif tables is not None:
        file["probes"], tables = tables, {}
    given = {f.name: getattr(opts, f.name) for f in cli_fields(SuiteOptions)}
    merged = replace(opts, **{k: _as_option(SuiteOptions, k, v, where) for k, v in file.items() if k in known
                              and given[k] is None})
    if not merged.archs or not merged.datasets:
        raise InputError("name the backbones and datasets: --archs A,B --datasets X,Y (or archs and datasets in "
                         "--config)")
    cache = {**_table(file, "cache", CacheOptions, where),
             **{k: getattr(merged, k) for k in SUITE_CACHE_KEYS if getattr(merged, k) is not None}}
    probes = tuple(dict.fromkeys(merged.probes or SUITE_PROBES))
    config = SuiteConfig(
        archs=_unique(merged.archs, "--archs"), datasets=datasets(merged), probes=probes,
        shots=parse_shots(merged.shots or (FULL,)), trials=merged.trials or 1, val_shots=merged.val_shots,
        out=Path(merged.out or SUITE_OUT), cache=cache, probe_options=probe_tables(tables or {}, where),
        progress=merged.progress)
    check(config)
    return config


def read_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:
        raise InputError("--config needs Python 3.11 or later (tomllib)") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"--config {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read --config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"--config {path} is not TOML: {exc}") from None


def _as_option(cls, name: str, value: Any, where: str) -> Any:
    """A TOML value as the field `name` of `cls` holds it (a list as a tuple; "a,b" as a list), or one line
    for a value of another type; the ranges are `Checked` when the options are made."""
    hint = typing.get_type_hints(cls)[name]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    if any(typing.get_origin(k) is tuple for k in kinds):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise InputError(f"{where}: {name} must be a list, got {value!r}")
        item = typing.get_args(next(k for k in kinds if typing.get_origin(k) is tuple))[0]
        return tuple(str(v).strip() if item is str else _typed(item, v, name, where) for v in items)
    return _typed(kinds, value, name, where)


def _typed(kinds, value: Any, name: str, where: str) -> Any:
    kinds = kinds if isinstance(kinds, list) else [kinds]
    ok = any(isinstance(value, k) and not (k in (int, float) and isinstance(value, bool)) or
             (k is float and isinstance(value, int) and not isinstance(value, bool)) for k in kinds if isinstance(k, type))
    if not ok:
        raise InputError(f"{where}: {name} must be {' or '.join(k.__name__ for k in kinds if isinstance(k, type))}, "
                         f"got {value!r}")
    return value


def _table(file: dict, name: str, cls, where: str, owned: set[str] = SUITE_SET | set(SUITE_CACHE_KEYS),
           label: str | None = None) -> dict:
    """The `[name]` table of the file (`label`: its full name) as options of `cls`, refusing unknown keys and
    those the suite sets."""
    table, name = file.get(name, {}), label or name
    if not isinstance(table, dict):
        raise InputError(f"{where}: {name} must be a table ([{name}])")
    allowed = {f.name for f in cli_fields(cls)} - owned
    for key in table:
        if key not in allowed:
            reason = "is set by the suite" if key in owned else "is not one of its options"
            raise InputError(f"{where}: [{name}] {key} {reason}; it takes {', '.join(sorted(allowed))}")
    values = {key: _as_option(cls, key, value, f"{where} [{name}]") for key, value in table.items()}
    cls(**values)  # the ranges and choices, checked now
    return values


def probe_tables(tables: dict, where: str) -> dict[str, dict]:
    if not isinstance(tables, dict):
        raise InputError(f"{where}: probes must be a list of names or [probes.NAME] tables")
    unknown = sorted(set(tables) - set(PROBES))
    if unknown:
        raise InputError(f"{where}: unknown probe [probes.{unknown[0]}]; the probes are {', '.join(PROBES)}")
    return {name: non_default(PROBE_OPTIONS[name], _table(tables, name, PROBE_OPTIONS[name], where, SUITE_SET,
                                                          f"probes.{name}")) for name in tables}


def non_default(cls, values: dict) -> dict:
    """`values` less those equal to `cls`'s defaults: a probe's table says only what this suite changed, so
    OUT/suite.toml reads as what differs and an option spelled out at its default is no other setting."""
    defaults = {f.name: f.default for f in cli_fields(cls)}
    return {key: value for key, value in values.items() if value != defaults[key]}


def datasets(opts: SuiteOptions) -> tuple[DatasetEntry, ...]:
    """--datasets as entries: a bare --dataset name is read from --data-root, NAME=PATH from PATH."""
    entries = []
    for item in _unique(opts.datasets, "--datasets"):
        name, _, path = item.partition("=")
        if path:
            entries.append(DatasetEntry(name, path, name if name in DATASET_KINDS else "auto"))
        elif item in DATASET_KINDS and item != "auto":
            entries.append(DatasetEntry(item, opts.data_root or SUITE_DATA_ROOT, item, from_root=True))
        else:
            raise InputError(f"--datasets {item!r}: give a --dataset name (cifar10, cifar100, pets, ...) or NAME=PATH")
    names = [e.name for e in entries]
    if len(set(names)) < len(names) or not all(names):
        raise InputError(f"--datasets: every dataset needs a name of its own, got {', '.join(names)}")
    return tuple(entries)


def parse_shots(values: tuple[str, ...]) -> tuple[int | None, ...]:
    """--shots as ints (None: full), in the order given, each once."""
    shots = []
    for value in values:
        text = str(value).strip()
        if text != FULL and not (text.isdigit() and int(text) >= 1):
            raise InputError(f"--shots must be {FULL} or a whole number >= 1, got {text!r}")
        shots.append(None if text == FULL else int(text))
    return tuple(dict.fromkeys(shots))


def _unique(values: tuple[str, ...], flag: str) -> tuple[str, ...]:
    if len(set(values)) < len(values):
        raise InputError(f"{flag} names one more than once: {','.join(values)}")
    return tuple(values)


def check(config: SuiteConfig) -> None:
    """What no cell could run with, before any work: unknown archs, sizes no crop could have, probe options that
    the probes refuse, and a validation of 0 (which would choose on test)."""
    from . import finetune, head, knn
    from .backbone import preprocess_for

    for arch in config.archs:
        preprocess_for(arch, config.cache.get("weights", "DEFAULT"), config.cache.get("resize"),
                       config.cache.get("image_size"), config.cache.get("interpolation"))
    for probe in config.probes:
        if config.probe_options.get(probe, {}).get("val_fraction", 1) == 0:
            raise InputError(f"[probes.{probe}] val_fraction must be > 0: the suite never chooses on test")
    for probe in set(config.probes) & {"head", "sweep"}:
        head.check_options(config.head_options(probe, Path("x.h5"), 0, Path("x.head.pt")))
    if "knn" in config.probes:
        knn.check_options(config.knn_options(Path("x.h5"), 0, 1))
    if "finetune" in config.probes:
        finetune.check_options(config.finetune_options(config.archs[0], config.datasets[0], 0, Path("x")))


def to_toml(doc: dict) -> str:
    """`settings()` as TOML: the plain keys, then [cache] and a [probes.NAME] table per probe that runs."""
    tables = {"cache": doc.get("cache", {}), **{f"probes.{k}": v for k, v in doc.get("probes", {}).items()}}
    lines = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if k not in ("cache", "probes")]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def changed_settings(before: dict, now: dict) -> list[str]:
    """The settings that differ between two `settings()` documents: everything but which cells run (a probe's
    options count where both ran it, less those at their defaults; --data-root where both read from it)."""
    keys = sorted((set(before) | set(now)) - set(CELL_KEYS) - {"probes", "data_root"})
    changed = [f"{k} {before.get(k)!r} vs {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]
    if "data_root" in before and "data_root" in now and before["data_root"] != now["data_root"]:
        changed.append(f"data_root {before['data_root']!r} vs {now['data_root']!r}")
    probes_then, probes_now = (probe_tables(doc.get("probes", {}), "suite.toml") for doc in (before, now))
    return changed + [f"[probes.{p}] {probes_then[p]} vs {probes_now[p]}" for p in probes_then
                      if p in probes_now and probes_then[p] != probes_now[p]]
