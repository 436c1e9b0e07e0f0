"""Any backbone: torchvision's classification registry and timm:NAME end to end (cache, head, predict),
preprocessing equal to the weights' own `transforms()` (torch and DALI), one FeatureSpec refusing
mismatched heads, one-line errors, --freeze for any arch, `fastfeat models`, options defined once,
fastfeat 0.1 caches and default cache paths.

Pretrained weights cannot be downloaded here: backbones are torchvision's random init (--weights none)
or state-dict files written by the tests; every reference is computed with torchvision's (or timm's)
own models and transforms, independently of fastfeat.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import LOADERS, MEAN, STD, assert_same_features, error_lines, one_line, run
from PIL import Image

from fastfeat import CacheOptions, FeatureSpec, FinetuneOptions, HeadOptions, InputError, build_cache, read_cache
from fastfeat.backbone import build_backbone, meta_model, preprocess_for, state_sha256
from fastfeat.cache_file import CacheWriter
from fastfeat.cli import build_parser, main
from fastfeat.finetune import Trainer
from fastfeat.freezing import freeze_help
from fastfeat.head import train_head
from fastfeat.knn import KnnOptions
from fastfeat.loaders import eval_batches
from fastfeat.model_files import HEAD_FORMAT, load_head
from fastfeat.options import cli_fields, from_args
from fastfeat.predict import Predictor, load_classifier
from fastfeat.sources import open_dataset

# torchvision's 1000-way layer of each arch, written out by hand (not found the way fastfeat finds it)
CLASSIFIER = {"resnet18": "fc", "resnet50": "fc", "mobilenet_v3_small": "classifier.3", "efficientnet_b0": "classifier.1",
              "convnext_tiny": "classifier.2", "vit_b_16": "heads.head", "squeezenet1_0": "classifier.1",
              "alexnet": "classifier.6", "densenet121": "classifier", "googlenet": "fc", "inception_v3": "fc",
              "swin_t": "head", "maxvit_t": "classifier.5", "vgg11_bn": "classifier.6", "mobilenet_v2": "classifier.1",
              "shufflenet_v2_x1_0": "fc", "resnext50_32x4d": "fc", "wide_resnet50_2": "fc", "efficientnet_v2_s": "classifier.1"}
STEM = {"resnet18": "conv1", "mobilenet_v3_small": "features.0.0", "efficientnet_b0": "features.0.0"}
SIZES = ((300, 411), (200, 150), (256, 256), (480, 360), (97, 131), (224, 300))  # down- and upscaled, both aspects
GREY = 255 * min(STD)  # one grey level in normalised units is 1 / GREY at most


def quiet(line: str) -> None:
    pass


# ---- data, independent models, conditioned weights -----------------------------------------------------


def jpeg_folder(root: Path, classes=("a", "b"), seed: int = 0) -> Path:
    """root/{train,test}/<class>/<i>.jpg at every size of SIZES: smooth colour fields with pixel noise,
    saved as JPEG (what photos are)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i, (h, w) in enumerate(SIZES):
                coarse = Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8))
                smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC)).astype(int)
                pixels = np.clip(smooth + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return jpeg_folder(tmp_path_factory.mktemp("photos") / "f")


def files_of(data: Path, split: str, limit: int | None = None) -> list[str]:
    return list(open_dataset(data, splits=(split,), limit=limit).splits[split].files)


def preset(arch: str):
    """torchvision's own preprocessing object for the arch's DEFAULT weights (ImageClassification)."""
    return torchvision.models.get_model_weights(arch).DEFAULT.transforms()


def preset_batch(arch: str, files: list[str]) -> torch.Tensor:
    tf = preset(arch)
    return torch.stack([tf(Image.open(f).convert("RGB")) for f in files])


def set_layer(model: torch.nn.Module, path: str, layer: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, layer)


def reference_model(arch: str, state: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """torchvision's model (random init from `seed`, as --weights none builds it, or `state`), fp32,
    eval, its classifier replaced by identity."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch)
    if state is not None:
        model.load_state_dict(state)
    set_layer(model, CLASSIFIER[arch], torch.nn.Identity())
    return model.eval()


def feature_size(arch: str) -> int:
    """What enters torchvision's own classifier layer of `arch` (built on the meta device: no memory)."""
    with torch.device("meta"):
        layer = torchvision.models.get_model(arch).get_submodule(CLASSIFIER[arch])
    return layer.in_features if isinstance(layer, torch.nn.Linear) else layer.in_channels  # squeezenet's: a 1x1 conv


def conditioned_weights(arch: str, images: torch.Tensor, path: Path, seed: int = 0) -> Path:
    """A state dict that behaves like trained weights where it matters here, saved with torch.save.

    torchvision's random init leaves BatchNorm's running statistics at 0 and 1: mobilenet_v3 and
    efficientnet features then vanish (about 1e-9 and 1e-14, zero in float16), so a head learns
    nothing from them. And a random 3x3 stem amplifies the +-1 grey-level rounding differences between
    resamplers (DALI vs PIL: 0.2 levels on average) until efficientnet_b0 features differ by a cosine of
    0.996, which trained (smooth) stems never do. So: a smooth stem (one colour mix per filter, flat
    over its window) and BatchNorm statistics from one pass over `images`."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch)
    stem = model.get_submodule(STEM[arch]).weight
    with torch.no_grad():
        stem.copy_(torch.randn(*stem.shape[:2], 1, 1).expand_as(stem))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average over the calibration pass
            module.reset_running_stats()
    with torch.no_grad():
        model.train()(images)
    torch.save(model.state_dict(), path)
    return path


def head_probabilities(head_file: Path, features: torch.Tensor) -> torch.Tensor:
    """softmax(W (x - mean) / std + b) from the head file's raw tensors (not through fastfeat's LinearHead)."""
    state = torch.load(head_file, weights_only=True)
    weight, bias = state["state_dict"]["weight"], state["state_dict"]["bias"]
    x = (features - state["standardize"]["mean"]) / state["standardize"]["std"]
    return (x @ weight.T + bias).softmax(1)


def predicted(classifier, files: list[str]) -> torch.Tensor:
    """predict's probabilities for `files` (fp32), one column per class in the classifier's order."""
    tops = Predictor(classifier, "cpu", amp=False).predict_files(files, topk=len(classifier.classes))
    return torch.tensor([[dict(top)[name] for name in classifier.classes] for top in tops])


def cache_of(data, out, **kw) -> dict:
    """Build a CPU fp32 cache (fastfeat's torch pipeline unless told) and read it back."""
    opts = dict(data=str(data), out=str(out), device="cpu", progress=False, loader="torch", amp=False, dtype="float32")
    options = CacheOptions(**{**opts, **kw})
    build_cache(options)
    return read_cache(out, options.splits)


# ---- 1. round trip: cache -> head -> predict, for six torchvision archs at their real 224 px ---------------

# (arch, feature size): the features are what entered the 1000-way layer. mobilenet_v3_small and
# efficientnet_b0 use conditioned weights files (their random-init features vanish, see above).
ROUND_TRIP = [("resnet18", 512), ("resnet50", 2048), ("mobilenet_v3_small", 1024), ("efficientnet_b0", 1280),
              ("convnext_tiny", 768), ("vit_b_16", 768)]


@pytest.mark.slow
@pytest.mark.parametrize("arch, dim", ROUND_TRIP)
def test_cache_head_predict_round_trip(arch, dim, photos, tmp_path):
    assert feature_size(arch) == dim
    state, weights = None, "none"
    if arch in STEM:
        calibration = preset_batch(arch, files_of(photos, "train", limit=6))
        weights = str(conditioned_weights(arch, calibration, tmp_path / f"{arch}.pth"))
        state = torch.load(weights, weights_only=True)
    model = reference_model(arch, state)

    c = cache_of(photos, tmp_path / "c.h5", arch=arch, weights=weights, limit=6, batch_size=4)
    a, tf = c.attrs, preset(arch)
    assert c.features["train"].shape == (6, dim) and c.features["test"].shape == (6, dim)
    assert (a["arch"], a["feature_dim"], a["amp_dtype"]) == (arch, dim, "float32")
    assert a["weights"] == ("none:seed=0" if weights == "none" else f"file:{arch}.pth")
    assert a["weights_sha256"] == state_sha256(model)  # the very backbone built here independently
    assert (a["resize"], a["image_size"], a["interpolation"]) == (tf.resize_size[0], tf.crop_size[0], tf.interpolation.value)
    assert np.allclose(a["mean"], tf.mean) and np.allclose(a["std"], tf.std)
    test_x = torch.from_numpy(c.features["test"])
    assert (test_x.std(0).mean() > 1e-3 * test_x.abs().mean()).item()  # features that tell images apart

    head = train_head(HeadOptions(cache=str(tmp_path / "c.h5"), epochs=3, lr=0.05, device="cpu"), log=quiet)
    assert load_head(head.out)[2] == FeatureSpec.from_attrs(a)  # the head records the features' spec
    classifier = load_classifier(head.out, None if weights == "none" else weights)
    assert classifier.pre == preprocess_for(arch) and classifier.classes == ["a", "b"]
    files = files_of(photos, "test", limit=6)
    got = predicted(classifier, files)
    # the same images through fastfeat's cache: the same preprocessing and backbone, to float precision
    torch.testing.assert_close(got, head_probabilities(head.out, test_x), atol=1e-4, rtol=0)
    # independently: torchvision's preset on PIL images, torchvision's model, the head's raw tensors
    with torch.no_grad():
        independent = head_probabilities(head.out, model(preset_batch(arch, files)))
    torch.testing.assert_close(got, independent, atol=0.005, rtol=0)  # PIL vs torch resampling: up to 7e-4 seen
    assert (got[:, 0].max() - got[:, 0].min()).item() > 0.05  # not a head that says the same for every image


@pytest.mark.slow
def test_a_resnet50_head_refuses_resnet18_features_in_one_line(photos, tmp_path, capsys):
    size = ["--image-size", "64", "--resize", "73", "--weights", "none", "--device", "cpu", "--loader", "torch"]
    heads = {}
    for arch in ("resnet18", "resnet50"):
        cache_of(photos, tmp_path / f"{arch}.h5", arch=arch, image_size=64, resize=73, limit=4, weights="none")
        heads[arch] = train_head(HeadOptions(cache=str(tmp_path / f"{arch}.h5"), epochs=1, device="cpu"), log=quiet).out
    spec50, spec18 = load_head(heads["resnet50"])[2], FeatureSpec.from_attrs(read_cache(tmp_path / "resnet18.h5").attrs)
    differ = spec50.differences(spec18)  # same preprocessing here: only the backbone differs
    assert [d.split()[0] for d in differ] == ["arch", "weights_sha256", "feature_dim"]
    assert differ[0] == "arch 'resnet50' vs 'resnet18'" and differ[2] == "feature_dim 2048 vs 512"
    assert differ[1].startswith(f"weights_sha256 '{spec50.weights_sha256[:20]}") and spec18.weights_sha256[:20] in differ[1]
    with pytest.raises(InputError) as info:
        spec50.check_matches(spec18, "the resnet50 head", "these features")
    assert str(info.value).count("\n") == 0 and str(info.value).startswith(
        "the resnet50 head was made on other features than these features: arch 'resnet50' vs 'resnet18'; ")
    spec50.check_matches(load_head(heads["resnet50"])[2], "the head", "its own features")  # no refusal

    line = one_line(["finetune", "--data", str(photos), "--arch", "resnet18", *size, "--init-head", str(heads["resnet50"]),
                     "--checkpoint-dir", str(tmp_path / "ck"), "--no-progress"], capsys, "was made on other features")
    assert "arch 'resnet50' vs 'resnet18'" in line and "feature_dim 2048 vs 512" in line and "resize" not in line
    assert not (tmp_path / "ck" / "last.pt").exists()

    # predict rebuilds a head's backbone: a resnet18 state dict, or other resnet50 weights, are refused
    resnet18_file, resnet50_file = tmp_path / "r18.pth", tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet18_file)
    torch.save(torchvision.models.resnet50().state_dict(), resnet50_file)
    image = files_of(photos, "test")[0]
    one_line(["predict", "--model", str(heads["resnet50"]), "--weights", str(resnet18_file), "--device", "cpu", image],
             capsys, "is not a resnet50 state dict")
    one_line(["predict", "--model", str(heads["resnet50"]), "--weights", str(resnet50_file), "--device", "cpu", image],
             capsys, "are not the backbone the features came from (none:seed=0)")
    code, out, err = run(["predict", "--model", str(heads["resnet18"]), "--device", "cpu", image], capsys)
    assert code == 0 and out.startswith(f"{image}: "), err


# ---- 2. preprocessing: torchvision's own preset objects, both loaders --------------------------------------


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("arch", ["resnet18", pytest.param("efficientnet_b0", marks=pytest.mark.slow)])  # bilinear 256 -> 224; bicubic 256 -> 224
def test_features_equal_the_weights_own_transforms(arch, loader, photos, tmp_path):
    tf, pre = preset(arch), preprocess_for(arch)
    assert (pre.resize, pre.image_size, pre.interpolation) == (tf.resize_size[0], tf.crop_size[0], tf.interpolation.value)
    assert pre.mean == tuple(tf.mean) and pre.std == tuple(tf.std)
    assert pre.interpolation == {"resnet18": "bilinear", "efficientnet_b0": "bicubic"}[arch]

    files = files_of(photos, "test")  # 12 JPEGs of 6 sizes
    ref_pixels = preset_batch(arch, files)
    split = open_dataset(photos, splits=("test",)).splits["test"]
    pixels = torch.cat(list(eval_batches(split, loader, pre, 4, torch.device("cpu"))))
    assert pixels.shape == ref_pixels.shape == (12, 3, 224, 224)
    error = (pixels - ref_pixels).abs() * GREY  # in grey levels: torch 0.004 on average, DALI 0.17, at most 3
    assert error.max() <= 3.5 and error.mean() <= 0.3, (error.max(), error.mean())
    # ... which the other filter would not pass: the check tells bilinear from bicubic
    other = "bicubic" if pre.interpolation == "bilinear" else "bilinear"
    wrong = torch.cat(list(eval_batches(split, "torch", preprocess_for(arch, interpolation=other), 4, torch.device("cpu"))))
    assert ((wrong - ref_pixels).abs() * GREY).mean() > 0.6  # 1.1 grey levels on these images

    weights = conditioned_weights(arch, preset_batch(arch, files_of(photos, "train")), tmp_path / f"{arch}.pth")
    c = cache_of(photos, tmp_path / "c.h5", arch=arch, weights=str(weights), loader=loader, splits=("test",))
    assert (c.attrs["interpolation"], c.attrs["resize"], c.attrs["image_size"]) == (pre.interpolation, pre.resize, pre.image_size)
    with torch.no_grad():
        ref = reference_model(arch, torch.load(weights, weights_only=True))(ref_pixels)
    got = torch.from_numpy(c.features["test"])
    assert got.shape == ref.shape == (12, feature_size(arch))
    assert_same_features(got, ref, ref.mean(0), cos_min=0.999)


# ---- 3. timm ------------------------------------------------------------------------------------------------


def test_timm_resnet18_end_to_end(photos, tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'fastfeat[timm]')")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    config = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**config)  # timm's own eval preprocessing

    c = cache_of(photos, tmp_path / "t.h5", arch="timm:resnet18", weights="none", limit=6)
    a = c.attrs
    assert (a["arch"], a["feature_dim"], a["weights"]) == ("timm:resnet18", model.num_features, "none:seed=0")
    assert a["weights_sha256"] == state_sha256(model)
    assert (a["image_size"], a["resize"], a["interpolation"]) == (224, int(224 / config["crop_pct"]), config["interpolation"])
    assert np.allclose(a["mean"], config["mean"]) and np.allclose(a["std"], config["std"])
    files = files_of(photos, "test", limit=6)
    with torch.no_grad():
        ref = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))
    got = torch.from_numpy(c.features["test"])
    assert_same_features(got, ref, ref.mean(0))

    head = train_head(HeadOptions(cache=str(tmp_path / "t.h5"), epochs=3, lr=0.05, device="cpu"), log=quiet)
    probs = predicted(load_classifier(head.out), files)
    torch.testing.assert_close(probs, head_probabilities(head.out, got), atol=1e-4, rtol=0)
    torch.testing.assert_close(probs, head_probabilities(head.out, ref), atol=0.01, rtol=0)


