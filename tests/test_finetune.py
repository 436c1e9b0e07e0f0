"""fastfeat finetune and predict: augmented streams, real backbone updates, AMP, exact resume."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from helpers import CPU_AMP, LOADERS, MEAN, STD

from fastfeat.cli import main
from fastfeat.errors import InputError
from fastfeat.finetune import FinetuneOptions, Trainer, finetune
from fastfeat.loaders import eval_batches, train_batches
from fastfeat.model_files import read_checkpoint
from fastfeat.predict import Predictor, load_classifier
from fastfeat.runtime import autocast
from fastfeat.sources import Split, open_dataset
from fastfeat.transforms import Augment, Preprocess

PRE = Preprocess(resize=73, image_size=64)
TINY = {"image_size": 32, "resize": 32}  # the learnable set's own size: 4x fewer pixels than PRE


def options(data, tmp_path, **kw) -> FinetuneOptions:
    base = dict(data=str(data), image_size=64, resize=73, weights="none", device="cpu", loader="torch", epochs=1,
                batch_size=16, lr=0.05, checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    return FinetuneOptions(**{**base, **kw})


@pytest.mark.parametrize("loader", LOADERS)
def test_train_batches_are_shaped_normalised_and_random_per_sample(sample, loader):
    one = open_dataset(sample, splits=("train",)).splits["train"].images[:1]
    split = Split("train", np.zeros(16, dtype=np.int64), images=np.repeat(one, 16, axis=0))
    order = np.arange(16)
    first = torch.cat(list(train_batches(split, loader, PRE, Augment(jitter=0.4), 8, torch.device("cpu"), order, seed=1)))
    again = torch.cat(list(train_batches(split, loader, PRE, Augment(jitter=0.4), 8, torch.device("cpu"), order, seed=1)))
    other = torch.cat(list(train_batches(split, loader, PRE, Augment(jitter=0.4), 8, torch.device("cpu"), order, seed=2)))
    plain = torch.cat(list(eval_batches(split, loader, PRE, 8, torch.device("cpu"))))
    assert first.shape == (16, 3, 64, 64) and first.dtype == torch.float32
    pixels = first * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4  # normalised from [0, 1] pixels
    assert torch.equal(first, again)  # reproducible from the seed
    assert not torch.equal(first, other)
    # the same image, 16 times: every copy is augmented differently, and none is the plain eval crop
    distinct = {tuple(x.flatten()[:256].round(decimals=3).tolist()) for x in first}
    assert len(distinct) == 16
    assert ((first - plain).abs().mean(dim=(1, 2, 3)) > 0.05).all()


def test_backbone_really_changes_and_frozen_stages_do_not(learnable, tmp_path):
    opts = options(learnable, tmp_path, freeze="layer1")
    init = Trainer(opts, ["dark", "bright"], 1).model.state_dict()
    finetune(opts, log=lambda line: None)
    trained = read_checkpoint(tmp_path / "ckpt" / "last.pt")["model"]
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.1.bn2.running_var"):
        assert torch.equal(init[key], trained[key]), key
    for key in ("layer2.0.conv1.weight", "layer4.1.conv2.weight", "layer4.1.bn2.running_mean", "fc.weight"):
        assert not torch.equal(init[key], trained[key]), key


@pytest.mark.parametrize("batch_size", [40, 160])
def test_recomputed_batchnorm_statistics_are_the_sample_average_of_batch_statistics(learnable, tmp_path, batch_size):
    """After an epoch, the stem's BatchNorm holds the mean of its input over the train images (eval
    preprocessing) and the average of the unbiased per-batch variances, under the trained weights."""
    train = open_dataset(learnable, "cifar10", ("train",)).splits["train"]
    opts = options(learnable, tmp_path, amp=False, batch_size=batch_size, recompute_bn=len(train), **TINY)
    trainer = Trainer(opts, ["dark", "bright"], 1)
    trainer.recompute_batchnorm(train, "torch")  # nothing trained yet: the initial statistics stay
    assert torch.equal(trainer.model.bn1.running_var, torch.ones(64))
    x = next(iter(eval_batches(train.take(np.arange(8)), "torch", trainer.spec.pre, 8, torch.device("cpu"))))
    trainer.train_mode()
    trainer.step(x, torch.from_numpy(train.labels[:8]))
    trainer.recompute_batchnorm(train, "torch")
    with torch.no_grad():
        stem = torch.cat([trainer.model.conv1(b) for b in eval_batches(train, "torch", trainer.spec.pre, 160, torch.device("cpu"))])
    batches = stem.split(batch_size)
    variance = torch.stack([b.transpose(0, 1).flatten(1).var(1) for b in batches]).mean(0)
    torch.testing.assert_close(trainer.model.bn1.running_mean, stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trainer.model.bn1.running_var, variance, rtol=1e-4, atol=1e-5)
    assert trainer.model.bn1.momentum == 0.1  # the running average resumes in the next epoch


def test_label_smoothing_defaults_to_the_init_heads_own(tmp_path):
    from fastfeat.finetune import label_smoothing
    from fastfeat.model_files import LinearHead, save_head
    from fastfeat.spec import FeatureSpec

    spec = FeatureSpec("resnet18", "none:seed=0", "0" * 64, 512, PRE, "float32")
    heads = {}
    for name, recorded in (("plain", {"label_smoothing": 0.0}), ("smoothed", {"label_smoothing": 0.2}), ("old", {})):
        heads[name] = tmp_path / f"{name}.pt"
        save_head(heads[name], LinearHead(512, 2), ["a", "b"], spec, recorded)
    assert label_smoothing(FinetuneOptions()) == 0.1  # a fresh head
    assert label_smoothing(FinetuneOptions(init_head=str(heads["plain"]))) == 0.0
    assert label_smoothing(FinetuneOptions(init_head=str(heads["smoothed"]))) == 0.2
    assert label_smoothing(FinetuneOptions(init_head=str(heads["old"]))) == 0.0  # train-head's default
    assert label_smoothing(FinetuneOptions(init_head=str(heads["smoothed"]), label_smoothing=0.05)) == 0.05


@pytest.mark.slow
def test_loss_falls_on_a_learnable_set_and_lines_match_the_recipe(learnable, tmp_path):
    lines = []
    # backbone x0.1: a random network learns this set at a tenth of the head's lr, not at the default x1;
    # no label smoothing, whose floor (0.2 for two classes) would leave the loss little room to fall
    opts = options(learnable, tmp_path, epochs=4, lr=0.02, backbone_lr_scale=0.1, label_smoothing=0.0)
    result = finetune(opts, log=lines.append)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.2 * losses[0], losses
    assert result.history[-1]["valid_acc"] >= 0.9
    pattern = r"Epoch \d+\. Train Loss: \d+\.\d{6}, Train Acc: \d\.\d{6}, Valid Loss: \d+\.\d{6}, Valid Acc: \d\.\d{6}, Time \d\d:\d\d:\d\d"
    assert len(lines) == 4 and all(__import__("re").fullmatch(pattern, line) for line in lines), lines


@pytest.mark.parametrize("amp, expected", [(True, CPU_AMP.dtype or torch.float32), (False, torch.float32)])
def test_amp_uses_the_policys_autocast_on_cpu(learnable, tmp_path, amp, expected):
    trainer = Trainer(options(learnable, tmp_path, amp=amp), ["dark", "bright"], 1)
    seen = []
    trainer.model.layer3[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.step(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 0, 1]))
    assert seen == [expected]
    assert trainer.model.layer3[0].conv1.weight.dtype == torch.float32  # master weights stay fp32


def test_fp16_amp_uses_a_gradient_scaler(learnable, tmp_path):
    trainer = Trainer(options(learnable, tmp_path, amp_dtype="float16"), ["dark", "bright"], 1)
    assert trainer.dtype == torch.float16 and trainer.scaler.is_enabled()
    before = trainer.model.layer4[1].conv2.weight.clone()
    loss, _ = trainer.step(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 0, 1]))
    assert torch.isfinite(loss) and not torch.equal(before, trainer.model.layer4[1].conv2.weight)
    assert trainer.state()["scaler"]["scale"] > 0


@pytest.mark.slow
def test_resume_after_an_interrupted_epoch_continues_exactly(learnable, tmp_path, monkeypatch):
    whole = finetune(options(learnable, tmp_path / "a", epochs=2, **TINY), log=lambda line: None)
    real_step, calls = Trainer.step, {"n": 0}

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 14:  # inside the second epoch (10 steps an epoch)
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(Trainer, "step", interrupted)
    opts = options(learnable, tmp_path / "b", epochs=2, **TINY)
    with pytest.raises(KeyboardInterrupt):
        finetune(opts, log=lambda line: None)
    assert read_checkpoint(tmp_path / "b" / "ckpt" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(Trainer, "step", real_step)
    with pytest.raises(InputError, match="--resume"):
        finetune(opts, log=lambda line: None)
    opts.resume = True
    resumed = finetune(opts, log=lambda line: None)
    a = read_checkpoint(whole.checkpoint)["model"]
    b = read_checkpoint(resumed.checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in whole.history] == [h["train_loss"] for h in resumed.history]


@pytest.mark.slow
def test_predict_agrees_with_the_model(learnable, tmp_path, capsys):
    result = finetune(options(learnable, tmp_path, epochs=2), log=lambda line: None)
    classifier = load_classifier(result.best)
    predictor = Predictor(classifier, "cpu")
    test = open_dataset(learnable, splits=("test",)).splits["test"]
    with torch.no_grad(), autocast(torch.device("cpu"), predictor.dtype):
        images = torch.cat(list(eval_batches(test, "torch", PRE, 64, torch.device("cpu"))))
        expected = classifier.model(images).float().argmax(1)
    accuracy, n = predictor.accuracy(str(learnable), loader="torch")
    assert n == 40 and accuracy == pytest.approx((expected.numpy() == test.labels).mean())

    files = []
    for i in (0, 1):
        path = tmp_path / f"{i}.png"
        __import__("PIL.Image").Image.fromarray(test.images[i]).save(path)
        files.append(str(path))
    assert main(["predict", "--model", str(result.best), "--device", "cpu", "--topk", "2", *files]) == 0
    out = capsys.readouterr().out.splitlines()
    for line, label in zip(out, expected[:2].tolist()):
        assert line.split(": ")[1].split()[0] == classifier.classes[label]


def test_cli_writes_checkpoints_and_metrics(learnable, tmp_path):
    metrics = tmp_path / "m.json"
    code = main(["finetune", "--data", str(learnable), "--image-size", "64", "--resize", "73", "--weights", "none",
                 "--device", "cpu", "--loader", "torch", "--epochs", "1", "--batch-size", "16", "--no-progress",
                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics", str(metrics)])
    assert code == 0
    m = json.loads(metrics.read_text())
    assert m["command"] == "finetune" and len(m["epochs"]) == 1 and m["train_images_per_second"] > 0
    state = read_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert {"model", "optimizer", "scaler", "schedule", "epoch", "rng", "classes", "spec"} <= set(state)
    assert (tmp_path / "ckpt" / "best.pt").exists() and not list((tmp_path / "ckpt").glob("*.tmp"))


def test_bad_inputs_are_one_line(learnable, tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "nope.pt"), "x.png"]) == 2
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["predict", "--model", str(tmp_path / "junk.pt"), "x.png"]) == 2
    assert main(["finetune", "--data", str(tmp_path / "missing"), "--weights", "none", "--device", "cpu"]) == 2
    assert main(["finetune", "--data", str(learnable), "--weights", "none", "--recompute-bn", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("fastfeat ") and "error:" in line for line in err), err


def test_out_of_memory_suggests_a_smaller_batch(learnable, tmp_path, monkeypatch, capsys):
    def oom(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "step", oom)
    code = main(["finetune", "--data", str(learnable), "--image-size", "64", "--resize", "73", "--weights", "none",
                 "--device", "cpu", "--loader", "torch", "--no-progress", "--checkpoint-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "smaller --batch-size" in err[0], err


def test_folded_head_gives_the_heads_logits():
    from fastfeat.model_files import LinearHead

    torch.manual_seed(0)
    head = LinearHead(300, 3, mean=torch.randn(300), std=torch.rand(300) + 0.5)  # any feature size
    torch.nn.init.normal_(head.fc.weight)
    torch.nn.init.normal_(head.fc.bias)
    x = torch.randn(8, 300)
    expected = head.fc((x - head.mean) / head.std)  # the head's definition, written out
    assert torch.allclose(head.as_linear()(x), expected, atol=1e-4)


@pytest.mark.slow
def test_compiled_training_step_matches_eager(learnable, tmp_path):
    """One fp32 step from the same init: torch.compile computes the same loss and the same update."""
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 4)
    eager, compiled = (Trainer(options(learnable, tmp_path, image_size=32, resize=36, amp=False, compile=c),
                               ["dark", "bright"], 1) for c in (False, True))
    keys = ("conv1.weight", "layer4.1.conv2.weight", "fc.weight", "layer2.0.bn1.running_mean")
    before = {key: eager.model.state_dict()[key].clone() for key in keys}
    for trainer in (eager, compiled):
        trainer.train_mode()
    eager_loss, _ = eager.step(images, labels)
    compiled_loss, _ = compiled.step(images, labels)
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-4)
    for key in keys:  # the same update, which is not nothing
        eager_delta = eager.model.state_dict()[key] - before[key]
        compiled_delta = compiled.model.state_dict()[key] - before[key]
        assert eager_delta.norm() > 0, key
        assert (compiled_delta - eager_delta).norm() < 1e-2 * eager_delta.norm(), key


def recording(monkeypatch, name: str) -> list:
    """Record the split of every call of fastfeat.finetune.`name` (train_batches or eval_batches)."""
    module = importlib.import_module("fastfeat.finetune")  # the package exports a function of that name
    calls, real = [], getattr(module, name)

    def record(split, *args, **kwargs):
        calls.append(split)
        return real(split, *args, **kwargs)

    monkeypatch.setattr(module, name, record)
    return calls


def image_keys(split: Split) -> set[bytes]:
    return {image.tobytes() for image in split.images}


@pytest.mark.slow
def test_validation_is_a_stratified_holdout_of_train_and_test_is_evaluated_once(learnable, tmp_path, monkeypatch):
    trained, evaluated, lines = recording(monkeypatch, "train_batches"), recording(monkeypatch, "eval_batches"), []
    # --recompute-bn 0: only validation and test read images through eval_batches
    result = finetune(options(learnable, tmp_path, epochs=2, val_fraction=0.25, recompute_bn=0, **TINY), log=lines.append)
    full = open_dataset(learnable, splits=("train", "test")).splits
    val = evaluated[0]
    assert image_keys(evaluated[1]) == image_keys(val) and len(trained) == 2
    assert not image_keys(trained[0]) & image_keys(val)  # disjoint, and together all of train
    assert image_keys(trained[0]) | image_keys(val) == image_keys(full["train"])
    counts = np.bincount(full["train"].labels)
    assert np.array_equal(np.bincount(val.labels), np.round(0.25 * counts).astype(int))  # stratified
    assert [split.name for split in evaluated] == ["train", "train", "test"]  # epochs on the holdout, test once
    assert len(evaluated[2]) == len(full["test"]) and len(lines) == 2
    assert result.validation == "holdout" and result.val["top1"] == result.history[-1]["valid_acc"]
    again = recording(monkeypatch, "train_batches")  # the holdout is a function of the seed
    finetune(options(learnable, tmp_path / "again", epochs=1, val_fraction=0.25, **TINY), log=lambda line: None)
    assert image_keys(again[0]) == image_keys(trained[0])


@pytest.mark.slow
def test_val_fraction_0_validates_on_test_every_epoch_and_says_so(learnable, tmp_path, monkeypatch):
    evaluated = recording(monkeypatch, "eval_batches")
    result = finetune(options(learnable, tmp_path, epochs=2, val_fraction=0.0, **TINY), log=lambda line: None)
    # each epoch: BatchNorm statistics from train rows, then validation on test; then test once
    assert [split.name for split in evaluated] == ["train", "test", "train", "test", "test"]
    assert result.validation == "test" and result.metrics()["validation"] == "test"
    assert "the recipe's protocol" in result.summary()
    assert result.history[-1]["valid_acc"] == result.test["top1"]


@pytest.mark.slow
def test_metrics_report_the_last_model_and_best_pt_on_test(learnable, tmp_path):
    metrics = tmp_path / "m.json"
    assert main(["finetune", "--data", str(learnable), "--image-size", "32", "--resize", "32", "--weights", "none",
                 "--device", "cpu", "--loader", "torch", "--epochs", "3", "--batch-size", "16", "--lr", "0.05",
                 "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics", str(metrics)]) == 0
    m = json.loads(metrics.read_text())
    assert m["validation"] == "holdout"
    for key in ("test", "best_test", "val"):
        assert {"loss", "top1", "mean_per_class", "per_class", "confusion"} <= set(m[key]), key
        assert "top5" not in m[key] and np.array(m[key]["confusion"]).sum() == (40 if key != "val" else 16)
    for key, checkpoint in (("test", "last.pt"), ("best_test", "best.pt")):  # each model evaluated on its own
        accuracy, n = Predictor(load_classifier(tmp_path / "ckpt" / checkpoint), "cpu").accuracy(str(learnable), loader="torch")
        assert n == 40 and m[key]["top1"] == pytest.approx(accuracy, abs=1.5 / 40), key
    best_epoch = int(np.argmax([h["valid_acc"] for h in m["epochs"]]))
    assert read_checkpoint(tmp_path / "ckpt" / "best.pt")["epoch"] == best_epoch + 1


def calibrated_weights(weights_file, split: Split, out) -> str:
    """The random resnet18 of `weights_file` with BatchNorm statistics measured on `split` (what a pretrained
    network has: statistics that fit its images), as a weights file."""
    import torchvision

    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for images in eval_batches(split, "torch", Preprocess(32, 32), 100, torch.device("cpu")):
            model(images)
    torch.save(model.state_dict(), out)
    return str(out)


@pytest.mark.slow
def test_init_head_epoch_0_is_not_worse_than_the_probe(sample, weights_file, tmp_path):
    """Fine-tuning from a probe head: after epoch 0 (the head-only warm-up), the validation rows are classified
    as well as the probe itself classifies them (from the cache of the same backbone and preprocessing), up to
    two rows of 100 (a bf16 forward against float16 cached features, and a head that has seen augmented
    batches); without the warm-up, epoch 0 falls far below it."""
    from fastfeat.cache_file import read_cache
    from fastfeat.model_files import load_head
    from fastfeat.sources import stratified_holdout

    train = open_dataset(sample, "cifar10", ("train",), limit=400).splits["train"]
    weights = calibrated_weights(weights_file, train, tmp_path / "calibrated.pt")
    common = ["--data", str(sample), "--dataset", "cifar10", "--weights", weights, "--device", "cpu",
              "--loader", "torch", "--image-size", "32", "--resize", "32", "--limit", "400", "--no-progress"]
    cache, head_file = tmp_path / "c.h5", tmp_path / "probe.pt"
    assert main(["cache", *common, "--out", str(cache)]) == 0
    assert main(["train-head", "--cache", str(cache), "--out", str(head_file), "--device", "cpu"]) == 0
    features = read_cache(cache, ("train",)).features["train"]
    _, held = stratified_holdout(train.labels, 0.25, 0)
    head = load_head(head_file)[0]
    with torch.no_grad():
        probe = (head(torch.from_numpy(features[held])).argmax(1).numpy() == train.labels[held]).mean()
    assert len(held) == 100 and 0.3 < probe < 0.9  # a probe that can be matched, and bettered

    def epoch_0(warmup_epochs: float) -> float:
        # lr 0.01: this random network (BatchNorm statistics aside) is far more fragile than a pretrained one
        opts = options(sample, tmp_path / str(warmup_epochs), dataset="cifar10", limit=400, weights=weights,
                       init_head=str(head_file), val_fraction=0.25, lr=0.01, warmup_epochs=warmup_epochs, **TINY)
        return finetune(opts, log=lambda line: None).history[0]["valid_acc"]

    warmed, unwarmed = epoch_0(1.0), epoch_0(0.0)
    assert warmed >= probe - 0.02 - 1e-6, (warmed, probe)
    assert unwarmed < probe - 0.1, (unwarmed, probe)
