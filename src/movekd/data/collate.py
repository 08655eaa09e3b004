"""Batching for :class:`~movekd.data.llava_json.LlavaDataset` items.

Padding: ``input_ids`` with ``pad_token_id``, ``labels`` with -100, ``attention_mask`` 0. Right
padding for training; left padding (``padding_side="left"``) for batched generation, so that every
prompt ends at the last column. The image placeholder id (-200) is never used as padding.

Skipped samples (:class:`Skipped` markers) are dropped; the batch reports them in
``batch["skipped"]`` (a list of markers) because the collator runs inside DataLoader workers, where
a counter would be lost. If every sample of a batch was skipped, the tensors have batch size 0:
the training loop must skip such a batch (``batch["input_ids"].shape[0] == 0``).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from movekd.data.llava_json import Skipped
from movekd.data.shared_prefix import PAD_SEGMENT
from movekd.data.templates import IGNORE_INDEX

logger = logging.getLogger(__name__)


def pad_token_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (masked by attention_mask and labels anyway), else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def pad_sequences(seqs: list[torch.Tensor], value: int, side: str = "right") -> torch.Tensor:
    """Stack 1-D tensors into ``[B, max_len]``, padding with ``value`` on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    length = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype if seqs else torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, : len(s)] = s
        else:
            out[i, length - len(s):] = s
    return out


class Collator:
    """``collate_fn`` for a DataLoader.

    Returns ``{"input_ids" [B,L], "attention_mask" [B,L], "labels" [B,L] (if the items have labels),
    "images" uint8 [B,3,H,W] (AnyRes: :class:`movekd.data.anyres.AnyResImages`), "has_image" bool [B],
    "ids", "indices", "skipped"}``, plus
    ``"segment_ids" [B,L]`` (padding -1) when items are shared-prefix groups.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", image_size: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.image_size = image_size  # only needed to shape the images of an all-skipped batch

    def __call__(self, items: list) -> dict:
        skipped = [it for it in items if isinstance(it, Skipped)]
        items = [it for it in items if it is not None and not isinstance(it, Skipped)]
        ids = [it["input_ids"] for it in items]
        input_ids = pad_sequences(ids, self.pad_token_id, self.padding_side)
        attention_mask = pad_sequences([torch.ones(len(s), dtype=torch.long) for s in ids], 0, self.padding_side)
        if items and not isinstance(items[0]["image"], torch.Tensor):  # AnyRes: crops of every image
            images = type(items[0]["image"]).cat([it["image"] for it in items])
        elif items:
            images = torch.stack([it["image"] for it in items])
        else:
            side = self.image_size or 0
            images = torch.zeros(0, 3, side, side, dtype=torch.uint8)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "images": images,
            "has_image": torch.tensor([bool(it["has_image"]) for it in items], dtype=torch.bool),
            "ids": [it["id"] for it in items],
            "indices": [it["index"] for it in items],
            "skipped": skipped,
        }
        if items and items[0].get("labels") is not None:
            batch["labels"] = pad_sequences([it["labels"] for it in items], IGNORE_INDEX, self.padding_side)
        if any("segment_ids" in it for it in items):
            # Shared-prefix items (group_by_image); a single-question item is all prefix-and-suffix 0.
            segs = [it.get("segment_ids", torch.zeros(len(it["input_ids"]), dtype=torch.long)) for it in items]
            batch["segment_ids"] = pad_sequences(segs, PAD_SEGMENT, self.padding_side)
        return batch


class SkipCounter:
    """Main-process tally of skipped samples, fed with each batch: ``counter.update(batch)``.

    Keeps the first :attr:`EXAMPLES` ids of each kind; a skip of a kind seen fewer times than that
    is logged as a warning, later ones at debug level (a 1% skip rate on 665K samples would otherwise
    write 6,650 warnings)."""

    EXAMPLES = 5

    def __init__(self):
        self.by_reason: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def add(self, reason: str, sample_id: str, detail: str = "") -> None:
        self.by_reason[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < self.EXAMPLES:
            ids.append(sample_id)
            logger.warning("skipped sample %s: %s %s; %d so far (%s)", sample_id, reason, detail,
                           self.total, dict(self.by_reason))
        else:
            logger.debug("skipped sample %s: %s %s", sample_id, reason, detail)

    def update(self, batch: dict) -> int:
        """Count and log the batch's skipped samples; returns how many there were."""
        skipped = batch.get("skipped", [])
        for s in skipped:
            self.add(s.reason, s.id, s.detail)
        return len(skipped)

    def state_dict(self) -> dict:
        return {"counts": dict(self.by_reason), "examples": self.examples}

    def load_state_dict(self, state: dict) -> None:
        if "counts" not in state:  # checkpoints before examples were kept: counts only
            state = {"counts": state, "examples": {}}
        self.by_reason = Counter(state["counts"])
        self.examples = {k: list(v) for k, v in state["examples"].items()}