BLOCK_TIMM = "import sys; sys.modules['timm'] = None; from fastfeat.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow
def test_timm_arch_without_timm_is_one_line(photos, tmp_path):
    proc = subprocess.run([sys.executable, "-c", BLOCK_TIMM, "cache", "--arch", "timm:resnet18", "--data", str(photos),
                           "--weights", "none", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "t.h5")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) == ["fastfeat cache: error: timm is not installed: pip install 'fastfeat[timm]'"]
    assert not list(tmp_path.iterdir())


# ---- 4. one-line errors -------------------------------------------------------------------------------------


def cache_args(data, tmp_path, *extra) -> list[str]:
    return ["cache", "--data", str(data), "--device", "cpu", "--loader", "torch", "--no-progress",
            "--out", str(tmp_path / "out.h5"), *extra]


@pytest.mark.parametrize("extra, expected", [
    (["--arch", "resnet1000", "--weights", "none"],
     "unknown --arch 'resnet1000': `fastfeat models` lists torchvision's 80; timm's are timm:NAME"),
    (["--weights", "IMAGENET1K_V9"], "--weights IMAGENET1K_V9: resnet18 has IMAGENET1K_V1, DEFAULT, none or a FILE"),
    (["--arch", "resnet50", "--weights", "IMAGENET1K_V9"],
     "--weights IMAGENET1K_V9: resnet50 has IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT, none or a FILE"),
    (["--arch", "vit_b_16", "--image-size", "64", "--weights", "none"], "--image-size 64: vit_b_16 takes 224 px inputs only"),
    (["--arch", "swin_t", "--image-size", "64", "--weights", "none"], "--image-size 64: swin_t takes 224 px inputs only"),
])
def test_bad_backbone_choices_are_one_line(extra, expected, photos, tmp_path, capsys):
    line = one_line(cache_args(photos, tmp_path, *extra), capsys, expected)
    assert line == f"fastfeat cache: error: {expected}"
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_resnet50_state_dict_is_not_resnet18_weights(photos, tmp_path, capsys):
    wrong = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), wrong)
    line = one_line(cache_args(photos, tmp_path, "--weights", str(wrong)), capsys, "is not a resnet18 state dict")
    assert f"weights file {wrong} is not a resnet18 state dict: " in line
    extra = set(torchvision.models.resnet50().state_dict()) - set(torchvision.models.resnet18().state_dict())
    assert f"{len(extra)} unexpected keys (e.g. " in line
    assert "missing" not in line and "0 unexpected" not in line and "[]" not in line, line
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("weights, named", [("IMAGENET1K_V2", "IMAGENET1K_V2"), ("DEFAULT", "DEFAULT"), ("imagenet", "imagenet")])
def test_offline_pretrained_weights_fail_in_one_line(weights, named, photos, tmp_path, capsys, monkeypatch):
    calls = []

    def offline(self, *args, **kwargs):
        calls.append(self.name)
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", offline)
    line = one_line(cache_args(photos, tmp_path, "--arch", "resnet50", "--weights", weights), capsys, "could not download")
    assert line == (f"fastfeat cache: error: could not download the resnet50 {named} weights "
                    "(<urlopen error [Errno -3] Temporary failure in name resolution>); "
                    "pass --weights FILE (a resnet50 state dict) or --weights none")
    assert calls == ["IMAGENET1K_V2"]  # DEFAULT and imagenet are V2 for resnet50
    assert not list(tmp_path.iterdir())


