"""Head and fine-tune checkpoint files: the one module that writes and reads both.

Both are `torch.save`d dicts of tensors and plain values, written atomically and read with
`weights_only=True` (see `reporting.read_torch_file`), each tagged with its `format` and carrying the
`FeatureSpec` of the features it works on, so any reader can rebuild the backbone and refuse a
mismatch in one line.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .reporting import atomic_torch_save, read_torch_file
from .spec import FeatureSpec

HEAD_FORMAT = "fastfeat-head"
CHECKPOINT_FORMAT = "fastfeat-finetune"


class LinearHead(nn.Module):
    """`fc` on standardised features, fc((x - mean) / std), computed as one linear map of raw x
    (no standardised copy of the data is ever made); mean 0 and std 1 when not standardising."""

    def __init__(self, dim: int, num_classes: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.fc.weight)  # the problem is convex: no random init needed
        nn.init.zeros_(self.fc.bias)
        self.register_buffer("mean", torch.zeros(dim) if mean is None else mean.detach().float().clone())
        self.register_buffer("std", torch.ones(dim) if std is None else std.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.fc.weight / self.std
        return F.linear(x, weight, self.fc.bias - weight @ self.mean)

    def as_linear(self) -> nn.Linear:
        """The same map as one `nn.Linear` on raw features: what `finetune --init-head` puts in place."""
        dim = self.fc.in_features
        with torch.no_grad():
            bias = self(torch.zeros(1, dim))[0]
            weight = (self(torch.eye(dim)) - bias).T
        linear = nn.Linear(dim, weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        return linear


def save_head(out: Path, head: LinearHead, classes: list[str], spec: FeatureSpec, options: dict,
              standardize: bool = True) -> None:
    """The head, its classes, its standardisation and the spec of the features it was trained on."""
    atomic_torch_save({
        "format": HEAD_FORMAT,
        "state_dict": {k: v.cpu() for k, v in head.fc.state_dict().items()},
        "classes": list(classes),
        "standardize": {"mean": head.mean.cpu(), "std": head.std.cpu()} if standardize else None,
        "spec": spec.to_attrs(),
        "options": options,
    }, out)


def load_head(path: str | Path) -> tuple[LinearHead, list[str], FeatureSpec]:
    """A saved head as (CPU module mapping raw features to logits, classes, spec of those features)."""
    return head_from_state(read_model_file(path, HEAD_FORMAT), path)


def head_from_state(state: dict, path: str | Path) -> tuple[LinearHead, list[str], FeatureSpec]:
    spec = FeatureSpec.from_attrs(state.get("spec") or state.get("cache_attrs") or {}, f"head file {path}")
    try:
        head = LinearHead(spec.feature_dim, len(state["classes"]))
        stats = state["standardize"] or {"mean": head.mean, "std": head.std}
        weights = {f"fc.{k}": v for k, v in state["state_dict"].items()}
        head.load_state_dict({"mean": stats["mean"], "std": stats["std"], **weights})  # checks every shape
        return head.eval(), list(state["classes"]), spec
    except (KeyError, TypeError, AttributeError, RuntimeError):
        raise InputError(f"{path} is a damaged fastfeat head (missing or misshapen entries)") from None


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_torch_save({"format": CHECKPOINT_FORMAT, **state}, path)


def read_checkpoint(path: str | Path) -> dict:
    """A fine-tune checkpoint (model, optimizer, scaler, schedule, epoch, history, classes, spec, rng)."""
    return read_model_file(path, CHECKPOINT_FORMAT)


def checkpoint_spec(state: dict, path: str | Path) -> FeatureSpec:
    return FeatureSpec.from_attrs(state.get("spec", {}), f"checkpoint {path}")


WHAT = {HEAD_FORMAT: ("head file", "a fastfeat head (made by fastfeat train-head)"),
        CHECKPOINT_FORMAT: ("checkpoint", "a fastfeat finetune checkpoint")}


def read_model_file(path: str | Path, *formats: str) -> dict:
    """A head or checkpoint file of one of `formats` (default: either), or a one-line error."""
    formats = formats or tuple(WHAT)
    state = read_torch_file(path, WHAT[formats[0]][0] if len(formats) == 1 else "model file")
    if not isinstance(state, dict) or state.get("format") not in formats:
        raise InputError(f"{path} is {'not' if len(formats) == 1 else 'neither'} "
                         f"{' nor '.join(WHAT[f][1] for f in formats)}")
    return state


def describe_model_file(path: str | Path) -> dict:
    """What a head or checkpoint holds: its kind, the spec of its features, its classes, and the epoch
    and accuracies of a checkpoint or the options of a head."""
    state = read_model_file(path)
    if state["format"] == HEAD_FORMAT:
        _, classes, spec = head_from_state(state, path)
        return {"kind": "head", "spec": spec.to_attrs(), "classes": classes, "options": state.get("options", {})}
    history = state.get("history", [])
    return {"kind": "finetune checkpoint", "spec": checkpoint_spec(state, path).to_attrs(),
            "classes": list(state.get("classes", [])), "epochs_done": state.get("epoch"),
            "valid_acc": [h.get("valid_acc") for h in history], "options": state.get("options", {})}
