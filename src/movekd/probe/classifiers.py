"""Probe classifiers on frozen features: multinomial logistic regression (L2) and cosine kNN.

Both are deterministic (float64, full-batch L-BFGS, no random initialisation) so a probe table is
reproducible to the last digit on the same machine.

Linear probe: features standardised with the training mean and std, then
``min_W,b  mean_i CE(W x_i + b, y_i) + l2 * ||W||^2`` (the bias is not penalised). ``l2`` is chosen
from ``L2_GRID`` on a fixed 20 % hold-out of the training split (largest accuracy, ties to the
stronger penalty), then the probe is refitted on the whole training split.

kNN: cosine similarity between L2-normalised features; each of the ``k`` nearest training samples
votes for its class with weight ``exp(similarity / temperature)`` (DINO's weighted kNN, T = 0.07).
"""

from __future__ import annotations

import torch
from torch import Tensor

from movekd.errors import OptionError

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _check(x: Tensor, y: Tensor, name: str) -> None:
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: expected features [N, D] and labels [N], got {tuple(x.shape)} and {tuple(y.shape)}")


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """Weights ``[D, C]`` and bias ``[C]`` of an L2-regularised multinomial logistic regression."""
    _check(x, y, "fit_logistic")
    x = x.double()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mean = train.double().mean(0)
    std = train.double().std(0).clamp_min(1e-6)
    return [(t.double() - mean) / std for t in (train, *others)]


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 l2_grid: tuple[float, ...] = L2_GRID) -> dict:
    """Test accuracy of the linear probe and the chosen ``l2``."""
    _check(train_x, train_y, "linear_probe train")
    _check(test_x, test_y, "linear_probe test")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    n_val = max(1, len(train_y) // 5)
    # A fixed hold-out: every 5th training sample (the split itself is already seeded and shuffled).
    val_mask = torch.zeros(len(train_y), dtype=torch.bool)
    val_mask[::5] = True
    val_mask[n_val * 5:] = False
    best = None
    fit_x, val_x = _standardise(train_x[~val_mask], train_x[val_mask])
    for l2 in sorted(l2_grid, reverse=True):
        w, b = fit_logistic(fit_x, train_y[~val_mask], num_classes, l2)
        acc = ((val_x @ w + b).argmax(-1) == train_y[val_mask]).double().mean().item()
        if best is None or acc > best[0]:
            best = (acc, l2)
    l2 = best[1]
    tr, te = _standardise(train_x, test_x)
    w, b = fit_logistic(tr, train_y, num_classes, l2)
    accuracy = ((te @ w + b).argmax(-1) == test_y).double().mean().item()
    return {"accuracy": accuracy, "l2": l2}


def knn_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int = 20,
              temperature: float = 0.07) -> dict:
    """Test accuracy of similarity-weighted cosine kNN."""
    _check(train_x, train_y, "knn_probe train")
    _check(test_x, test_y, "knn_probe test")
    if k < 1:
        raise OptionError(f"k must be >= 1, got {k}")
    k = min(k, len(train_y))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    a = torch.nn.functional.normalize(train_x.double(), dim=-1)
    q = torch.nn.functional.normalize(test_x.double(), dim=-1)
    sim, idx = (q @ a.T).topk(k, dim=-1)
    votes = torch.zeros(len(test_y), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx], torch.exp(sim / temperature))
    accuracy = (votes.argmax(-1) == test_y).double().mean().item()
    return {"accuracy": accuracy, "k": k}