# ---- 5. finetune --freeze for any arch ------------------------------------------------------------------------


def trainer(tmp_path, arch: str, freeze: str, image_size: int | None = 64) -> Trainer:
    opts = FinetuneOptions(data=str(tmp_path), arch=arch, image_size=image_size, weights="none", device="cpu",
                           amp=False, freeze=freeze, lr=0.1, warmup_epochs=0, progress=False,
                           checkpoint_dir=str(tmp_path / "ck"))
    return Trainer(opts, ["a", "b"], steps_per_epoch=1)


def one_step(t: Trainer) -> tuple[dict, dict]:
    """The state dict before and after one training step on random images."""
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    t.train_mode()
    t.step(torch.randn(4, 3, 64, 64, generator=g), torch.tensor([0, 1, 0, 1]))
    return before, t.model.state_dict()


def split_params(t: Trainer) -> tuple[list[str], list[str], list[str]]:
    """Backbone parameter names in registration order, the frozen ones, and the head's."""
    head = [f"{t.head_path}.{n}" for n, _ in t.model.get_submodule(t.head_path).named_parameters()]
    backbone = [n for n, _ in t.model.named_parameters() if n not in head]
    frozen = [n for n, p in t.model.named_parameters() if not p.requires_grad]
    return backbone, frozen, head


