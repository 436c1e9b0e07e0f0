"""Backbones: where to add one. Any torchvision classification model (and timm's, with the extra):
its weights (pretrained, random, a file), its default preprocessing, and the
frozen feature pass.

A backbone is the classification model with its final classification layer replaced by identity:
its features are what entered that layer (the pooled embedding, or the classifier's hidden output
for mobilenet_v3, vgg and alexnet). Heads and fine-tuning put a K-way layer back in the same place.
Two model sources sit in `SOURCES`; a new one satisfies `ModelSource`. What fine-tuning may
freeze lives beside fine-tuning, in freezing.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Protocol

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import InputError
from .reporting import read_torch_file
from .runtime import CompiledOrEager, autocast
from .settings import DEFAULT_ARCH
from .spec import INTERPOLATIONS, FeatureSpec, Preprocess

PRETRAINED = ("DEFAULT", "imagenet")  # `imagenet`: the recipe's word for an arch's default ImageNet weights
RANDOM_ID, FILE_ID = "none:seed=", "file:"
WEIGHTS_NAME = re.compile(r"[A-Z][A-Z0-9_]*")  # torchvision's names: IMAGENET1K_V2, IMAGENET1K_SWAG_E2E_V1
NUM_CLASSES = 1000  # the ImageNet-1k classifier that the feature model drops


class ModelSource(Protocol):
    """What a model source provides for the arch names it owns."""

    def weights_names(self, arch: str) -> list[str]:
        """The named pretrained weights `--weights` accepts (besides DEFAULT, none and a FILE)."""

    def preprocess(self, arch: str, weights: str) -> Preprocess:
        """The preprocessing those weights were trained with."""

    def fixed_size(self, arch: str) -> bool:
        """Whether the model takes only its default input size."""

    def build(self, arch: str, pre: Preprocess) -> tuple[nn.Module, str, int]:
        """The randomly initialised feature model (classifier replaced by identity), the classifier's module
        path, and the size of what entered it."""

    def pretrained_state(self, arch: str, weights: str) -> tuple[str, dict[str, torch.Tensor]]:
        """The weights id and the state dict of `weights`, downloaded through the source's own cache."""


class TorchvisionModels:
    """torchvision's classification registry (`torchvision.models.list_models`)."""

    # builders that need arguments to match their weights (auxiliary heads off, the weights' input transform)
    BUILD_KWARGS = {"googlenet": {"aux_logits": False, "transform_input": True, "init_weights": True},
                    "inception_v3": {"aux_logits": False, "transform_input": True, "init_weights": True}}
    AUX_KEYS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}  # in the weights, never built
    FIXED_SIZE = ("vit_", "swin_", "maxvit_")  # position embeddings / attention windows fix the input size

    def weights_names(self, arch: str) -> list[str]:
        return [w.name for w in torchvision.models.get_model_weights(arch)]

    def preprocess(self, arch: str, weights: str) -> Preprocess:
        preset = self._weights(arch, weights if weights in self.weights_names(arch) else "DEFAULT").transforms()
        return Preprocess(resize=int(preset.resize_size[0]), image_size=int(preset.crop_size[0]),
                          interpolation=preset.interpolation.value, mean=tuple(preset.mean), std=tuple(preset.std))

    def fixed_size(self, arch: str) -> bool:
        return arch.startswith(self.FIXED_SIZE)

    def build(self, arch: str, pre: Preprocess) -> tuple[nn.Module, str, int]:
        """The feature model, its classifier's module path ("fc", "classifier.6", "heads.head") and the
        size of what entered it; the classifier is the last layer that maps to the 1000 ImageNet classes."""
        kwargs = dict(self.BUILD_KWARGS.get(arch, {}))
        if arch.startswith("vit_"):
            kwargs["image_size"] = pre.image_size  # the position embeddings' grid
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        path, layer = [(name, m) for name, m in model.named_modules()
                       if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES
                       or isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES][-1]  # squeezenet's: a 1x1 conv
        set_layer(model, path, nn.Identity())
        return model, path, layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels

    def pretrained_state(self, arch: str, weights: str) -> tuple[str, dict[str, torch.Tensor]]:
        chosen = self._weights(arch, weights)
        state = chosen.get_state_dict(progress=True)
        skip = self.AUX_KEYS.get(arch, ())
        return f"imagenet:{chosen.name}", {k: v for k, v in state.items() if not k.startswith(skip)}

    def _weights(self, arch: str, name: str):
        enum = torchvision.models.get_model_weights(arch)
        if name in PRETRAINED:
            return enum.DEFAULT
        try:
            return enum[name]
        except KeyError:
            raise InputError(f"--weights {name}: {arch} has {', '.join(self.weights_names(arch))}, "
                             "DEFAULT, none or a FILE") from None


