"""The tuned linear-probe reference that train-head's defaults are measured against (bench_head.py
and the tests): standardised L2 logistic regression by full-batch L-BFGS, run until converged, its L2
strength chosen on a held-out part of train, refit on all of train. Reference code, not fastfeat's."""
from __future__ import annotations

import torch

from fastfeat.head import evaluate, lbfgs_epoch, make_lbfgs, new_head
from fastfeat.model_files import LinearHead

L2_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def fit_lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 1000) -> LinearHead:
    """Standardised L2 logistic regression by full-batch L-BFGS, run until converged (or `max_iter`)."""
    head = new_head(x, num_classes)
    lbfgs_epoch(make_lbfgs(head, max_iter=max_iter), head, x, y, weight_decay)
    return head


def fit_lbfgs_reference(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                        num_classes: int, grid: tuple[float, ...] = L2_GRID, holdout: float = 0.2,
                        seed: int = 0) -> tuple[float, float]:
    """A tuned linear probe: the L2 strength with the best accuracy on a held-out `holdout` of train
    (ties: the stronger), refit on all of train. Returns (test accuracy, chosen L2 strength)."""
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed)).to(train_x.device)
    held, fit = order[: int(holdout * len(order))], order[int(holdout * len(order)) :]

    def held_out_acc(l2: float) -> float:
        return evaluate(fit_lbfgs(train_x[fit], train_y[fit], num_classes, l2), train_x[held], train_y[held])[1]

    best = max(grid, key=lambda l2: (held_out_acc(l2), l2))
    return evaluate(fit_lbfgs(train_x, train_y, num_classes, best), test_x, test_y)[1], best
