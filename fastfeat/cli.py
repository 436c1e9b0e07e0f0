"""The `fastfeat` command line: argument parsing over the Python API, one-line errors."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import FastfeatError, InputError
from .reporting import human_bytes, write_json


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _splits(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data", help="dataset directory (default: data)")
    g.add_argument("--dataset", default="auto", choices=["auto", "cifar10", "folder"])
    g.add_argument("--download", action="store_true", help="download CIFAR-10 into --data first")
    g.add_argument("--limit", type=int, default=None, help="at most N images per split")
    g.add_argument("--loader", default="auto", choices=["auto", "dali", "torch"])
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("--resize", type=int, default=256, help="shorter side before the center crop (default: 256)")


def add_model_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    g = p.add_argument_group("model and precision")
    g.add_argument("--weights", default="imagenet", help="imagenet | none | FILE (a resnet18 state dict)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--batch-size", type=int, default=batch_size)
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision (default: on)")
    g.add_argument("--amp-dtype", choices=["bfloat16", "float16"], default=None, help="force the autocast dtype")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--metrics", default=None, help="write metrics to this JSON file")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastfeat", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastfeat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    cache = sub.add_parser("cache", help="one pass of the frozen backbone into an HDF5 feature cache")
    add_data_args(cache)
    cache.add_argument("--splits", type=_splits, default=("train", "test"), help="comma-separated (default: train,test)")
    add_model_args(cache, batch_size=128)
    g = cache.add_argument_group("output")
    g.add_argument("--out", default=None, help="cache file (default: data/<dataset>-resnet18.h5)")
    g.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored feature dtype")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run")
    g.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    cache.set_defaults(run=run_cache)
    return parser


def _check_writable(path: str | None) -> None:
    if path is None:
        return
    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: {parent} is not writable")


def _options(cls, args: argparse.Namespace):
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in vars(args).items() if k in fields})


def run_cache(args: argparse.Namespace) -> None:
    from .cache import CacheOptions, build_cache

    _check_writable(args.metrics)
    result = build_cache(_options(CacheOptions, args))
    print(
        f"cached {result.images} images in {result.seconds:.1f} s ({result.images_per_second:.1f} img/s) "
        f"loader={result.loader} device={result.device} precision={result.precision} "
        f"-> {result.out} ({human_bytes(result.size_bytes)})"
    )
    if args.metrics:
        write_json(args.metrics, result.metrics())


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args.run(args)
    except FastfeatError as exc:
        print(f"fastfeat {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"fastfeat {args.command}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"fastfeat {args.command}: error: out of memory; try a smaller --batch-size", file=sys.stderr)
        return 1
    except Exception as exc:  # torch.OutOfMemoryError is a RuntimeError subclass
        if type(exc).__name__ == "OutOfMemoryError":
            print(f"fastfeat {args.command}: error: GPU out of memory; try a smaller --batch-size", file=sys.stderr)
            return 1
        raise
    return 0