class TimmModels:
    """timm's models (`pip install 'fastfeat[timm]'`), as `timm:NAME`."""

    PREFIX = "timm:"

    def weights_names(self, arch: str) -> list[str]:
        return ["DEFAULT"]

    def preprocess(self, arch: str, weights: str) -> Preprocess:
        timm = _timm()
        config = timm.data.resolve_data_config(pretrained_cfg=self._config(arch).to_dict())
        crop = int(config["input_size"][-1])
        interpolation = config["interpolation"] if config["interpolation"] in INTERPOLATIONS else "bicubic"
        return Preprocess(resize=math.floor(crop / config["crop_pct"]), image_size=crop, interpolation=interpolation,
                          mean=tuple(config["mean"]), std=tuple(config["std"]))

    def fixed_size(self, arch: str) -> bool:
        return bool(self._config(arch).fixed_input_size)

    def build(self, arch: str, pre: Preprocess) -> tuple[nn.Module, str, int]:
        model = _timm().create_model(arch.removeprefix(self.PREFIX), pretrained=False, num_classes=0)
        return model, self._classifier(model), getattr(model, "head_hidden_size", None) or model.num_features

    def pretrained_state(self, arch: str, weights: str) -> tuple[str, dict[str, torch.Tensor]]:
        if weights not in PRETRAINED:
            raise InputError(f"--weights {weights}: timm models take DEFAULT (the name's pretrained tag), none or a FILE")
        with _quiet("huggingface_hub"):
            model = _timm().create_model(arch.removeprefix(self.PREFIX), pretrained=True, num_classes=0)
        return f"timm:{model.pretrained_cfg.get('tag') or 'default'}", model.state_dict()

    def _config(self, arch: str):
        config = _timm().models.get_pretrained_cfg(arch.removeprefix(self.PREFIX))
        if config is None:
            raise InputError(f"unknown timm model {arch.removeprefix(self.PREFIX)!r} (see timm.list_models())")
        return config

    @staticmethod
    def _classifier(model: nn.Module) -> str:
        name = model.pretrained_cfg["classifier"]
        return name[0] if isinstance(name, (tuple, list)) else name


SOURCES: dict[str, ModelSource] = {"torchvision": TorchvisionModels(), "timm": TimmModels()}


def source(arch: str) -> ModelSource:
    """The model source an arch name belongs to (`timm:` prefix, else torchvision), checking the name."""
    if arch.startswith(TimmModels.PREFIX):
        return SOURCES["timm"]
    if arch not in _torchvision_names():
        raise InputError(f"unknown --arch {arch!r}: `fastfeat models` lists torchvision's "
                         f"{len(_torchvision_names())}; timm's are timm:NAME")
    return SOURCES["torchvision"]


@cache
def _torchvision_names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def _timm():
    try:
        import timm
    except ImportError:
        raise InputError("timm is not installed: pip install 'fastfeat[timm]'") from None
    return timm


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Libraries that log every retry of a failed download: the one line fastfeat prints is enough."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---- the feature space -------------------------------------------------------------------------------


def preprocess_for(arch: str, weights: str = "DEFAULT", resize: int | None = None, image_size: int | None = None,
                   interpolation: str | None = None) -> Preprocess:
    """The weights' own preprocessing (the arch's DEFAULT weights' for none and files) with the user's
    overrides; a new --image-size alone keeps the weights' resize/crop ratio."""
    models = source(arch)
    pre = models.preprocess(arch, weights)
    if image_size is not None and image_size != pre.image_size and models.fixed_size(arch):
        raise InputError(f"--image-size {image_size}: {arch} takes {pre.image_size} px inputs only")
    if image_size is not None and resize is None:
        resize = round(image_size * pre.resize / pre.image_size)
    overrides = {"resize": resize, "image_size": image_size, "interpolation": interpolation}
    return replace(pre, **{key: value for key, value in overrides.items() if value is not None})


@dataclass
class Backbone:
    """The feature model (its classifier replaced by identity, eval mode, CPU), its float32 spec, and
    where the classifier was, so that a head or a fine-tuned K-way layer goes back in its place."""

    model: nn.Module
    spec: FeatureSpec
    classifier: str

    def with_head(self, head: nn.Module) -> nn.Module:
        """The whole classification network: this backbone with `head` where its classifier was."""
        set_layer(self.model, self.classifier, head)
        return self.model


