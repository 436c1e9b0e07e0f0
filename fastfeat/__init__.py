"""fastfeat: one frozen-backbone pass into an HDF5 feature cache, heads in seconds, real AMP fine-tuning."""
__version__ = "0.1.0"

from .cache import CacheOptions, CacheResult, build_cache
from .cache_file import CacheData, read_cache
from .errors import FastfeatError, InputError
from .finetune import FinetuneOptions, FinetuneResult, finetune
from .head import HeadOptions, HeadResult, check_head_matches, load_head, train_head
from .predict import Classifier, Predictor, load_classifier
from .sources import Dataset, Split, open_dataset

__all__ = [
    "CacheData", "CacheOptions", "CacheResult", "Classifier", "Dataset", "FastfeatError", "FinetuneOptions",
    "FinetuneResult", "HeadOptions", "HeadResult", "InputError", "Predictor", "Split", "build_cache",
    "check_head_matches", "finetune", "load_classifier", "load_head", "open_dataset", "read_cache", "train_head",
]
