"""Options are defined once, as dataclass fields; the command line is built from them.

`option(default, help, ...)` declares a field with what its flag needs (help, choices, group);
`add_options(parser, cls)` turns the fields into flags (defaults shown in --help), and
`from_args(cls, args)` builds the options back, so the CLI and the Python API cannot drift apart.
"""
from __future__ import annotations

import argparse
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from .backbone import DEFAULT_ARCH, Backbone, build_backbone, preprocess_for
from .loaders import LOADERS
from .runtime import AMP_DTYPES
from .sources import DATASET_KINDS, SourceInputs
from .transforms import INTERPOLATIONS, Preprocess


def option(default: Any, help: str, *, choices: tuple | None = None, group: str = "options") -> Any:
    """A dataclass field that is also a command-line flag (`--field-name`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


def finite_float(text: str) -> float:
    """argparse type: a finite number (float() also accepts nan and inf, which no training can use)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


PARSERS = {int: int, float: finite_float, str: str}


def _parser_for(hint) -> typing.Callable[[str], Any]:
    """The argparse type of a field's annotation: `int`, `float | None`, or a comma-separated list
    for `tuple[str, ...]` and `tuple[int, ...]`."""
    if typing.get_origin(hint) is tuple:
        return _comma_list(_parser_for(typing.get_args(hint)[0]))
    optional = [arg for arg in typing.get_args(hint) if arg is not type(None)]  # `X | None`
    return _parser_for(optional[0]) if optional else PARSERS[hint]


def _comma_list(item: typing.Callable[[str], Any]) -> typing.Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(item(part.strip()) for part in text.split(",") if part.strip())

    parse.__name__ = f"comma-separated {item.__name__}"  # argparse names it in "invalid ... value"
    return parse


def cli_fields(cls) -> list:
    return [f for f in fields(cls) if "help" in f.metadata]


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per option field of `cls`, in declaration order, grouped as declared."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in cli_fields(cls):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        # None: decided later (e.g. by what a file holds); str: "auto" (--compile)
        if hints[f.name] in (bool, bool | None, bool | str):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        else:
            group.add_argument(flag, type=_parser_for(hints[f.name]), default=f.default, choices=meta["choices"],
                               help=meta["help"])


def from_args(cls, args: argparse.Namespace):
    """The options `cls` from parsed arguments (every option field has its flag)."""
    return cls(**{f.name: getattr(args, f.name) for f in cli_fields(cls)})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, argparse.SUPPRESS) or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)


# ---- options shared by the commands that run a backbone over images ------------------------------------


@dataclass
class DataOptions:
    data: str = option("data", "dataset directory: cifar-10-batches-py/, cifar-100-python/, train/ and test/ "
                               "(or val/) class folders, train.csv and test.csv file lists, train/*.tar and "
                               "test/*.tar shards; or a shard pattern (DIR/train-{000000..000099}.tar, globs)",
                       group="data")
    dataset: str = option("auto", "dataset layout (auto: whichever --data holds; cifar100: its 100 fine labels; "
                                  "list: path,label rows; mnist, dtd, ...: torchvision's layouts; see docs/sources.md)",
                          choices=DATASET_KINDS, group="data")
    download: bool = option(False, "download the --dataset (auto: CIFAR-10) into --data first, with torchvision",
                            group="data")
    limit: int | None = option(None, "at most N images per split: a class-balanced subset drawn with --seed, "
                                     "kept in dataset order", group="data")
    loader: str = option("auto", "decode and resize pipeline (auto: dali when installed, else torch)",
                         choices=LOADERS, group="data")
    # webdataset shards: one pattern per split, and where the label is
    train_data: str | None = option(None, "the train split's shard pattern (webdataset)", group="data")
    test_data: str | None = option(None, "the test split's shard pattern (webdataset)", group="data")
    label_key: str = option(SourceInputs.label_key, "webdataset: the member (.cls) or json field holding the label",
                            group="data")

    def source_inputs(self) -> SourceInputs:
        given = (("train", self.train_data), ("test", self.test_data))
        return SourceInputs(tuple((split, data) for split, data in given if data), self.label_key)


@dataclass
class BackboneOptions:
    arch: str = option(DEFAULT_ARCH, "a torchvision classification model (see `fastfeat models`) or timm:NAME",
                       group="backbone")
    weights: str = option("DEFAULT", "DEFAULT (the arch's best ImageNet weights; `imagenet` is the same), a weights "
                                     "name such as IMAGENET1K_V2, none (random from --seed) or FILE (a state dict)",
                          group="backbone")
    resize: int | None = option(None, "shorter side before the center crop (default: the weights' own)",
                                group="backbone")
    image_size: int | None = option(None, "center-crop size (default: the weights' own)", group="backbone")
    interpolation: str | None = option(None, "resize filter (default: the weights' own)", choices=INTERPOLATIONS,
                                       group="backbone")
    seed: int = option(0, "random init for --weights none; the --limit subset; shuffles and augmentation",
                       group="backbone")

    def preprocess(self) -> Preprocess:
        """The weights' own preprocessing with the --resize, --image-size and --interpolation given."""
        return preprocess_for(self.arch, self.weights, self.resize, self.image_size, self.interpolation)

    def build(self) -> Backbone:
        return build_backbone(self.arch, self.weights, self.seed, self.preprocess())


@dataclass
class RunOptions:
    device: str = option("auto", "auto, cpu, cuda or cuda:N", group="device and precision")
    batch_size: int = option(128, "images per batch (per rank under torchrun)", group="device and precision")
    amp: bool = option(True, "mixed precision: the fastest this device runs natively (bf16 on CUDA GPUs with bf16 "
                             "and on CPUs with native bf16 kernels, fp16 on older GPUs; fp32 where none)",
                       group="device and precision")
    amp_dtype: str | None = option(None, "force the autocast dtype, even where it is emulated (slow)",
                                   choices=tuple(AMP_DTYPES), group="device and precision")
    channels_last: bool = option(True, "channels_last memory format", group="device and precision")
    compile: bool | str = option("auto", "torch.compile the model (inductor; BatchNorm folded when frozen); auto: "
                                         "when the run has enough images to pay back the compile time",
                                 group="device and precision")
    progress: bool = option(True, "progress bars (plain lines when stderr is not a terminal)",
                            group="device and precision")
