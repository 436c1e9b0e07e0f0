"""The `fastfeat` command line: argument parsing over the Python API, one-line errors."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import FastfeatError, InputError
from .options import HelpFormatter, add_options, from_args
from .reporting import human_bytes, write_json


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _command(sub, name: str, help: str, run, options, metrics: bool = True) -> argparse.ArgumentParser:
    """A subcommand whose flags come from the option dataclass `options` (defaults shown in --help), and
    `--metrics` where the command has results to write."""
    from .settings import MetricsOptions

    parser = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    add_options(parser, options)
    if metrics:
        add_options(parser, MetricsOptions)
    parser.set_defaults(run=run, options=options)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from .settings import (
        BenchOptions,
        CacheOptions,
        FinetuneOptions,
        HeadOptions,
        InfoOptions,
        KnnOptions,
        ModelsOptions,
        PredictOptions,
        SuiteOptions,
    )

    parser = _Parser(prog="fastfeat", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastfeat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _command(sub, "cache", "one pass of the frozen backbone into an HDF5 feature cache", run_cache, CacheOptions)
    _command(sub, "train-head", "train the linear head on a feature cache, in seconds", run_train_head, HeadOptions)
    _command(sub, "finetune", "fine-tune the whole network on augmented batches (AMP)", run_finetune, FinetuneOptions)
    _command(sub, "knn", "weighted k-nearest-neighbour accuracy on a feature cache (DINO's protocol)", run_knn,
             KnnOptions)
    _command(sub, "suite", "many backbones x many datasets: each cached once, then heads, sweeps, kNN (and fine-tuning) "
                           "at several shots and trials, into one results table; resumable", run_suite, SuiteOptions,
             metrics=False)
    _command(sub, "bench", "where the time goes: loader only, model only and end to end on the same images, "
                           "the bottleneck and the efficiency", run_bench, BenchOptions, metrics=False)
    _command(sub, "predict", "classify images with a fine-tuned checkpoint or a head", run_predict, PredictOptions)
    _command(sub, "info", "what a cache, head or checkpoint holds", run_info, InfoOptions, metrics=False)
    _command(sub, "models", "list the backbones: feature size, parameters, preprocessing, weights", run_models,
             ModelsOptions, metrics=False)
    return parser


def _check_writable(path: str | None, flag: str = "--metrics") -> None:
    from .outputs import check_output

    check_output(path, flag)


def run_cache(args: argparse.Namespace) -> None:
    from .cache import CacheOptions, build_cache

    _check_writable(args.metrics)
    result = build_cache(from_args(CacheOptions, args))
    from .distributed import is_main_process

    if not is_main_process():
        return
    print(
        f"cached {result.images} images" + (f" and {result.views} views" if result.views else "") +
        f" in {result.seconds:.1f} s ({result.images_per_second:.1f} img/s) "
        f"loader={result.loader} device={result.device} precision={result.precision} "
        f"-> {result.out} ({human_bytes(result.size_bytes)})"
    )
    if args.metrics:
        write_json(args.metrics, result.metrics())


def run_train_head(args: argparse.Namespace) -> None:
    from .head import HeadOptions, train_head
    from .sweep import sweep_table

    _check_writable(args.metrics)
    result = train_head(from_args(HeadOptions, args))
    validated = result.plan.describe()
    if result.sweep is not None:
        best, heads = result.sweep["best"], len(result.sweep["lrs"]) * len(result.sweep["weight_decays"])
        print("\n".join(sweep_table(result.sweep)))
        refit = "refit on train + validation" if result.sweep["refit"] else "not refit (--no-refit)"
        print(f"swept {heads} heads in {result.sweep['seconds']:.2f} s: best lr {best['lr']:g}, weight decay "
              f"{best['weight_decay']:.3g}, valid acc {best['val_acc']:.4f} ({validated}), {refit}; ", end="")
    else:
        print(f"trained the head in {result.seconds:.2f} s: valid acc {result.final_valid_acc:.4f} "
              f"(best {result.best_valid_acc:.4f}, {validated}); ", end="")
    print(f"test acc {result.test['top1']:.4f}, evaluated once -> {result.out}")
    print(result.views_line())
    _written(args)
    if args.metrics:
        write_json(args.metrics, result.metrics())


def _written(args: argparse.Namespace) -> None:
    """Say where `--predictions` and `--plot` went."""
    if getattr(args, "predictions", None):
        print(f"predictions -> {args.predictions}")
    if getattr(args, "plot", None):
        print(f"plots -> {args.plot}")


def run_knn(args: argparse.Namespace) -> None:
    from .knn import KnnOptions, knn_evaluate

    _check_writable(args.metrics)
    result = knn_evaluate(from_args(KnnOptions, args))
    print("\n".join(result.table()))
    print(result.summary())
    if args.metrics:
        write_json(args.metrics, result.metrics())


def run_finetune(args: argparse.Namespace) -> None:
    from .finetune import FinetuneOptions, finetune

    opts = from_args(FinetuneOptions, args)
    if opts.freeze == "help":
        from .backbone import build_backbone
        from .freezing import freeze_help

        print(freeze_help(build_backbone(opts.arch, "none", pre=opts.preprocess()).model, opts.arch))
        return
    _check_writable(args.metrics)
    result = finetune(opts)
    from .distributed import is_main_process

    if not is_main_process():
        return
    print(result.summary())
    if args.metrics:
        write_json(args.metrics, result.metrics())


def run_suite(args: argparse.Namespace) -> None:
    from .settings import SuiteOptions
    from .suite import run_suite as suite

    result = suite(from_args(SuiteOptions, args))
    if result.written:
        print(f"{result.ran} cells run, {result.skipped} finished before, in {result.seconds:.1f} s -> "
              + ", ".join(str(p) for p in [result.out / "results.csv", *result.written]))
    if result.failed:
        raise FastfeatError(f"{len(result.failed)} of {result.cells} cells failed (their reasons are in "
                            f"{result.out / 'results.csv'} and {result.out / 'summary.md'})")


def run_bench(args: argparse.Namespace) -> None:
    from .bench import BenchOptions, benchmark

    _check_writable(args.json, "--json")
    result = benchmark(from_args(BenchOptions, args), log=print)
    print("\n".join(result.table()))
    if args.json:
        write_json(args.json, result.metrics())


def run_predict(args: argparse.Namespace) -> None:
    from .predict import Predictor, load_classifier
    from .settings import PredictOptions

    metrics, args = args.metrics, from_args(PredictOptions, args)
    if bool(args.images) == bool(args.data):
        raise InputError("give either image files or --data DIR")
    _check_writable(metrics)
    _check_writable(args.predictions, "--predictions")
    predictor = Predictor(load_classifier(args.model, args.weights), args.device, args.amp, args.tta)
    if args.data:
        from .evaluation import classification_report, write_predictions

        evaluation = predictor.evaluate(args.data, args.split, args.loader, args.batch_size, args.limit)
        report = classification_report(evaluation.probabilities, evaluation.labels)
        top5 = f", top-5 {report['top5']:.4f}" if "top5" in report else ""
        print(f"accuracy {report['top1']:.4f}{top5}, mean per class {report['mean_per_class']:.4f} "
              f"on {len(evaluation.labels)} {args.split} images of {args.data}")
        if args.predictions:
            write_predictions(args.predictions, evaluation.probabilities, evaluation.labels,
                              predictor.classifier.classes, evaluation.files)
        if metrics:
            write_json(metrics, {"command": "predict", "accuracy": report["top1"], "images": len(evaluation.labels),
                                 "model": args.model, args.split: report, "classes": predictor.classifier.classes})
        return
    for path, top in zip(args.images, predictor.predict_files(args.images, args.topk)):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))


def run_models(args: argparse.Namespace) -> None:
    from .backbone import describe_models
    from .settings import ModelsOptions

    args = from_args(ModelsOptions, args)
    rows = describe_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'arch':<20} {'features':>8} {'params':>8}  {'preprocessing':<24} weights")
    for r in rows:
        pre = f"{r['resize']}->{r['image_size']} {r['interpolation']}" + (" (fixed)" if r["fixed_size"] else "")
        print(f"{r['arch']:<20} {r['feature_dim']:>8} {r['parameters'] / 1e6:>7.1f}M  {pre:<24} {', '.join(r['weights'])}")
    print("\ntimm's models: --arch timm:NAME with pip install 'fastfeat[timm]'")


def run_info(args: argparse.Namespace) -> None:
    import h5py

    from .cache_file import describe_cache
    from .settings import InfoOptions

    args = from_args(InfoOptions, args)
    path = Path(args.file)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    if h5py.is_hdf5(path):
        info = describe_cache(path)
    else:
        from .model_files import describe_model_file  # torch: only for heads and checkpoints

        info = describe_model_file(path)
    info["size"] = human_bytes(path.stat().st_size)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


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
    resume = ("" if command in ("train-head", "predict") else "; rerun the same command to continue" if command == "suite"
              else "; rerun with --resume to continue")
    if isinstance(exc, FastfeatError):
        return f"error: {exc}", exc.exit_code
    if isinstance(exc, Terminated):
        torchrun = " (under torchrun: another rank failed, see its error)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        return f"terminated{torchrun}{resume}", 143
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
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's own message would name only `fastfeat`, not the command
        parser.exit(2, f"fastfeat {args.command}: error: unrecognized arguments: {' '.join(unknown)}\n")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file size limit: writes fail (one line), not the process
    try:
        args.run(args)
    except (Exception, KeyboardInterrupt) as exc:
        failure = _failure_line(args.command, exc)
        if failure is None:
            raise
        print(f"fastfeat {args.command}: {failure[0]}", file=sys.stderr)
        return failure[1]
    finally:  # torchrun's SIGTERM to a rank already ending (its line printed) must not raise in its shutdown
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 0
