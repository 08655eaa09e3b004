"""Greedy answers to several questions about one image, the image's prompt prefix computed once.

Evaluation sets ask several questions about each image (easy-vqa about 10, GQA, POPE, MME 2). Run as
separate prompts, every question pays again for the vision encoder and for the LLM prefill of the
image tokens, which are most of a VQA prompt (the AnyRes demo: about 140 of 160 tokens). Here each
image's common prompt prefix (system turn, "user:", the image tokens and whatever the questions share
after them) runs once; its key/value cache is copied to each of the image's questions, and only the
questions' own tokens and the answers run per question.

The tokens are those of :meth:`movekd.vlm.MoveKDVLM.generate` (greedy, same positions: a question's
positions continue from its prefix; causal attention: the prefix's keys and values do not depend on
what follows it), up to the float rounding of differently shaped matmuls. Like ``generate`` it
returns only the new tokens, ``pad_token_id`` after a row's EOS.
"""

from __future__ import annotations

import torch

from movekd.data.templates import IMAGE_TOKEN_INDEX

# Generation-config fields that make HF's greedy choice differ from a plain argmax: with any of them
# set, callers keep ``MoveKDVLM.generate`` (:func:`greedy_is_argmax`).
_ARGMAX_CHANGERS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
                    "bad_words_ids": None, "min_length": 0, "min_new_tokens": None, "forced_bos_token_id": None,
                    "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                    "sequence_bias": None, "renormalize_logits": False}


def greedy_is_argmax(generation_config) -> bool:
    """True if the LLM's generation config leaves greedy decoding a plain argmax per step."""
    for name, neutral in _ARGMAX_CHANGERS.items():
        value = getattr(generation_config, name, neutral)
        if value is not None and value != neutral:
            return False
    return True


def shared_prefix_length(rows: list[torch.Tensor], image_token_index: int = IMAGE_TOKEN_INDEX) -> int:
    """Length of the longest common token prefix of ``rows`` (one image's prompts), cut so that every
    prompt keeps at least its last token (which predicts the answer's first token); 0 if that prefix
    does not hold the image placeholder (then there is nothing worth sharing)."""
    shortest = min(len(r) for r in rows)
    common = 0
    while common < shortest - 1 and all(int(r[common]) == int(rows[0][common]) for r in rows):
        common += 1
    return common if bool((rows[0][:common] == image_token_index).any()) else 0


@torch.no_grad()
def generate_shared_prefix(vlm, images, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                           suffix_ids: torch.Tensor, suffix_mask: torch.Tensor, group_of_row: torch.Tensor, *,
                           max_new_tokens: int, eos_token_id: int | list[int] | None, pad_token_id: int,
                           return_logits: bool = False):
    """Greedy answers ``[Q, T]`` to Q questions about G images.

    Args:
        vlm: a :class:`movekd.vlm.MoveKDVLM`.
        images: the G images (a tensor or :class:`movekd.data.anyres.AnyResImages`).
        prefix_ids, prefix_mask: ``[G, P]`` each image's shared prompt prefix, right-padded, holding
            its image placeholder.
        suffix_ids, suffix_mask: ``[Q, S]`` each question's own prompt tokens, left-padded (so every
            question ends at the last column; the padding between prefix and suffix is masked and
            skipped by the positions).
        group_of_row: ``long [Q]`` the image (0..G-1) of each question.
        return_logits: also return each step's next-token logits ``[Q, T, V]`` (as HF's
            ``output_logits``), to compare with separate prompts.

    Returns:
        ``[Q, T]`` new tokens, or ``(tokens, logits)`` with ``return_logits``.
    """
    llm = vlm.llm
    # Prefixes right-padded: no query row of the prefix pass is all padding (eager attention gives such a
    # row NaN hidden states, whose keys and values the questions would then read).
    _, embeds, mask, position_ids, _ = vlm.prepare_inputs(images, prefix_ids, prefix_mask, padding_side="right")
    cache = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1).cache
    cache.batch_select_indices(group_of_row.to(mask.device))  # each question its image's keys and values
    mask = torch.cat([mask[group_of_row], suffix_mask.to(mask.dtype)], 1)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -suffix_ids.shape[1]:]
    logits = llm(input_ids=suffix_ids, attention_mask=mask, position_ids=positions, cache=cache,
                 use_cache=True, logits_to_keep=1).logits
    eos_ids = [] if eos_token_id is None else list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) \
        else [eos_token_id]
    eos = torch.tensor(eos_ids, dtype=torch.long, device=suffix_ids.device)  # none: run max_new_tokens
    finished = torch.zeros(suffix_ids.shape[0], dtype=torch.bool, device=suffix_ids.device)
    new_tokens, step_logits = [], []
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(-1).masked_fill(finished, pad_token_id)
        new_tokens.append(token)
        step_logits.append(logits[:, -1])
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        positions = positions[:, -1:] + 1
        logits = llm(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                     use_cache=True).logits
    tokens = torch.stack(new_tokens, 1) if new_tokens else suffix_ids.new_zeros(suffix_ids.shape[0], 0)
    if return_logits:
        return tokens, torch.stack(step_logits, 1) if step_logits else logits[:, :0]
    return tokens
