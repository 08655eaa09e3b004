"""The learning-rate schedule: linear warm-up, then cosine down to a floor (0 by default, as LLaVA)."""

from __future__ import annotations

import pytest
import torch

from movekd.train.optim import build_scheduler


def _lrs(total: int, warmup_ratio: float, min_lr_ratio: float = 0.0) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = build_scheduler(optimizer, total, warmup_ratio, min_lr_ratio)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_rises_then_cosine_decays_to_zero():
    lrs = _lrs(100, 0.1)
    assert lrs[0] < lrs[5] < lrs[9] < 2.0
    assert lrs[10] == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01


def test_min_lr_ratio_is_the_floor_of_the_cosine():
    lrs = _lrs(100, 0.1, min_lr_ratio=0.3)
    assert lrs[10] == pytest.approx(2.0)
    assert min(lrs[10:]) >= 0.6 - 1e-9
    assert lrs[-1] == pytest.approx(0.6, abs=0.01)
    # halfway through the decay it sits halfway between the peak and the floor
    assert lrs[55] == pytest.approx(1.3, abs=0.01)
