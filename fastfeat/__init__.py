"""fastfeat: one frozen-backbone pass into an HDF5 feature cache, heads in seconds, real AMP fine-tuning."""
__version__ = "0.1.0"

from .cache import CacheOptions, CacheResult, build_cache  # noqa: E402
from .cache_file import CacheData, read_cache  # noqa: E402
from .errors import FastfeatError, InputError  # noqa: E402
from .sources import Dataset, Split, open_dataset  # noqa: E402

__all__ = [
    "CacheData", "CacheOptions", "CacheResult", "Dataset", "FastfeatError", "InputError", "Split",
    "build_cache", "open_dataset", "read_cache",
]
