"""What fine-tuning may freeze: an arch family's named stages, a leading fraction of the backbone's
parameters, or module names (`--freeze`), and the help that lists them for an arch."""
from __future__ import annotations

from torch import nn

from .errors import InputError

RESNET_STAGES = {"stem": ("conv1", "bn1"), "layer1": ("layer1",), "layer2": ("layer2",), "layer3": ("layer3",)}
STAGES = {"resnet": RESNET_STAGES, "resnext": RESNET_STAGES, "wide_resnet": RESNET_STAGES}  # by arch prefix


def named_stages(arch: str) -> dict[str, tuple[str, ...]]:
    """An arch family's stages in forward order; freezing one freezes the ones before it too."""
    return next((stages for prefix, stages in STAGES.items() if arch.startswith(prefix)), {})


def frozen_parameters(model: nn.Module, arch: str, freeze: str, head: str) -> set[str]:
    """The parameter names `--freeze` names: none; a named stage (and those before it); the first
    `fraction` of the backbone's parameters in registration (≈ forward) order; or comma-separated
    module names. The K-way layer at module path `head` is not part of the backbone."""
    backbone = [(name, p) for name, p in model.named_parameters() if not name.startswith(f"{head}.")]
    if freeze == "none":
        return set()
    stages = named_stages(arch)
    if freeze in stages:
        modules = [name for stage in list(stages)[: list(stages).index(freeze) + 1] for name in stages[stage]]
    else:
        try:
            return _leading_fraction(backbone, float(freeze), freeze)
        except ValueError:
            modules = [_module(model, arch, name.strip()) for name in freeze.split(",") if name.strip()]
    return {name for name, _ in backbone if name.startswith(tuple(f"{m}." for m in modules))}


def _module(model: nn.Module, arch: str, name: str) -> str:
    try:
        model.get_submodule(name)
    except AttributeError:
        raise InputError(f"--freeze {name!r}: {arch} has no such module ({freeze_help(model, arch)})") from None
    return name


def _leading_fraction(backbone: list[tuple[str, nn.Parameter]], fraction: float, flag: str) -> set[str]:
    if not 0 < fraction <= 1:
        raise InputError(f"--freeze {flag}: a fraction of the backbone must be in (0, 1]")
    budget, frozen = fraction * sum(p.numel() for _, p in backbone), set()
    for name, p in backbone:
        if p.numel() > budget:
            break
        frozen.add(name)
        budget -= p.numel()
    return frozen


def freeze_help(model: nn.Module, arch: str) -> str:
    """What `--freeze` accepts for this arch (its stages, a fraction, its top-level module names)."""
    stages = ", ".join(["none", *named_stages(arch)])
    top = ", ".join(name for name, m in model.named_children() if list(m.parameters()))
    return f"--freeze for {arch}: {stages}; a fraction such as 0.5; or module names such as {top}"