def assert_only_frozen_kept(t: Trainer, before: dict, after: dict, frozen: list[str]) -> None:
    """Frozen parameters (and their modules' BatchNorm statistics) are unchanged; the rest moved."""
    frozen_prefixes = tuple(n.rpartition(".")[0] + "." for n in frozen)
    moved = {k: not torch.equal(before[k], after[k]) for k in after if after[k].is_floating_point()}
    for name in moved:
        if name.startswith(frozen_prefixes):
            assert not moved[name], f"{name} is frozen but changed"
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert trainable and all(moved[n] for n in trainable), [n for n in trainable if not moved[n]]
    running = [k for k in moved if k.endswith("running_mean")]
    assert all(moved[k] != k.startswith(frozen_prefixes) for k in running)  # BatchNorm learns only where not frozen


def test_freeze_a_fraction_of_a_non_resnet_backbone(tmp_path):
    t = trainer(tmp_path, "mobilenet_v3_small", "0.5")
    backbone, frozen, head = split_params(t)
    size = {n: p.numel() for n, p in t.model.named_parameters()}
    share = sum(size[n] for n in frozen) / sum(size[n] for n in backbone)
    assert 0.4 < share <= 0.5, share
    assert frozen == backbone[: len(frozen)]  # the first parameters, in registration order
    assert not set(frozen) & set(head)
    assert_only_frozen_kept(t, *one_step(t), frozen)


