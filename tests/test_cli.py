"""The command line as a user meets it: instant help (no torch, DALI or h5py) and info (no torch), every
number's and size's range checked where the option is declared (CLI and Python API alike), errors naming the
command, docs/cli.md current."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run, write_cache

from fastfeat.docs import OUT, SOURCES, cli_markdown, sources_markdown
from fastfeat.errors import InputError
from fastfeat.options import parse_size
from fastfeat.settings import CacheOptions, HeadOptions, KnnOptions, PredictOptions
from fastfeat.sources import KINDS

ROOT = Path(__file__).resolve().parent.parent
NOT_LOADED = "import sys; {}; print(sorted(m for m in {} if m in sys.modules))"
HEAVY = ("torch", "nvidia.dali")


def _loaded_after(code: str, heavy: tuple[str, ...] = HEAVY) -> str:
    """The `heavy` modules a fresh interpreter holds after running `code`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", NOT_LOADED.format(code, heavy)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["cache", "--help"], ["train-head", "--help"],
                                  ["predict", "--help"]])
def test_help_and_version_import_neither_torch_nor_dali_nor_h5py(argv):
    code = f"from fastfeat.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass"
    assert _loaded_after(code, (*HEAVY, "h5py")) == "[]"


def test_info_on_a_cache_imports_neither_torch_nor_dali(tmp_path):
    rng = np.random.default_rng(0)
    cache = write_cache(tmp_path / "c.h5", {"train": (rng.normal(size=(4, 3)).astype(np.float16), np.array([0, 1, 0, 1]))})
    assert _loaded_after(f"from fastfeat.cli import main; assert main(['info', {str(cache)!r}]) == 0") == "[]"


@pytest.mark.parametrize("argv, message", [
    (["cache", "--seed", "-1"], "--seed must be a whole number >= 0 and < 4294967296, got -1"),
    (["cache", "--seed", "99999999999999999999"], "--seed must be a whole number >= 0 and < 4294967296"),
    (["cache", "--view-seed", "-1"], "--view-seed must be a whole number >= 0"),
    (["train-head", "--seed", "-1"], "--seed must be"),
    (["knn", "--seed", "4294967296"], "--seed must be"),
    (["finetune", "--seed", "-1"], "--seed must be"),
    (["predict", "--model", "m.pt", "--topk", "0", "a.jpg"], "--topk must be a whole number >= 1, got 0"),
    (["predict", "--model", "m.pt", "--topk", "-1", "a.jpg"], "--topk must be a whole number >= 1, got -1"),
    (["predict", "--model", "m.pt", "--batch-size", "0", "a.jpg"], "--batch-size must be a whole number >= 1"),
    (["train-head", "--sweep", "--lrs", ""], "--lrs needs at least one value"),
    (["train-head", "--sweep", "--lrs", ",,"], "--lrs needs at least one value"),
    (["train-head", "--val-fraction", "1"], "--val-fraction must be a finite number >= 0 and < 1, got 1.0"),
    (["train-head", "--lr", "0"], "--lr must be a finite number > 0"),
    (["knn", "--k", "0,10"], "--k must be a whole number >= 1, got 0"),
    (["cache", "--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    (["cache", "--limit", "0"], "--limit must be"),
    (["bench", "cache", "--images", "9"], "--images must be a whole number >= 10"),
    (["train-head", "--optimizer", "adam"], "--optimizer must be one of sgd, adamw, lbfgs, got 'adam'"),
    (["cache", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_values_are_one_line_naming_the_command_and_flag(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"fastfeat {argv[0]}: error: ") and message in err[0], err


@pytest.mark.parametrize("make, message", [
    (lambda: CacheOptions(seed=-1), "--seed must be"),
    (lambda: CacheOptions(view_seed=2**32), "--view-seed must be"),
    (lambda: HeadOptions(lrs=()), "--lrs needs at least one value"),
    (lambda: HeadOptions(label_smoothing=float("nan")), "--label-smoothing must be a finite number"),
    (lambda: KnnOptions(temperature=0.0), "--temperature must be a finite number > 0"),
    (lambda: PredictOptions(model="m.pt", topk=0), "--topk must be"),
])
def test_the_python_api_checks_the_same_ranges(make, message):
    with pytest.raises(InputError, match=message):
        make()


def test_in_range_values_pass():
    assert CacheOptions(seed=2**32 - 1, view_seed=0).seed == 2**32 - 1
    assert HeadOptions(lrs=(0.1,), val_fraction=0.0).lrs == (0.1,)


def test_sizes_in_bytes():
    assert parse_size("512MB") == 512 * 10**6 and parse_size("8GB") == 8 * 10**9 and parse_size(" 100 ") == 100
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("64 kib") == 2**16 and parse_size(".5k") == 512
    assert [parse_size(bad) for bad in ("0", "-1GB", "lots", "", "1.2.3GB", "5XB", "0.1B", "1e9")] == [0] * 8
    assert HeadOptions(memory_budget="2MiB").memory_budget == 2**21 and KnnOptions(memory_budget=7).memory_budget == 7
    assert HeadOptions().memory_budget is None


@pytest.mark.parametrize("budget", ["0", "-1GB", "lots", 0, 1.5, True])
@pytest.mark.parametrize("command, options", [("train-head", HeadOptions), ("knn", KnnOptions)])
def test_a_bad_size_is_the_same_line_from_the_cli_and_the_api(budget, command, options, capsys):
    """Refused where --memory-budget is declared, before the cache is looked for."""
    with pytest.raises(InputError) as api:
        options(memory_budget=budget)
    assert str(api.value) == f"--memory-budget must be a positive size such as 512MB or 8GB, got {budget!r}"
    if isinstance(budget, str):
        code, out, err = run([command, "--cache", "missing.h5", f"--memory-budget={budget}"], capsys)
        assert (code, out, err) == (2, "", [f"fastfeat {command}: error: {api.value}"])


def test_docs_cli_md_is_what_the_parser_prints_now():
    assert OUT.read_text() == cli_markdown(), "docs/cli.md is stale: run python -m fastfeat.docs"


def test_docs_sources_md_lists_every_kind_as_the_table_has_it():
    page = SOURCES.read_text()
    assert page == sources_markdown(page), "docs/sources.md is stale: run python -m fastfeat.docs"
    assert all(f"| `{kind}` |" in page for kind in KINDS) and "| `webdataset` | &lt;split>/\\*.tar" in page
