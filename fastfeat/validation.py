"""Which rows validate a run, decided once for train-head, knn and finetune: the data's own val split
when it has one (all of train fits), else a class-stratified, seeded holdout of train, else (at
--val-fraction 0) the test split every epoch, the original recipe's protocol. The plan also says, in one
phrase, what was validated on, and owns the one error of a holdout that holds out nothing."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .sources import stratified_holdout

# the short names the plots give each kind's validation curve
LABELS = {"holdout": "validation", "val": "val split", "test": "test (every epoch)"}


@dataclass(frozen=True)
class ValidationPlan:
    """`kind`: "val" (the data's own val split), "holdout" (`fraction` of train, drawn with `seed`) or "test";
    `owner` names whose val split it is ("cache" or "dataset") in the description."""

    kind: str = "holdout"
    fraction: float = 0.1
    seed: int = 0
    owner: str = "cache"

    @classmethod
    def choose(cls, has_own_val: bool, fraction: float, seed: int, owner: str = "cache") -> ValidationPlan:
        """The plan for data with (or without) its own val split at --val-fraction `fraction`."""
        kind = "val" if has_own_val else "holdout" if fraction > 0 else "test"
        return cls(kind, fraction, seed, owner)

    def split(self, train_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The (fit, validation) rows of train under a holdout, each sorted; None when all of train fits."""
        if self.kind != "holdout":
            return None
        fit, val = stratified_holdout(train_labels, self.fraction, self.seed)
        if len(val) == 0:
            raise InputError(f"--val-fraction {self.fraction:g} holds out no row of {len(train_labels)}: no class has "
                             "two train rows (raise it, or pass 0)")
        return fit, val

    def describe(self) -> str:
        """What the validation numbers were measured on, as the summaries say it."""
        if self.kind == "holdout":
            return f"on {self.fraction:g} of train held out"
        if self.kind == "val":
            return f"on the {self.owner}'s own val split"
        return "on the test split every epoch (--val-fraction 0, the recipe's protocol)"