def build_backbone(arch: str = DEFAULT_ARCH, weights: str = "DEFAULT", seed: int = 0,
                   pre: Preprocess | None = None) -> Backbone:
    """Build `arch` with `weights` (DEFAULT or a named set, none = random from `seed`, or a FILE)."""
    models = source(arch)
    pre = pre or preprocess_for(arch, weights)
    torch.manual_seed(seed)  # --weights none: the same random backbone for the same seed
    model, classifier, dim = models.build(arch, pre)
    if weights == "none":
        weights_id = f"{RANDOM_ID}{seed}"
    elif weights in PRETRAINED or WEIGHTS_NAME.fullmatch(weights) and not Path(weights).exists():
        weights_id, state = _download(models, arch, weights)
        load_backbone_state(model, arch, classifier, state, f"the {arch} {weights_id} weights")
    else:
        weights_id = f"{FILE_ID}{Path(weights).name}"
        load_backbone_state(model, arch, classifier, read_state_dict(Path(weights)), f"weights file {weights}")
    return Backbone(model.eval(), FeatureSpec(arch, weights_id, state_sha256(model), dim, pre), classifier)


def set_layer(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, layer)


def _download(models: ModelSource, arch: str, weights: str) -> tuple[str, dict[str, torch.Tensor]]:
    """Pretrained weights through torchvision's (or timm's) own cache, or a one-line error."""
    try:
        return models.pretrained_state(arch, weights)
    except InputError:
        raise
    except Exception as exc:  # network errors come in many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"could not download the {arch} {weights} weights ({reason}); "
                         f"pass --weights FILE (a {arch} state dict) or --weights none") from None


def rebuild_backbone(spec: FeatureSpec, weights: str | None = None) -> Backbone:
    """The backbone that made `spec`'s features, from its weights id (or `weights`: the FILE they
    came from), refused unless its sha256 is the recorded one."""
    kind, _, name = spec.weights.partition(":")
    if weights is None and kind == "file":
        raise InputError(f"the features came from {spec.weights}: pass --weights FILE with that {spec.arch} state dict")
    seed = int(spec.weights.removeprefix(RANDOM_ID)) if spec.weights.startswith(RANDOM_ID) else 0
    if weights is None:
        weights = "none" if kind == "none" else name if name in source(spec.arch).weights_names(spec.arch) else "DEFAULT"
    backbone = build_backbone(spec.arch, weights, seed, spec.pre)
    if backbone.spec.weights_sha256 != spec.weights_sha256:
        raise InputError(f"--weights {weights} are not the backbone the features came from ({spec.weights})")
    return backbone


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt file (bare, or under a 'state_dict'/'model' key)."""
    state = read_torch_file(path, "weights file")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_backbone_state(model: nn.Module, arch: str, classifier: str, state: dict[str, torch.Tensor],
                        source: str) -> None:
    """Load a state dict (with or without the classifier, `module.` prefixes allowed) or fail in one line."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        counts = [f"{len(keys)} {kind} keys (e.g. {', '.join(keys[:2])})"
                  for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise InputError(f"{source} is not a {arch} state dict: {' and '.join(counts)}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise InputError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model needs {tuple(expected[key].shape)}")
    model.load_state_dict(state)


def state_sha256(model: nn.Module) -> str:
    """sha256 over the backbone tensors (sorted by name): identifies weights whatever file held them."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureExtractor:
    """The frozen backbone on a device: normalized NCHW float batch in, float32 (N, D) features out."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        channels_last: bool = True,
        compile: bool = False,
    ):
        for p in model.parameters():
            p.requires_grad_(False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(device, memory_format=self.memory_format)
        # freezing: inductor folds BatchNorm into the convolutions and prepacks their weights.
        self.forward = CompiledOrEager(self.model, compile, options={"freezing": True})
        self.device, self.amp_dtype = device, amp_dtype

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.amp_dtype):
            return self.forward(images).float()


# ---- listing -------------------------------------------------------------------------------------------


def describe_models() -> list[dict]:
    """torchvision's classification models: feature size, parameters, default preprocessing, weights
    (built on the meta device: no memory, no initialisation)."""
    rows = []
    for arch in _torchvision_names():
        models = SOURCES["torchvision"]
        pre = models.preprocess(arch, "DEFAULT")
        model, _, dim = meta_model(arch, pre)
        rows.append({"arch": arch, "feature_dim": dim,
                     "parameters": sum(p.numel() for p in model.parameters()), "resize": pre.resize,
                     "image_size": pre.image_size, "interpolation": pre.interpolation,
                     "fixed_size": models.fixed_size(arch), "weights": models.weights_names(arch)})
    return rows


def meta_model(arch: str, pre: Preprocess) -> tuple[nn.Module, str, int]:
    """The source's `build` of `arch` with its parameters on the meta device: the layout (names, shapes,
    feature size) without the memory or the initialisation."""
    with _UninitialisedOnMeta():
        return source(arch).build(arch, pre)


class _UninitialisedOnMeta(TorchFunctionMode):
    """`torch.empty` (what every layer allocates its parameters with, before initialising them) on the meta
    device. Not `with torch.device("meta")`: that moves every factory's tensors, and regnet's builders
    compute their block widths with torch ops and read them back (`.tolist()`), which a meta tensor
    cannot do. Tensors made from values (those widths, position indices, BatchNorm's running stats)
    stay real and small."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)