def test_freeze_all_of_the_backbone_keeps_the_head_trainable(tmp_path):
    t = trainer(tmp_path, "mobilenet_v3_small", "1")
    backbone, frozen, head = split_params(t)
    assert frozen == backbone and head == ["classifier.3.weight", "classifier.3.bias"]
    before, after = one_step(t)
    assert_only_frozen_kept(t, before, after, frozen)
    assert not torch.equal(before["classifier.3.weight"], after["classifier.3.weight"])


def test_freeze_module_names(tmp_path):
    t = trainer(tmp_path, "efficientnet_b0", "features.0, features.1")
    backbone, frozen, _ = split_params(t)
    assert frozen == [n for n in backbone if n.startswith(("features.0.", "features.1."))] and frozen
    assert "features.2.0.block.0.0.weight" not in frozen
    assert_only_frozen_kept(t, *one_step(t), frozen)


def test_freeze_a_resnet_stage_freezes_the_ones_before_it(tmp_path):
    t = trainer(tmp_path, "resnet18", "layer2")
    backbone, frozen, _ = split_params(t)
    assert frozen == [n for n in backbone if n.startswith(("conv1.", "bn1.", "layer1.", "layer2."))]
    assert_only_frozen_kept(t, *one_step(t), frozen)


@pytest.mark.parametrize("arch, image_size", [("vit_b_16", None), ("convnext_tiny", 64)])
def test_freeze_a_fraction_covers_parameters_of_non_leaf_modules(arch, image_size, tmp_path):
    t = trainer(tmp_path, arch, "0.5", image_size)
    backbone, frozen, _ = split_params(t)
    last = backbone.index(frozen[-1])
    assert [n for n in backbone[:last] if n not in frozen] == []


