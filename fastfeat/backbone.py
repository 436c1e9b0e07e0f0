"""The frozen resnet18 backbone: weights (ImageNet, random, file), identity and the feature pass."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from .errors import InputError
from .reporting import read_torch_file
from .runtime import autocast

FEATURE_DIM = 512
BACKBONE = "resnet18"
IMAGENET_ID, RANDOM_ID = "imagenet:IMAGENET1K_V1", "none:seed="  # weights ids: where the weights came from


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from (`weights_id`) and what they are (`sha256` of the tensors)."""

    weights_id: str
    sha256: str


def build_resnet18(weights: str = "imagenet", seed: int = 0) -> tuple[nn.Module, WeightsInfo]:
    """resnet18 with `fc` replaced by identity (512-d pooled features), on the CPU, in eval mode."""
    torch.manual_seed(seed)
    model = resnet18()
    model.fc = nn.Identity()
    if weights == "none":
        weights_id = f"{RANDOM_ID}{seed}"
    elif weights == "imagenet":
        model.load_state_dict(_strip_fc(_imagenet_state_dict()))
        weights_id = IMAGENET_ID
    else:
        load_backbone_state(model, read_state_dict(Path(weights)), weights)
        weights_id = f"file:{Path(weights).name}"
    return model.eval(), WeightsInfo(weights_id, state_sha256(model))


def weights_for_id(weights_id: str) -> tuple[str, int] | None:
    """The `--weights` and `--seed` that rebuild the weights `weights_id` names (None for a file)."""
    if weights_id == IMAGENET_ID:
        return "imagenet", 0
    if weights_id.startswith(RANDOM_ID):
        return "none", int(weights_id.removeprefix(RANDOM_ID))
    return None


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"could not download the ImageNet resnet18 weights ({reason}); "
            "pass --weights FILE (a resnet18 state dict) or --weights none"
        ) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt file (bare, or under a 'state_dict'/'model' key)."""
    state = read_torch_file(path, "weights file")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"weights file {path} does not hold a state dict of tensors")
    return state


def _strip_fc(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a resnet18 state dict (with or without `fc`, `module.` prefixes allowed) or fail in one line."""
    state = _strip_fc(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        counts = [f"{len(keys)} {kind} keys (e.g. {', '.join(keys[:2])})"
                  for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise InputError(f"{source} is not a resnet18 state dict: {' and '.join(counts)}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise InputError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, resnet18 needs {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state)


def state_sha256(model: nn.Module) -> str:
    """sha256 over the backbone tensors (sorted by name): identifies weights whatever file held them."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        if key.startswith("fc."):
            continue
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureExtractor:
    """The frozen backbone on a device: normalized NCHW float batch in, float32 (N, 512) features out."""

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
        self.forward = torch.compile(self.model, options={"freezing": True}) if compile else self.model
        self.device, self.amp_dtype = device, amp_dtype

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.amp_dtype):
            return self.forward(images).float()
