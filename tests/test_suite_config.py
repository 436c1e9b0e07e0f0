"""OUT/suite.toml: only the probe options that differ from their defaults, and read back, the same run."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fastfeat.errors import InputError
from fastfeat.settings import SuiteOptions
from fastfeat.suite import write_settings
from fastfeat.suite_config import resolve, to_toml

# head: one option changed, one spelled at its default; sweep: only defaults; knn: its default k, a changed temperature
GIVEN = """archs = ["resnet18", "mobilenet_v3_small"]
datasets = ["shapes=/nowhere/shapes"]
shots = ["full", "5"]
trials = 2
weights = "none"
resize = 36
image_size = 32
[cache]
batch_size = 8
[probes.head]
epochs = 3
batch_size = 1024
[probes.sweep]
epochs = 20
refit = true
[probes.knn]
k = [10, 20, 100, 200]
temperature = 0.1
"""


def resolved(tmp: Path, text: str, name: str = "given.toml"):
    path = tmp / name
    path.write_text(text)
    return resolve(SuiteOptions(config=str(path), out=str(tmp / "out"), progress=False))


def test_written_settings_hold_only_changed_probe_options_and_repeat_the_run(tmp_path):
    config = resolved(tmp_path, GIVEN)
    text = to_toml(config.settings())
    written = tomllib.loads(text)
    assert written["probes"] == {"head": {"epochs": 3}, "sweep": {}, "knn": {"temperature": 0.1}}
    assert written["cache"] == {"batch_size": 8}
    again = resolved(tmp_path, text, "written.toml")
    assert again == config
    assert again.probes == ("head", "sweep", "knn") and again.shots == (None, 5) and again.trials == 2
    assert again.knn_options(Path("x.h5"), 0, 200).k == (10, 20, 100, 200)
    assert again.head_options("head", Path("x.h5"), 1, Path("x.pt")).epochs == 3
    assert again.knn_options(Path("x.h5"), 0, 200).temperature == 0.1


def test_an_option_at_its_default_is_the_same_run_a_changed_one_is_not(tmp_path):
    config = resolved(tmp_path, GIVEN)
    config.out.mkdir()
    (config.out / "suite.toml").write_text(GIVEN)  # as written by hand, defaults spelled out
    write_settings(config)
    assert tomllib.loads((config.out / "suite.toml").read_text())["probes"]["sweep"] == {}
    changed = resolved(tmp_path, GIVEN.replace("temperature = 0.1", "temperature = 0.2"), "changed.toml")
    with pytest.raises(InputError, match=r"other settings \(\[probes.knn\] \{'temperature': 0.1\} vs "
                                         r"\{'temperature': 0.2\}\)"):
        write_settings(changed)