def test_freeze_help_and_bad_names(photos, tmp_path, capsys):
    code, out, err = run(["finetune", "--arch", "mobilenet_v3_small", "--image-size", "64", "--freeze", "help"], capsys)
    modules = [n for n, m in torchvision.models.mobilenet_v3_small().named_children() if list(m.parameters())]
    assert code == 0 and not err
    assert out.splitlines() == [f"--freeze for mobilenet_v3_small: none; a fraction such as 0.5; or module names such as "
                                f"{', '.join(modules)}"]
    code, out, _ = run(["finetune", "--freeze", "help"], capsys)
    assert code == 0 and out.startswith("--freeze for resnet18: none, stem, layer1, layer2, layer3; ")

    base = ["finetune", "--data", str(photos), "--arch", "mobilenet_v3_small", "--image-size", "64", "--weights", "none",
            "--device", "cpu", "--loader", "torch", "--limit", "4", "--no-progress", "--checkpoint-dir", str(tmp_path / "ck")]
    line = one_line([*base, "--freeze", "features.0,features.99"], capsys, "--freeze 'features.99': mobilenet_v3_small "
                    "has no such module (--freeze for mobilenet_v3_small: none; a fraction such as 0.5;")
    assert line.endswith("or module names such as features, classifier)")
    one_line([*base, "--freeze", "layer2"], capsys, "--freeze 'layer2': mobilenet_v3_small has no such module")
    one_line([*base, "--freeze", "1.5"], capsys, "--freeze 1.5: a fraction of the backbone must be in (0, 1]")
    assert not (tmp_path / "ck" / "last.pt").exists()


