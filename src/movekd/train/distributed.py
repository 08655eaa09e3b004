"""Decisions and loss normalisation that every data-parallel rank agrees on.

Two rules keep N processes equivalent to one process with the same global batch:

1. **Skips are collective.** A rank whose batch is empty (every sample skipped) or whose loss is
   not finite must not ``continue`` alone: the other ranks would enter backward, and one rank's
   gradient all-reduce would pair with another rank's next batch. Every skip decision is an
   all-reduced flag, so all ranks skip the same micro-batch.
2. **Means are global.** Each loss term is a mean over items: supervised tokens (``L_text``),
   distilled samples (``L_kd``, Eq. 2) and samples (``L_bal``). DDP averages gradients over ranks,
   so a rank's per-rank mean would weight a token by ``1 / (world * n_rank)`` instead of
   ``1 / n_global``. As transformers' ``average_tokens_across_devices``, the item counts are
   all-reduced and each rank's term is rescaled by ``n_rank * world / n_global``; the average over
   ranks is then exactly the global mean (its gradient too). The balance loss is a per-sample mean
   of ``sum_e importance_e * load_e`` (functional/balance.py), so it decomposes the same way.

With one process nothing is rescaled or reduced, so single-process numerics are unchanged.
"""

from __future__ import annotations

import math

import torch

from movekd.train.kd_model import StepLosses

TERMS = ("text", "kd", "balance")


class RankSync:
    """Collectives over the data-parallel ranks of an Accelerator (no-ops with one process)."""

    def __init__(self, accelerator):
        self.world = accelerator.num_processes
        self.device = accelerator.device

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on some rank."""
        return self.sum([float(flag)])[0] > 0

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def agree_on_step(sync: RankSync, losses: StepLosses, lambda_kd: float, lambda_balance: float
                  ) -> tuple[StepLosses, bool]:
    """``(losses with globally normalised terms, finite on every rank)``: one all-reduce of the item
    counts and of a non-finite flag. Unchanged losses with one process."""
    finite = bool(torch.isfinite(losses.total))
    if not sync.active:
        return losses, finite
    reduced = sync.sum([float(losses.counts.get(t, 0)) for t in TERMS] + [float(not finite)])
    totals, bad = dict(zip(TERMS, reduced[:3])), reduced[3] > 0
    if bad:
        return losses, False

    def rescale(term, name):
        if term is None or not totals[name]:
            return None
        return term * (losses.counts[name] * sync.world / totals[name])

    text = rescale(losses.text, "text")
    if text is None:  # no supervised token on any rank: keep the graph, contribute nothing
        text = losses.text.nan_to_num() * 0.0
    kd, balance = rescale(losses.kd, "kd"), rescale(losses.balance, "balance")
    total = text
    if kd is not None:
        total = total + lambda_kd * kd
    if balance is not None:
        total = total + lambda_balance * balance
    return StepLosses(total=total, text=text, kd=kd, balance=balance, kd_per_teacher=losses.kd_per_teacher,
                      teacher_weights=losses.teacher_weights, expert_usage=losses.expert_usage,
                      counts=losses.counts), True


def global_record(sync: RankSync, record: dict[str, float]) -> dict[str, float]:
    """Metrics of one step as global means: the rescaled terms average to the global means; the
    diagnostics (per-teacher KD, teacher weights, expert usage) are averaged over the ranks that
    have them."""
    if not sync.active:
        return record
    records = sync.gather(record)
    keys = sorted({k for r in records for k in r})
    out = {}
    for key in keys:
        if key in ("loss", *TERMS):
            out[key] = sum(r.get(key, 0.0) for r in records) / sync.world
        else:
            values = [r[key] for r in records if key in r and math.isfinite(r[key])]
            if values:
                out[key] = sum(values) / len(values)
    return out
