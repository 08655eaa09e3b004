"""Exact-match VQA evaluation (easy-vqa style short answers) and the answer-prior baseline.

Scoring rule (:func:`normalize_answer`): lowercase; keep the first non-empty line; turn punctuation
into spaces; collapse whitespace; then, with ``word="first"`` (the default, made for easy-vqa's
single-word answers: shapes, colours, yes/no), keep only the first word; ``word="last"`` keeps the
last one (for answers trained to follow a rationale, "a blue circle; not red: yes"); ``word="all"``
keeps them all. The prediction is correct when its normalised form equals the normalised reference.
So ``"Yes."`` and ``"yes, it is"`` match ``"yes"``, but ``"The answer is yes"`` does not (with
``"first"``): this is strict exact match, not a containment test.

Samples are LLaVA-format dicts; the reference is the last gpt turn, the prompt is everything before
it (see :meth:`ConversationEncoder.encode_prompt`). An optional ``"type"`` field
(easy-vqa: ``"yes/no"``, ``"shape"``, ``"color"``) gives per-type accuracies. Samples the dataset
skips (missing or corrupt image, prompt too long) count as wrong and are reported in ``"skipped"``.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import torch
from torch.utils.data import DataLoader

from movekd.config.answer import ANSWER_WORDS, AnswerWord
from movekd.data.collate import Collator, pad_token_id_of
from movekd.data.llava_json import LlavaDataset, validate_samples
from movekd.data.templates import ROLE_MAP, ConversationEncoder
from movekd.eval.order import length_sorted_order
from movekd.eval.shared_prefix import can_share_prefix, generate_batch, image_batches

_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str, *, word: AnswerWord = "first") -> str:
    """Normalise an answer for exact match (see the module docstring)."""
    if word not in ANSWER_WORDS:
        raise ValueError(f"answer word {word!r}: expected one of {', '.join(ANSWER_WORDS)}")
    lines = [ln for ln in text.lower().splitlines() if ln.strip()]
    words = _PUNCT.sub(" ", lines[0]).split() if lines else []
    if not words:
        return ""
    if word == "first":
        return words[0]
    return words[-1] if word == "last" else " ".join(words)


def reference_answer(sample: dict) -> str:
    """The sample's last gpt turn."""
    for turn in reversed(sample["conversations"]):
        if ROLE_MAP.get(turn["from"]) == "assistant":
            return turn["value"]
    raise ValueError(f"sample {sample.get('id')!r} has no gpt turn to score against")


def _summarise(correct: list[bool], types: list[str | None]) -> dict:
    per_type: dict[str, list[bool]] = defaultdict(list)
    for ok, t in zip(correct, types):
        if t is not None:
            per_type[t].append(ok)
    n = len(correct)
    return {
        "accuracy": sum(correct) / n if n else 0.0,
        "correct": int(sum(correct)),
        "n": n,
        "per_type": {t: {"accuracy": sum(v) / len(v), "correct": int(sum(v)), "n": len(v)}
                     for t, v in sorted(per_type.items())},
    }


