"""fastfeat: one frozen-backbone pass into an HDF5 feature cache, heads in seconds, real AMP fine-tuning.

The API's names are imported on first use, so that `fastfeat --help` and `fastfeat info` never load torch."""
import importlib

__version__ = "0.2.0"

_HOMES = {
    "backbone": ("Backbone", "build_backbone", "preprocess_for"),
    "cache": ("CacheResult", "build_cache"),
    "cache_file": ("CacheData", "read_cache"),
    "errors": ("FastfeatError", "InputError"),
    "finetune": ("FinetuneResult", "finetune"),
    "head": ("HeadResult", "train_head"),
    "model_files": ("LinearHead", "load_head", "read_checkpoint"),
    "predict": ("Classifier", "Predictor", "load_classifier"),
    "settings": ("CacheOptions", "FinetuneOptions", "HeadOptions"),
    "sources": ("Dataset", "Split", "open_dataset"),
    "spec": ("FeatureSpec",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'fastfeat' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
