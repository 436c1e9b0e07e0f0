"""fastfeat: one frozen-backbone pass into an HDF5 feature cache, heads in seconds, real AMP fine-tuning."""
__version__ = "0.2.0"

from .backbone import Backbone, build_backbone, preprocess_for
from .cache import CacheOptions, CacheResult, build_cache
from .cache_file import CacheData, read_cache
from .errors import FastfeatError, InputError
from .finetune import FinetuneOptions, FinetuneResult, finetune
from .head import HeadOptions, HeadResult, train_head
from .model_files import LinearHead, load_head, read_checkpoint
from .predict import Classifier, Predictor, load_classifier
from .sources import Dataset, Split, open_dataset
from .spec import FeatureSpec

__all__ = [
    "Backbone", "CacheData", "CacheOptions", "CacheResult", "Classifier", "Dataset", "FastfeatError", "FeatureSpec",
    "FinetuneOptions", "FinetuneResult", "HeadOptions", "HeadResult", "InputError", "LinearHead", "Predictor", "Split",
    "build_backbone", "build_cache", "finetune", "load_classifier", "load_head", "open_dataset", "preprocess_for",
    "read_cache", "read_checkpoint", "train_head",
]