@torch.no_grad()
def evaluate_vqa(vlm, tokenizer, samples: list[dict], batch_size: int = 16, max_new_tokens: int = 8, *,
                 image_root=".", template: str = "chat", image_size: int = 224,
                 encoder: ConversationEncoder | None = None, system_prompt: str | None = None,
                 bos: str = "auto", word: AnswerWord = "first", num_workers: int = 0, return_predictions: bool = False,
                 image_aspect_ratio: str = "stretch", fill: tuple[int, int, int] = (0, 0, 0),
                 grid_pinpoints=None, share_image_prefix: bool = True, **generate_kwargs) -> dict:
    """Batched greedy generation on ``samples`` and exact-match accuracy.

    Args:
        vlm: a :class:`movekd.vlm.MoveKDVLM` (any device / dtype; batches follow its parameters).
        tokenizer: the LLM's tokenizer (pad and EOS ids, decoding).
        samples: LLaVA-format samples with a final gpt turn (the reference).
        image_root: folder the samples' image paths are relative to.
        template / system_prompt / bos: used to build a :class:`ConversationEncoder` unless ``encoder`` is given
            (it must match training).
        image_size: the square resize used in training.
        image_aspect_ratio / fill: how images become squares (:mod:`movekd.data.images`), as in training.
        grid_pinpoints: the AnyRes grid when ``image_aspect_ratio="anyres"`` (``image_size``: the crop side).
        word: which word of an answer is compared (:func:`normalize_answer`): ``"first"``, ``"last"``
            (answers that end a rationale) or ``"all"``.
        share_image_prefix: batch each image's questions together and run their common prompt prefix
            (the image tokens) once (:mod:`movekd.eval.shared_prefix`; same greedy answers up to float
            rounding). Applies to a ``MoveKDVLM`` decoding greedily without ``generate_kwargs``.

    Returns:
        ``{"accuracy", "correct", "n", "skipped", "per_type": {type: {"accuracy", "correct", "n"}}}``,
        plus ``"predictions"`` (one dict per sample: id, type, prediction, answer, correct) if asked.
    """
    validate_samples(samples, source="evaluate_vqa samples", require_answer=True)
    if encoder is None:
        encoder = ConversationEncoder(tokenizer, template, system_prompt=system_prompt, bos=bos)
    dataset = LlavaDataset(samples, encoder, image_root=image_root, image_size=image_size, prompt_only=True,
                           image_aspect_ratio=image_aspect_ratio, fill=fill, grid_pinpoints=grid_pinpoints)
    pad_id = pad_token_id_of(tokenizer)
    # Batches of similar prompt lengths (AnyRes: crop counts): less left padding in the prefill.
    order = length_sorted_order(samples, image_root=image_root, image_aspect_ratio=image_aspect_ratio,
                                grid_pinpoints=grid_pinpoints, crop_size=image_size)
    collate = Collator(pad_id, padding_side="left", image_size=image_size)
    share = share_image_prefix and can_share_prefix(vlm, generate_kwargs)
    if share:
        loader = DataLoader(dataset, batch_sampler=image_batches(samples, order, batch_size), num_workers=num_workers,
                            collate_fn=collate)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=num_workers, collate_fn=collate)
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else vlm_eos(vlm)
    device = next(vlm.parameters()).device
    predictions: dict[int, str] = {}
    skipped = 0
    was_training = vlm.training
    vlm.eval()
    try:
        for batch in loader:
            skipped += len(batch["skipped"])
            if not batch["indices"]:
                continue
            out = generate_batch(vlm, batch, samples, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                                 pad_token_id=pad_id) if share else None
            if out is None:
                out = vlm.generate(batch["images"].to(device), batch["input_ids"].to(device),
                                   batch["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                                   eos_token_id=eos_id, pad_token_id=pad_id, **generate_kwargs)
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            predictions.update(zip(batch["indices"], texts))
    finally:
        vlm.train(was_training)

    correct, types, records = [], [], []
    for i, sample in enumerate(samples):
        answer = reference_answer(sample)
        pred = predictions.get(i)
        ok = pred is not None and normalize_answer(pred, word=word) == normalize_answer(answer, word=word)
        correct.append(ok)
        types.append(sample.get("type"))
        if return_predictions:
            records.append({"id": sample.get("id", i), "type": sample.get("type"), "prediction": pred,
                            "answer": answer, "correct": ok})
    result = _summarise(correct, types)
    result["skipped"] = skipped
    if return_predictions:
        result["predictions"] = records
    return result


def vlm_eos(vlm):
    """The LLM's own EOS id(s), for a tokenizer without one."""
    config = getattr(getattr(vlm, "llm", None), "generation_config", None)
    return getattr(config, "eos_token_id", None)


def answer_prior_baseline(train_samples: list[dict], test_samples: list[dict], *, word: AnswerWord = "first") -> dict:
    """Accuracy of answering every test question with the most frequent training answer of its type.

    A sample's type is its ``"type"`` field. A sample without one gets the type that its (normalised)
    answer has among the typed samples of either list (easy-vqa answers identify their type), else
    ``"all"``. A test type unseen in training is answered with the overall most frequent answer.

    Returns ``{"accuracy", "correct", "n", "per_type": {...}, "prior": {type: answer}}``.
    """
    norm = lambda s: normalize_answer(reference_answer(s), word=word)  # noqa: E731
    answer_type: dict[str, str] = {}
    for s in list(train_samples) + list(test_samples):
        if s.get("type") is not None:
            answer_type.setdefault(norm(s), s["type"])

    def type_of(s):
        return s.get("type") or answer_type.get(norm(s), "all")

    by_type: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for s in train_samples:
        a = norm(s)
        by_type[type_of(s)][a] += 1
        overall[a] += 1
    if not overall:
        raise ValueError("answer_prior_baseline needs at least one training sample")
    prior = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
    fallback = overall.most_common(1)[0][0]

    correct, types = [], []
    for s in test_samples:
        t = type_of(s)
        correct.append(prior.get(t, fallback) == norm(s))
        types.append(t)
    result = _summarise(correct, types)
    result["prior"] = dict(sorted(prior.items()))
    return result
