"""Decisions and loss normalisation that every data-parallel rank agrees on.

Two rules keep N processes equivalent to one process with the same global batch:

1. **Skips are collective.** A rank whose batch is empty (every sample skipped) or whose loss is
   not finite must not ``continue`` alone: the other ranks would enter backward, and one rank's
   gradient all-reduce would pair with another rank's next batch. Every skip decision is an
   all-reduced flag, so all ranks skip the same micro-batch.
2. **Means are global, over the whole optimiser step.** Each loss term is a mean over items:
   supervised tokens (``L_text``), distilled samples (``L_kd``, Eq. 2) and samples (``L_bal``).
   DDP averages gradients over ranks and gradient accumulation sums micro-batches, so per-micro-batch
   means would weight a token by ``1 / (world * accum * n_micro)`` instead of ``1 / n_step``. As
   transformers' ``num_items_in_batch`` with ``average_tokens_across_devices``, the loop reads the
   item counts of every micro-batch of the step from the batches before any forward
   (:func:`batch_item_counts`), all-reduces their sums once (:func:`step_item_totals`), and each
   micro-batch's term is rescaled by ``n_micro * world / n_step`` (:func:`agree_on_step`); summed
   over micro-batches and averaged over ranks, that is exactly the step's global mean (its gradient
   too). The balance loss is a per-sample mean of ``sum_e importance_e * load_e``
   (functional/balance.py), so it decomposes the same way.

With one process and no accumulation the scale is exactly 1, so numerics are unchanged.
"""

from __future__ import annotations

import math

import torch

from movekd.data import IGNORE_INDEX
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


def batch_item_counts(batch: dict, kd) -> dict[str, int]:
    """The items each loss term of ``batch`` averages over, read from the collated batch before the
    forward (right padding), with ``kd`` the run's KD config: supervised targets after the causal
    shift (image tokens are expanded after position 0 and never supervised, so the shift drops the
    same first column); distilled items (samples with an image unless ``kd.kd_on_text_only``; under
    AnyRes each crop of them, or only the overview with ``anyres_distill: overview``); and student
    images (balance: samples, or crops under AnyRes). The forward reports the same counts for the
    terms it computes; :func:`agree_on_step` checks that."""
    from movekd.data.anyres import AnyResImages

    labels = batch["labels"]
    samples = int(labels.shape[0])
    images = batch.get("images")
    if isinstance(images, AnyResImages):
        crops = images.crop_counts.long().cpu()
        items = torch.ones_like(crops) if kd.anyres_distill == "overview" else crops
    else:
        crops = items = torch.ones(samples, dtype=torch.long)
    has_image = batch.get("has_image")
    distilled = items if has_image is None or kd.kd_on_text_only else items[has_image.bool().cpu()]
    return {"text": int((labels[:, 1:] != IGNORE_INDEX).sum()), "kd": int(distilled.sum()),
            "balance": int(crops.sum())}


def step_item_totals(sync: RankSync, micro_counts: list[dict[str, int]]) -> dict[str, float]:
    """Item counts of one optimiser step: summed over its micro-batches and over ranks (one all-reduce)."""
    local = [float(sum(c[t] for c in micro_counts)) for t in TERMS]
    return dict(zip(TERMS, sync.sum(local)))


def agree_on_step(sync: RankSync, losses: StepLosses, lambda_kd: float, lambda_balance: float,
                  expected: dict[str, int], totals: dict[str, float]) -> tuple[StepLosses, bool]:
    """``(losses with step-normalised terms, finite on every rank)`` for one micro-batch whose item
    counts are ``expected`` (:func:`batch_item_counts`) in a step of ``totals``
    (:func:`step_item_totals`). One all-reduce of a non-finite flag with several processes."""
    finite = bool(torch.isfinite(losses.total))
    if sync.active:
        finite = not sync.any(not finite)
    if not finite:
        return losses, False
    for name in TERMS:
        if getattr(losses, name) is not None and losses.counts.get(name) != expected[name]:
            raise RuntimeError(
                f"the forward averaged the {name} loss over {losses.counts.get(name)} items but the batch has "
                f"{expected[name]}: movekd.train.distributed.batch_item_counts no longer matches MoveKDModel")

    def rescale(term, name):
        if term is None or not totals[name]:
            return None
        scale = expected[name] * sync.world / totals[name]
        return term if scale == 1.0 else term * scale

    text = rescale(losses.text, "text")
    if text is None:  # no supervised token on any rank: keep the graph, contribute nothing
        text = losses.text.nan_to_num() * 0.0
    kd, balance = rescale(losses.kd, "kd"), rescale(losses.balance, "balance")
    if text is losses.text and kd is losses.kd and balance is losses.balance:
        total = losses.total  # nothing rescaled (one process, one micro-batch): the forward's own sum
    else:
        total = text
        if kd is not None:
            total = total + lambda_kd * kd
        if balance is not None:
            total = total + lambda_balance * balance
    return StepLosses(total=total, text=text, kd=kd, balance=balance, kd_per_teacher=losses.kd_per_teacher,
                      teacher_weights=losses.teacher_weights, expert_usage=losses.expert_usage,
                      counts=losses.counts), True


def step_record(records: list[dict[str, float]]) -> dict[str, float]:
    """One rank's record of an optimiser step from its micro-batches' records: the rescaled terms
    add up (their sum over micro-batches, averaged over ranks, is the step's global mean), the
    diagnostics are averaged."""
    keys = sorted({k for r in records for k in r})
    out = {}
    for key in keys:
        values = [r[key] for r in records if key in r]
        out[key] = sum(values) if key in ("loss", *TERMS) else sum(values) / len(values)
    return out


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