# ---- 6. fastfeat models ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_rows() -> list[dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["models", "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.mark.slow
def test_models_json_describes_every_torchvision_arch(models_rows):
    archs = torchvision.models.list_models(module=torchvision.models)
    assert len(archs) == 80 and [r["arch"] for r in models_rows] == list(archs)
    rows = {r["arch"]: r for r in models_rows}
    for arch, row in rows.items():
        tf, weights = preset(arch), torchvision.models.get_model_weights(arch)
        assert (row["resize"], row["image_size"], row["interpolation"]) == (
            tf.resize_size[0], tf.crop_size[0], tf.interpolation.value), arch
        assert row["weights"] == [w.name for w in weights], arch
        assert row["fixed_size"] == arch.startswith(("vit_", "swin_", "maxvit_")), arch
    for arch, path in CLASSIFIER.items():  # feature size and parameters against the model itself
        with torch.device("meta"):
            model = torchvision.models.get_model(arch, **({"aux_logits": False, "init_weights": False}
                                                          if arch in ("googlenet", "inception_v3") else {}))
        layer = model.get_submodule(path)
        assert rows[arch]["feature_dim"] == getattr(layer, "in_features", getattr(layer, "in_channels", None)), arch
        classifier_params = sum(p.numel() for p in layer.parameters())
        assert rows[arch]["parameters"] == sum(p.numel() for p in model.parameters()) - classifier_params, arch
    assert rows["resnet18"]["feature_dim"] == 512 and 11.1e6 < rows["resnet18"]["parameters"] < 11.3e6
    assert rows["mobilenet_v3_small"]["feature_dim"] == 1024
    assert rows["vit_b_16"]["fixed_size"] is True and rows["resnet18"]["fixed_size"] is False
    assert rows["efficientnet_b0"]["interpolation"] == "bicubic" and rows["resnet18"]["interpolation"] == "bilinear"
    assert rows["resnet50"]["weights"] == ["IMAGENET1K_V1", "IMAGENET1K_V2"]


# one arch of each family, both regnet kinds (their builders compute block widths with torch ops)
META_SAMPLE = ("resnet18", "regnet_x_400mf", "regnet_y_400mf", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_0",
               "densenet121", "googlenet", "inception_v3", "shufflenet_v2_x0_5", "mnasnet0_5", "convnext_tiny", "swin_t",
               "maxvit_t", "vit_b_16")


@pytest.mark.parametrize("arch", META_SAMPLE)
def test_the_meta_model_has_the_layout_of_the_model_cache_builds(arch):
    """What `fastfeat models` counts (parameters on the meta device) is the model `cache` really builds."""
    meta, classifier, dim = meta_model(arch, preprocess_for(arch))
    real = build_backbone(arch, "none")
    real_numel = sum(p.numel() for p in meta.parameters() if not p.is_meta)  # made from values: class tokens, scales
    assert real_numel <= 0.01 * sum(p.numel() for p in meta.parameters()), arch
    assert (classifier, dim) == (real.classifier, real.spec.feature_dim), arch
    if arch in CLASSIFIER:
        assert (classifier, dim) == (CLASSIFIER[arch], feature_size(arch)), arch
    shapes = lambda tensors: [(name, tuple(t.shape)) for name, t in tensors]
    assert shapes(meta.named_parameters()) == shapes(real.model.named_parameters()), arch
    assert shapes(meta.named_buffers()) == shapes(real.model.named_buffers()), arch
    assert freeze_help(meta, arch) == freeze_help(real.model, arch), arch  # the stage and module names


