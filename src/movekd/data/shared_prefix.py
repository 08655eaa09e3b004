"""Questions about one image trained as one sequence with a shared prefix (``group_by_image``).

VQA-style data asks several independent questions about each image (easy-vqa: ~10; VQAv2 in
LLaVA's mix665k: several). As separate samples, every question pays for the image again: the
encoder and teacher passes, and the N image tokens in the LLM (36 of a ~64-token sequence in the demo).
Grouped, a sample is *one* image with k questions laid out as

    [ shared prefix: system, "user:", <image> ... ] [ suffix 1 ] [ suffix 2 ] ... [ suffix k ]

where ``prefix + suffix_i`` is exactly the token sequence of question i encoded on its own. A
block attention mask lets every suffix see the prefix and itself only, and positions restart after
the prefix for each suffix (``segment_ids``: 0 for the prefix, i for suffix i, -1 for padding; the
VLM turns them into the 4-D mask and position ids, :func:`movekd.vlm.model.segment_attention`).
So each answer token gets the same logits as in its own sequence, and the loss (mean over supervised
tokens) is that of a batch holding all k questions as separate samples; no question can read
another's answer. What changes is the cost: the image and the prefix are computed once per image.

This differs from LLaVA's multi-turn conversations (one turn after another, later turns see the
earlier answers): that shortcut would let a model answer "what colour is the shape?" from an
earlier "what is the blue shape?", which a single-question test never offers.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from movekd.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Encoded, EncodingError, expanded_length

PAD_SEGMENT = -1  # the prefix is segment 0, question i is segment i


def group_by_image(samples: list[dict], max_per_group: int | None = None) -> list[list[int]]:
    """Indices of ``samples`` grouped by their ``image`` field, in order of first appearance.

    Samples without an image stay alone. Groups larger than ``max_per_group`` are split into
    consecutive chunks of at most that size.
    """
    if max_per_group is not None and max_per_group < 1:
        raise ValueError(f"max_per_group must be >= 1, got {max_per_group}")
    by_image: OrderedDict[object, list[int]] = OrderedDict()
    for i, sample in enumerate(samples):
        image = sample.get("image")
        by_image.setdefault(image if image is not None else ("#text", i), []).append(i)
    groups = []
    for members in by_image.values():
        size = max_per_group or len(members)
        groups.extend(members[k:k + size] for k in range(0, len(members), size))
    return groups


def merge_shared_prefix(encodings: list[Encoded], *, max_length: int | None = None,
                        num_image_tokens: int = 1) -> tuple[Encoded, torch.Tensor, int]:
    """Lay out several encodings of the same image as one shared-prefix sequence.

    The prefix is the longest common token prefix, cut so that every suffix starts with at least one
    unsupervised token (the token before an answer is predicted from its own suffix, never from the
    previous one). The image placeholder must lie in the prefix. With ``max_length`` (LLM length
    after image expansion) suffixes that do not fit are left out, in order.

    Returns ``(Encoded(input_ids, labels), segment_ids, number of questions kept)``.
    Raises :class:`EncodingError` if no prefix holds the image or not even one question fits.
    """
    if not encodings:
        raise EncodingError("no question to group", "template")
    seqs = [e.input_ids for e in encodings]
    shortest = min(len(s) for s in seqs)
    common = 0
    while common < shortest and all(int(s[common]) == int(seqs[0][common]) for s in seqs):
        common += 1
    for e in encodings:
        supervised = (e.labels != IGNORE_INDEX).nonzero()
        if supervised.numel():
            common = min(common, int(supervised[0]) - 1)
    if common <= 0 or not bool((seqs[0][:common] == IMAGE_TOKEN_INDEX).any()):
        raise EncodingError("the questions of this image share no prefix holding the <image> placeholder", "template")
    prefix_ids = seqs[0][:common]
    ids, labels, segments = [prefix_ids], [encodings[0].labels[:common]], [torch.zeros(common, dtype=torch.long)]
    length = expanded_length(prefix_ids, num_image_tokens)
    kept = 0
    for e in encodings:
        suffix = e.input_ids[common:]
        if max_length is not None and length + len(suffix) > max_length:
            continue
        kept += 1
        length += len(suffix)
        ids.append(suffix)
        labels.append(e.labels[common:])
        segments.append(torch.full((len(suffix),), kept, dtype=torch.long))
    if not kept:
        raise EncodingError(f"not one question fits in max_length={max_length} after the shared prefix", "too_long")
    return Encoded(torch.cat(ids), torch.cat(labels)), torch.cat(segments), kept
