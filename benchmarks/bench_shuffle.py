"""`PYTHONPATH=$PWD python benchmarks/bench_shuffle.py`: two-level vs full shuffle: the same sgd head in memory (full randperm) and streamed (block permutation,
then rows in the block), on a cache in random row order and one sorted by class (each block one or two classes)."""
import sys

import numpy as np
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import write_cache  # noqa: E402

from fastfeat.head import HeadOptions, train_head  # noqa: E402
rng = np.random.default_rng(0)
k, d = 10, 512
def make(n):
    y = rng.integers(0, k, n); x = rng.normal(0, 1, (n, d)).astype(np.float32)
    x[:, :k] += 0.35 * np.eye(k)[y] * 4
    return x.astype(np.float16), y
(x, y), test = make(20000), make(5000)
order = np.argsort(y, kind="stable")
for name, (tx, ty) in (("random order", (x, y)), ("sorted by class", (x[order], y[order]))):
    path = Path(f"/tmp/fastfeat-shuffle-shuffle-{name.split()[0]}.h5"); path.unlink(missing_ok=True)
    write_cache(path, {"train": (tx, ty), "test": test}, classes=[str(i) for i in range(k)])
    for opt in ("sgd", "adamw"):
        accs = {}
        for budget in ("1GB", "8MB"):
            r = train_head(HeadOptions(cache=str(path), out="/tmp/fastfeat-shuffle-sh.pt", device="cpu", epochs=10, optimizer=opt,
                                       memory_budget=budget), log=lambda l: l.startswith("streaming") and print(l))
            accs[budget] = (r.test["top1"], r.best_valid_acc)
        print(f"{name} {opt}: test top1 full shuffle {accs['1GB'][0]:.4f}, two-level {accs['8MB'][0]:.4f}; "
              f"valid {accs['1GB'][1]:.4f} vs {accs['8MB'][1]:.4f}", flush=True)
