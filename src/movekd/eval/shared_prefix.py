"""Evaluation in batches of whole images, each image's prompt prefix run once for all its questions.

:func:`image_batches` keeps every image's questions in one batch (batches in the evaluation order of
:mod:`movekd.eval.order`); :func:`generate_batch` splits each image's prompts into the prefix they
share (system, "user:", the image placeholder and what follows it in common) and their own suffixes,
and answers them with :func:`movekd.vlm.shared_generate.generate_shared_prefix`. The answers are those
of separate prompts (see there); what changes is the cost, most where images have many questions
(the AnyRes demo: about 140 image tokens of a 160-token prompt).
"""

from __future__ import annotations

from typing import Sequence

import torch

from movekd.data.collate import pad_sequences
from movekd.data.shared_prefix import group_by_image
from movekd.vlm.shared_generate import generate_shared_prefix, greedy_is_argmax, shared_prefix_length


def can_share_prefix(vlm, generate_kwargs: dict) -> bool:
    """True for a :class:`movekd.vlm.MoveKDVLM` decoding greedily with no extra generation options
    (anything else, e.g. an exported HF model or sampling, keeps its own ``generate``)."""
    from movekd.vlm import MoveKDVLM

    return isinstance(vlm, MoveKDVLM) and not generate_kwargs and greedy_is_argmax(vlm.llm.generation_config)


def image_batches(samples: Sequence[dict], order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sample indices in batches of whole images (all questions of an image in one batch, at most
    ``batch_size`` questions per batch unless one image has more), images taken in ``order`` of
    their first question."""
    rank = {index: position for position, index in enumerate(order)}
    groups = sorted(group_by_image(list(samples)), key=lambda members: rank[members[0]])
    batches: list[list[int]] = []
    current: list[int] = []
    for members in groups:
        if current and len(current) + len(members) > batch_size:
            batches.append(current)
            current = []
        current.extend(members)
    if current:
        batches.append(current)
    return batches


def generate_batch(vlm, batch: dict, samples: Sequence[dict], *, max_new_tokens: int, eos_token_id,
                   pad_token_id: int, return_logits: bool = False):
    """Greedy answers ``[Q, T]`` to the questions of a collated batch of whole images (left-padded,
    as :func:`image_batches` makes them), each image's prefix run once; None if some image's prompts
    share no prefix holding the image (the caller then runs the batch as separate prompts).
    ``return_logits``: ``(tokens, logits)`` as :func:`generate_shared_prefix` returns them."""
    from movekd.data.anyres import AnyResImages

    indices = batch["indices"]
    rows = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    keys = [samples[i].get("image") for i in indices]
    starts = [r for r in range(len(keys)) if r == 0 or keys[r] != keys[r - 1] or keys[r] is None]
    prefixes, suffixes, group_of_row = [], [], []
    for group, (start, end) in enumerate(zip(starts, starts[1:] + [len(keys)])):
        length = shared_prefix_length(rows[start:end])
        if length == 0:
            return None
        prefixes.append(rows[start][:length])
        suffixes += [row[length:] for row in rows[start:end]]
        group_of_row += [group] * (end - start)
    first = torch.zeros(len(keys), dtype=torch.bool)
    first[starts] = True
    images = batch["images"]
    images = images.select(first) if isinstance(images, AnyResImages) else images[first]
    device = next(vlm.parameters()).device
    ones = [torch.ones(len(s), dtype=torch.long) for s in prefixes + suffixes]
    return generate_shared_prefix(
        vlm, images.to(device),
        pad_sequences(prefixes, pad_token_id, "right").to(device),
        pad_sequences(ones[:len(prefixes)], 0, "right").to(device),
        pad_sequences(suffixes, pad_token_id, "left").to(device),
        pad_sequences(ones[len(prefixes):], 0, "left").to(device),
        torch.tensor(group_of_row, device=device),
        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        return_logits=return_logits)
