"""The `fastfeat` command line: argument parsing over the Python API, one-line errors."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .distributed import is_main_process
from .errors import FastfeatError, InputError
from .reporting import human_bytes, write_json


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def finite_float(text: str) -> float:
    """argparse type: a finite number (float() also accepts nan and inf, which no training can use)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


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

    th = sub.add_parser("train-head", help="train the 512->K head from a feature cache, in seconds")
    th.add_argument("--cache", default="data/cifar10-resnet18.h5", help="a fastfeat cache (default: data/cifar10-resnet18.h5)")
    th.add_argument("--epochs", type=int, default=20)
    th.add_argument("--batch-size", type=int, default=1024)
    th.add_argument("--lr", type=finite_float, default=None, help="default: 0.2 (sgd), 3e-3 (adamw), 1.0 (lbfgs)")
    th.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw", "lbfgs"])
    th.add_argument("--weight-decay", type=finite_float, default=None,
                    help="L2 on the weight; default: 100/train rows (sgd, lbfgs), 0.5 decoupled (adamw)")
    th.add_argument("--label-smoothing", type=finite_float, default=0.0)
    th.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=True,
                    help="standardise features with the train split's mean and std (default: on)")
    th.add_argument("--seed", type=int, default=0)
    th.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    th.add_argument("--out", default=None, help="head file (default: <cache stem>.head.pt beside the cache)")
    th.add_argument("--metrics", default=None, help="write metrics to this JSON file")
    th.set_defaults(run=run_train_head)

    ft = sub.add_parser("finetune", help="fine-tune the whole network on augmented batches (AMP)")
    add_data_args(ft)
    ft.add_argument("--jitter", type=finite_float, default=0.0, help="ColorJitter strength (the recipe's ColorJitter() is 0)")
    add_model_args(ft, batch_size=64)
    g = ft.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--lr", type=finite_float, default=0.01)
    g.add_argument("--backbone-lr-scale", type=finite_float, default=0.1, help="backbone lr = lr x this")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    g.add_argument("--schedule", default="cosine", choices=["cosine", "step", "none"])
    g.add_argument("--warmup-epochs", type=finite_float, default=0.5)
    g.add_argument("--weight-decay", type=finite_float, default=5e-4)
    g.add_argument("--label-smoothing", type=finite_float, default=0.1)
    g.add_argument("--freeze", default="none", choices=["none", "stem", "layer1", "layer2", "layer3"])
    g.add_argument("--init-head", default=None, help="start from a head made by train-head on the same backbone")
    g.add_argument("--checkpoint-dir", default="data/finetune")
    g.add_argument("--resume", action="store_true", help="continue from CHECKPOINT_DIR/last.pt")
    ft.set_defaults(run=run_finetune)

    pr = sub.add_parser("predict", help="classify images with a fine-tuned checkpoint or a head")
    pr.add_argument("images", nargs="*", help="image files")
    pr.add_argument("--model", required=True, help="finetune checkpoint (last.pt/best.pt) or head file")
    pr.add_argument("--data", default=None, help="report accuracy on this dataset's --split instead")
    pr.add_argument("--split", default="test", choices=["train", "test"])
    pr.add_argument("--limit", type=int, default=None)
    pr.add_argument("--loader", default="auto", choices=["auto", "dali", "torch"])
    pr.add_argument("--weights", default=None, help="backbone weights FILE for a head trained on a file")
    pr.add_argument("--topk", type=int, default=3)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--batch-size", type=int, default=128)
    pr.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    pr.add_argument("--metrics", default=None)
    pr.set_defaults(run=run_predict)
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
    if not is_main_process():
        return
    print(
        f"cached {result.images} images in {result.seconds:.1f} s ({result.images_per_second:.1f} img/s) "
        f"loader={result.loader} device={result.device} precision={result.precision} "
        f"-> {result.out} ({human_bytes(result.size_bytes)})"
    )
    if args.metrics:
        write_json(args.metrics, result.metrics())


def run_train_head(args: argparse.Namespace) -> None:
    from .head import HeadOptions, train_head

    _check_writable(args.metrics)
    result = train_head(_options(HeadOptions, args))
    print(f"trained the head in {result.seconds:.2f} s: valid acc {result.final_valid_acc:.4f} "
          f"(best {result.best_valid_acc:.4f}) -> {result.out}")
    if args.metrics:
        write_json(args.metrics, result.metrics())


def run_finetune(args: argparse.Namespace) -> None:
    from .finetune import FinetuneOptions, finetune

    _check_writable(args.metrics)
    result = finetune(_options(FinetuneOptions, args))
    if not is_main_process():
        return
    metrics = result.metrics()
    print(
        f"fine-tuned {len(result.history)} epochs: best valid acc {result.best_valid_acc:.4f}, "
        f"{metrics['train_images_per_second']:.1f} train img/s -> {result.checkpoint} (best: {result.best})"
    )
    if args.metrics:
        write_json(args.metrics, metrics)


def run_predict(args: argparse.Namespace) -> None:
    from .predict import Predictor, load_classifier

    if bool(args.images) == bool(args.data):
        raise InputError("give either image files or --data DIR")
    predictor = Predictor(load_classifier(args.model, args.weights), args.device, args.amp)
    if args.data:
        accuracy, images = predictor.accuracy(args.data, args.split, args.loader, args.batch_size, args.limit)
        print(f"accuracy {accuracy:.4f} on {images} {args.split} images of {args.data}")
        if args.metrics:
            write_json(args.metrics, {"command": "predict", "accuracy": accuracy, "images": images, "model": args.model})
        return
    for path, top in zip(args.images, predictor.predict_files(args.images, args.topk)):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))


class Terminated(KeyboardInterrupt):
    """SIGTERM: a scheduler's stop, or torchrun stopping the other ranks after one failed."""


def _terminate(signum, frame):
    raise Terminated


def _peer_failure(exc: Exception) -> bool:
    """A collective that broke because another torchrun rank stopped (its own error is its line)."""
    import torch.distributed as dist

    lost_peer = isinstance(exc, dist.DistError) or "closed by peer" in str(exc) or "reset by peer" in str(exc)
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and lost_peer


def _failure_line(command: str, exc: BaseException) -> tuple[str, int] | None:
    """The one line and exit code for a failure the user can act on; None for a bug (traceback)."""
    resume = "" if command in ("train-head", "predict") else "; rerun with --resume to continue"
    if isinstance(exc, FastfeatError):
        return f"error: {exc}", exc.exit_code
    if isinstance(exc, Terminated):
        return f"terminated (under torchrun: another rank failed, see its error){resume}", 143
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted{resume}", 130
    if isinstance(exc, MemoryError):
        return "error: out of memory; try a smaller --batch-size", 1
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, a RuntimeError subclass
        return "error: GPU out of memory; try a smaller --batch-size", 1
    if _peer_failure(exc):
        return f"error: stopped because another rank failed (see its error){resume}", 1
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args.run(args)
    except (Exception, KeyboardInterrupt) as exc:
        failure = _failure_line(args.command, exc)
        if failure is None:
            raise
        print(f"fastfeat {args.command}: {failure[0]}", file=sys.stderr)
        return failure[1]
    return 0