@pytest.mark.slow
def test_models_table_has_a_header_and_a_row_per_arch(models_rows, capsys, monkeypatch):
    monkeypatch.setattr("fastfeat.backbone.describe_models", lambda: models_rows)  # the same rows, built once
    code, out, _ = run(["models"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["arch", "features", "params", "preprocessing", "weights"]
    rows = [line.split() for line in lines[1 : 1 + len(models_rows)]]
    assert [r[0] for r in rows] == [r["arch"] for r in models_rows]
    by_arch = {r[0]: r for r in rows}
    assert by_arch["resnet18"][:5] == ["resnet18", "512", "11.2M", "256->224", "bilinear"]
    effnet = next(r for r in models_rows if r["arch"] == "efficientnet_b0")
    assert by_arch["efficientnet_b0"][1:5] == ["1280", f"{effnet['parameters'] / 1e6:.1f}M", "256->224", "bicubic"]
    assert by_arch["vit_b_16"][5] == "(fixed)" and "IMAGENET1K_SWAG_E2E_V1," in by_arch["vit_b_16"]
    assert "timm:NAME" in lines[-1]


# ---- 7. options defined once ----------------------------------------------------------------------------------

COMMANDS = [("cache", CacheOptions), ("train-head", HeadOptions), ("finetune", FinetuneOptions), ("knn", KnnOptions)]


def test_comma_separated_options_parse_to_tuples():
    args = build_parser().parse_args(["cache", "--splits", "test, train"])
    assert args.splits == ("test", "train") and from_args(CacheOptions, args).splits == ("test", "train")
    assert build_parser().parse_args(["knn", "--k", "5,50"]).k == (5, 50)


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


@pytest.mark.parametrize("command, cls", COMMANDS)
def test_every_option_is_a_flag_with_the_dataclass_default_and_help(command, cls):
    assert cli_fields(cls) == list(fields(cls))  # every field is an option
    args = build_parser().parse_args([command])
    flags = {s: a for a in subcommand(command)._actions for s in a.option_strings}
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags, flag
        assert flags[flag].help == f.metadata["help"] and f.metadata["help"]
        assert getattr(args, f.name) == f.default and type(getattr(args, f.name)) is type(f.default), f.name
        if isinstance(f.default, bool):
            assert "--no-" + flag[2:] in flags, flag
    assert cls(**{f.name: getattr(args, f.name) for f in fields(cls)}) == cls()
    for action in subcommand(command)._actions:
        if action.option_strings != ["-h", "--help"]:
            assert action.help, action.option_strings


def test_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    for command in ("finetune", "train-head"):
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text
        if command == "finetune":
            assert "--lr LR the head's learning rate (default: 0.05)" in text
            assert "--epochs EPOCHS passes over the train split (default: 5)" in text
            assert "--freeze FREEZE what stays frozen" in text and "(default: none)" in text
        else:
            assert "--epochs EPOCHS passes over the train split (default: 20)" in text


# ---- 8. fastfeat 0.1 files --------------------------------------------------------------------------------------


def test_a_fastfeat_0_1_cache_and_head_still_read(photos, tmp_path):
    new = cache_of(photos, tmp_path / "new.h5", image_size=64, resize=73, limit=6, weights="none", dtype="float16")
    old_attrs = {  # what fastfeat 0.1 wrote: `backbone`, no `arch`, no `interpolation` (always bilinear)
        "fastfeat_version": "0.1.0", "backbone": "resnet18", "feature_dim": 512, "weights": "none:seed=0",
        "weights_sha256": new.attrs["weights_sha256"], "image_size": 64, "resize": 73, "mean": MEAN, "std": STD,
        "amp_dtype": "float32", "batch_size": 128, "dataset": "folder", "dataset_path": str(photos),
        "classes": json.dumps(["a", "b"]), "limit": 6, "seed": 0}
    old = tmp_path / "old.h5"
    writer = CacheWriter(old, old_attrs, {s: len(new.labels[s]) for s in ("train", "test")}, 512)
    for split in ("train", "test"):
        writer.write(split, 0, new.features[split], new.labels[split])
    writer.finish()
    writer.close()
    assert "arch" not in read_cache(old).attrs and "interpolation" not in read_cache(old).attrs

    heads = {name: train_head(HeadOptions(cache=str(path), epochs=2, device="cpu"), log=quiet).out
             for name, path in (("old", old), ("new", tmp_path / "new.h5"))}
    _, _, spec = load_head(heads["old"])
    assert (spec.arch, spec.pre.interpolation, spec.feature_dim, spec.weights) == ("resnet18", "bilinear", 512, "none:seed=0")
    assert spec == FeatureSpec.from_attrs(new.attrs)  # the same features as a new cache of the same settings
    old_state, new_state = torch.load(heads["old"], weights_only=True), torch.load(heads["new"], weights_only=True)
    for key in ("weight", "bias"):
        assert torch.equal(old_state["state_dict"][key], new_state["state_dict"][key])

    # a 0.1 head file (its cache's attributes under `cache_attrs`) loads and predicts the same
    legacy = tmp_path / "legacy.head.pt"
    torch.save({"format": HEAD_FORMAT, "state_dict": old_state["state_dict"], "classes": ["a", "b"],
                "standardize": old_state["standardize"], "cache_attrs": old_attrs, "options": {}}, legacy)
    files = files_of(photos, "test", limit=6)
    probs = predicted(load_classifier(legacy), files)
    torch.testing.assert_close(probs, predicted(load_classifier(heads["new"]), files), atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, head_probabilities(legacy, torch.from_numpy(new.features["test"])), atol=0.02, rtol=0)


# ---- 9. default cache paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, name", [("mobilenet_v3_small", "f-mobilenet_v3_small.h5"), ("timm:resnet18", "f-timm-resnet18.h5")])
def test_default_cache_path_names_dataset_and_arch(arch, name, photos, tmp_path, monkeypatch):
    if arch.startswith("timm:"):
        pytest.importorskip("timm", reason="timm is not installed (pip install 'fastfeat[timm]')")
    monkeypatch.chdir(tmp_path)
    result = build_cache(CacheOptions(data=str(photos), arch=arch, image_size=64, weights="none", splits=("test",),
                                      limit=2, device="cpu", progress=False, loader="torch"))
    assert result.out == Path("data") / name and (tmp_path / "data" / name).is_file()
    assert read_cache(tmp_path / "data" / name, ("test",)).attrs["arch"] == arch
