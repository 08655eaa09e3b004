"""``MoveKDVLM``: vision encoder (the student) → projector → causal LLM, LLaVA style.

Image placeholders: ``input_ids`` holds one :data:`IMAGE_TOKEN_INDEX` (-200) where an image goes.
:func:`merge_image_tokens` replaces each placeholder of sample ``b`` by the N projected tokens of
image ``b`` (``images`` has one image per sample; a sample with several placeholders gets its image
at each; a sample with none, e.g. text-only, ignores its image), with labels -100 on image
positions. This is the semantics of LLaVA's ``prepare_inputs_labels_for_multimodal`` for one image
per sample, done with a few scatters instead of a Python loop over samples.

Padding: the merged sequences keep the batch's padding side. Rows that gain fewer image tokens than
others are padded on the right for right-padded batches (training) and on the left for left-padded
ones (generation), so prompts still end at the last column. ``position_ids`` are computed from the
attention mask, so either side gives the same result per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from movekd.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass
class VLMOutput:
    """What :meth:`MoveKDVLM.forward` returns."""

    loss: torch.Tensor | None  # LM cross-entropy (HF semantics: mean over supervised tokens), or None
    logits: torch.Tensor | None  # [B, L', V] on the merged sequence (None with supervised_logits_only)
    vision: Any  # the vision module's output (``.tokens`` [B,N,D] etc.): reuse it for the KD loss
    attention_mask: torch.Tensor  # [B, L'] merged
    labels: torch.Tensor | None  # [B, L'] merged (-100 on image tokens and padding)


def infer_padding_side(attention_mask: torch.Tensor) -> str:
    """``"left"`` if some row starts with padding, else ``"right"``."""
    return "left" if attention_mask.shape[1] and not bool(attention_mask[:, 0].all()) else "right"


def _expanded_positions(is_img: torch.Tensor, num_image_tokens: int | torch.Tensor) -> torch.Tensor:
    """``[B, L]`` new position of every old position once each placeholder (``is_img``) becomes
    ``num_image_tokens`` positions (an int, or ``[B]`` per row: AnyRes images differ in length):
    shifted by N-1 for each placeholder before it (right-aligned layout; left padding adds its own offset)."""
    before = torch.cumsum(is_img.long(), 1) - is_img.long()
    if isinstance(num_image_tokens, torch.Tensor):
        num_image_tokens = num_image_tokens.unsqueeze(1)
    return torch.arange(is_img.shape[1], device=is_img.device).unsqueeze(0) + before * (num_image_tokens - 1)


def merge_image_tokens(text_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor | None, image_embeds: torch.Tensor | None, *,
                       image_token_index: int = IMAGE_TOKEN_INDEX, padding_side: str | None = None):
    """Expand each image placeholder into the image's tokens.

    Args:
        text_embeds: ``[B, L, D]`` embeddings of ``input_ids`` (placeholder rows are ignored).
        input_ids, attention_mask, labels: ``[B, L]``.
        image_embeds: ``[B, N, D]`` projected image tokens, one image per sample, or a list of B
            ``[N_b, D]`` (AnyRes: a length per image); None if there are no placeholders.
        padding_side: ``"right"``, ``"left"`` or None (inferred from ``attention_mask``).

    Returns:
        ``(inputs_embeds [B,L',D], attention_mask [B,L'], position_ids [B,L'], labels [B,L'] or None)``.
    """
    B, L, D = text_embeds.shape
    is_img = input_ids == image_token_index
    counts = is_img.sum(1)
    if padding_side is None:
        padding_side = infer_padding_side(attention_mask)
    if bool(counts.any()):
        if image_embeds is None:
            raise ValueError("input_ids contain image placeholders but no images were given")
        if len(image_embeds) != B:
            raise ValueError(f"expected one image per sample ({B}), got {len(image_embeds)}")
    device = text_embeds.device
    if isinstance(image_embeds, (list, tuple)):
        N = torch.tensor([len(e) for e in image_embeds], dtype=torch.long, device=device)
        image_embeds = nn.utils.rnn.pad_sequence(list(image_embeds), batch_first=True) if B else None
    else:
        N = image_embeds.shape[1] if image_embeds is not None else 1
    new_pos = _expanded_positions(is_img, N)
    new_len = L + counts * (N - 1)
    L_new = int(new_len.max()) if B else L
    if padding_side == "left":
        new_pos = new_pos + (L_new - new_len).unsqueeze(1)

    embeds = text_embeds.new_zeros(B, L_new, D)
    mask = attention_mask.new_zeros(B, L_new)
    rows = torch.arange(B, device=device).unsqueeze(1).expand(B, L)
    text = ~is_img
    embeds[rows[text], new_pos[text]] = text_embeds[text]
    mask[rows[text], new_pos[text]] = attention_mask[text]
    new_labels = None
    if labels is not None:
        new_labels = labels.new_full((B, L_new), IGNORE_INDEX)
        new_labels[rows[text], new_pos[text]] = labels[text]

    if image_embeds is not None:
        b_idx, j_idx = is_img.nonzero(as_tuple=True)  # one row per placeholder
        if b_idx.numel():
            offsets = torch.arange(image_embeds.shape[1], device=device)
            pos = new_pos[b_idx, j_idx].unsqueeze(1) + offsets  # [P, N_max]
            b_rows = b_idx.unsqueeze(1).expand_as(pos)
            values = image_embeds[b_idx].to(embeds.dtype)
            fill = attention_mask[b_idx, j_idx].unsqueeze(1).expand_as(pos)
            if isinstance(N, torch.Tensor):  # variable lengths: the first N_b positions are image tokens
                valid = offsets < N[b_idx].unsqueeze(1)
                b_rows, pos, values, fill = b_rows[valid], pos[valid], values[valid], fill[valid]
            embeds[b_rows, pos] = values
            mask[b_rows, pos] = fill
        else:
            # No placeholder used: keep the vision graph connected (DDP unused-parameter checks)
            # with an exact zero, as LLaVA does with image_features[0:0].
            embeds = embeds + image_embeds[:0].sum().to(embeds.dtype)

    position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return embeds, mask, position_ids, new_labels


def expand_segment_ids(segment_ids: torch.Tensor, input_ids: torch.Tensor, num_image_tokens: int | torch.Tensor,
                       new_length: int, *, image_token_index: int = IMAGE_TOKEN_INDEX,
                       padding_side: str = "right") -> torch.Tensor:
    """``segment_ids`` ``[B, L]`` of the text sequence → ``[B, L']`` of the merged one (same layout as
    :func:`merge_image_tokens`: each placeholder becomes ``num_image_tokens`` positions of its segment,
    an int or ``[B]`` per row (AnyRes: each image its own count); new padding is -1)."""
    if padding_side != "right":
        raise ValueError("segment_ids (shared-prefix training) need right padding")
    is_img = input_ids == image_token_index
    new_pos = _expanded_positions(is_img, num_image_tokens)
    out = segment_ids.new_full((segment_ids.shape[0], new_length), -1)
    rows = torch.arange(segment_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(input_ids)
    out[rows, new_pos] = segment_ids
    b_idx, j_idx = is_img.nonzero(as_tuple=True)
    if b_idx.numel():
        per_row = isinstance(num_image_tokens, torch.Tensor)
        longest = int(num_image_tokens.max()) if per_row else num_image_tokens
        offsets = torch.arange(longest, device=input_ids.device)
        pos = new_pos[b_idx, j_idx].unsqueeze(1) + offsets
        rows, values = b_idx.unsqueeze(1).expand_as(pos), segment_ids[b_idx, j_idx].unsqueeze(1).expand_as(pos)
        if per_row:  # a row's image fills only its own first N_b positions
            valid = offsets < num_image_tokens.to(input_ids.device)[b_idx].unsqueeze(1)
            rows, pos, values = rows[valid], pos[valid], values[valid]
        out[rows, pos] = values
    return out


def segment_attention(segment_ids: torch.Tensor, *, additive_dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and a 4-D attention mask for shared-prefix sequences (``movekd.data.shared_prefix``).

    ``segment_ids`` ``[B, L]``: 0 = shared prefix, i >= 1 = question i, -1 = padding. Query ``q`` may
    attend key ``k <= q`` if ``k`` is in the prefix or in ``q``'s own segment, so question i sees
    exactly ``prefix + suffix_i``, and its positions continue from the end of the prefix as if it
    were alone. Padding rows attend to themselves (a finite softmax, no NaN in the backward).

    Returns ``(position_ids [B, L], mask [B, 1, L, L])``: a boolean mask (True = attend, for SDPA) or,
    with ``additive_dtype``, 0 / the dtype's minimum (for eager attention, which adds the mask).
    """
    B, L = segment_ids.shape
    device = segment_ids.device
    prefix = segment_ids == 0
    prefix_len = prefix.long().sum(1, keepdim=True)
    # Position inside the own segment: the running count of earlier tokens of the same segment.
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)  # [B, Lq, Lk]
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    rank = (same & causal).long().sum(2) - 1  # [B, L]
    position_ids = torch.where(prefix, rank, prefix_len + rank).clamp_min(0)
    valid = segment_ids >= 0
    allowed = causal & (same | prefix.unsqueeze(1)) & valid.unsqueeze(1) & valid.unsqueeze(2)
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=device)  # padding rows: themselves
    mask = allowed.unsqueeze(1)
    if additive_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=additive_dtype, device=device).masked_fill_(
            ~mask, torch.finfo(additive_dtype).min)
    return position_ids, mask


class MoveKDVLM(nn.Module):
    """LLaVA-style VLM: ``vision`` (student encoder) → ``projector`` → ``llm``.

    Args:
        vision: module with ``forward(images uint8 [B,3,H,W])`` returning an object with ``.tokens`` [B,N,D_v].
        projector: ``[.., D_v] → [.., D_llm]`` (see :func:`movekd.vlm.projector.build_projector`).
        llm: a Hugging Face causal LM (``AutoModelForCausalLM``).
        vision_config: dict from which the caller's factory rebuilds ``vision`` (saved by :mod:`movekd.vlm.io`).
        image_token_index: the placeholder id in ``input_ids``.
        config: the bundle's :class:`movekd.vlm.config.VLMConfig` (prompt format, image decoding,
            precision), set by :meth:`from_pretrained` and written by :meth:`save_pretrained`.
        anyres: a :class:`movekd.vlm.anyres.AnyResPacker` (LLaVA-NeXT tiling: ``image_newline`` and the
            grid); needed to run :class:`movekd.data.anyres.AnyResImages`, which may then be passed
            wherever ``images`` is.
    """

    def __init__(self, vision: nn.Module, projector: nn.Module, llm: nn.Module, *,
                 vision_config: dict | None = None, image_token_index: int = IMAGE_TOKEN_INDEX, config=None,
                 anyres: nn.Module | None = None):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.anyres = anyres
        if vision_config is None:  # a plain-dict ``vision.config`` is taken as the rebuild recipe
            vision_config = getattr(vision, "config", None)
            vision_config = vision_config if isinstance(vision_config, dict) else {}
        self.vision_config = dict(vision_config)
        self.image_token_index = image_token_index
        self.config = config

    def save_pretrained(self, path, *, tokenizer=None, config=None, extra: dict | None = None,
                        overwrite: bool = False):
        """Write the bundle (``movekd_config.json`` + safetensors + ``llm/``); see :func:`movekd.vlm.io.save_vlm`."""
        from movekd.vlm.io import save_vlm

        return save_vlm(self, path, tokenizer=tokenizer, config=config, extra=extra, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, path, *, build_vision=None, dtype=None, device=None, **llm_kwargs) -> "MoveKDVLM":
        """Rebuild from a bundle written by :meth:`save_pretrained`; see :func:`movekd.vlm.io.load_vlm`."""
        from movekd.vlm.io import load_vlm

        return load_vlm(path, build_vision, dtype=dtype, device=device, **llm_kwargs)

    def encode_images(self, images):
        """Run the vision module and the projector: ``(vision_output, image_embeds [B,N,D_llm])``.

        AnyRes images (:class:`movekd.data.anyres.AnyResImages`): every crop is a batch item of the
        vision module (``vision_output.tokens`` is ``[C, N, D_v]``), and ``image_embeds`` is a list of
        one packed ``[N_b, D_llm]`` sequence per image (:meth:`movekd.vlm.anyres.AnyResPacker.pack`)."""
        from movekd.data.anyres import AnyResImages

        anyres = isinstance(images, AnyResImages)
        if anyres and self.anyres is None:
            raise ValueError("AnyRes images given to a VLM built without anyres (image_grid_pinpoints / image_newline)")
        vision_out = self.vision(images.crops if anyres else images)
        tokens = vision_out.tokens
        proj_dtype = next((p.dtype for p in self.projector.parameters()), tokens.dtype)
        embeds = self.projector(tokens.to(proj_dtype))
        return vision_out, (self.anyres.pack(embeds, images) if anyres else embeds)

    def prepare_inputs(self, images, input_ids, attention_mask=None, labels=None, *, padding_side=None,
                       segment_ids=None):
        """Vision pass + placeholder expansion: ``(vision_output, embeds, mask, position_ids, labels)``.

        With ``segment_ids`` (shared-prefix groups) ``mask`` is the 4-D segment mask and
        ``position_ids`` restart after the prefix for every question (:func:`segment_attention`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vision_out, image_embeds = (None, None) if images is None else self.encode_images(images)
        embed = self.llm.get_input_embeddings()
        text_embeds = embed(input_ids.masked_fill(input_ids == self.image_token_index, 0))
        merged = merge_image_tokens(text_embeds, input_ids, attention_mask, labels, image_embeds,
                                    image_token_index=self.image_token_index, padding_side=padding_side)
        if segment_ids is not None:
            embeds, mask, _, new_labels = merged
            if isinstance(image_embeds, list):  # AnyRes: each image its own length
                num_image_tokens = torch.tensor([len(e) for e in image_embeds], device=input_ids.device)
            else:
                num_image_tokens = image_embeds.shape[1] if image_embeds is not None else 1
            segments = expand_segment_ids(segment_ids.masked_fill(attention_mask == 0, -1), input_ids,
                                          num_image_tokens, embeds.shape[1],
                                          image_token_index=self.image_token_index,
                                          padding_side=padding_side or infer_padding_side(attention_mask))
            position_ids, mask4d = segment_attention(segments, additive_dtype=self._additive_mask_dtype(embeds))
            return vision_out, embeds, mask4d, position_ids, new_labels
        return (vision_out, *merged)

    def _additive_mask_dtype(self, embeds: torch.Tensor) -> torch.dtype | None:
        """Eager attention adds the mask to its scores (float mask); SDPA takes a boolean one."""
        impl = getattr(self.llm.config, "_attn_implementation", None) or "eager"
        if impl == "eager":
            return torch.float32  # added to bf16/fp32 scores, softmax runs in float32 anyway
        if impl == "sdpa":
            return None
        raise ValueError(f"shared-prefix training (group_by_image) needs eager or sdpa attention, not {impl!r}")

    def forward(self, images: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                padding_side: str | None = None, supervised_logits_only: bool = False,
                segment_ids: torch.Tensor | None = None, **llm_kwargs) -> VLMOutput:
        """LM loss (if ``labels``) and logits on the merged sequence, plus the vision output for KD.

        ``supervised_logits_only`` (training): apply the LM head only at the positions that predict a
        supervised token. The loss is the same (mean cross-entropy over supervised tokens, as HF
        computes it), but the ``[B, L, vocab]`` logits are never built: with a 49k vocabulary and
        answers of a few tokens that is about a fifth of a small LLM's training FLOPs. ``logits`` is
        then None. ``segment_ids`` ``[B, L]``: shared-prefix groups (``movekd.data.shared_prefix``);
        the returned ``attention_mask`` is then the 4-D segment mask. ``llm_kwargs`` go to the LLM's
        forward (e.g. ``logits_to_keep``).
        """
        vision_out, embeds, mask, position_ids, new_labels = self.prepare_inputs(
            images, input_ids, attention_mask, labels, padding_side=padding_side, segment_ids=segment_ids)
        if supervised_logits_only and new_labels is not None:
            loss = self._supervised_loss(embeds, mask, position_ids, new_labels, **llm_kwargs)
            return VLMOutput(loss=loss, logits=None, vision=vision_out, attention_mask=mask, labels=new_labels)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                       labels=new_labels, **llm_kwargs)
        return VLMOutput(loss=out.loss, logits=out.logits, vision=vision_out, attention_mask=mask, labels=new_labels)

    def _supervised_loss(self, embeds, mask, position_ids, labels, **llm_kwargs) -> torch.Tensor:
        base = getattr(self.llm, self.llm.base_model_prefix)
        hidden = base(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                      **llm_kwargs).last_hidden_state
        # Position t predicts token t+1 (the shift of HF's causal-LM loss).
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])
        return nn.functional.cross_entropy(logits.float(), targets[keep])

    @torch.no_grad()
    def generate(self, images: torch.Tensor | None, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 32,
                 do_sample: bool = False, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, **generate_kwargs) -> torch.Tensor:
        """Batched generation (greedy by default) from left-padded prompts.

        Returns only the new tokens, ``[B, T]`` (``T <= max_new_tokens``); after a row's EOS the
        rest is ``pad_token_id``. Extra keyword arguments go to the LLM's ``generate``.
        """
        _, embeds, mask, _, _ = self.prepare_inputs(images, input_ids, attention_mask, padding_side="left")
        gen_cfg = self.llm.generation_config
        if eos_token_id is None:
            eos_token_id = gen_cfg.eos_token_id
        if pad_token_id is None:
            pad_token_id = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else eos_token_id
            if isinstance(pad_token_id, list):
                pad_token_id = pad_token_id[0]
        if not do_sample:
            # Greedy: neutralise sampling fields a model's generation_config may carry (SmolLM2: temperature).
            generate_kwargs.setdefault("temperature", None)
            generate_kwargs.setdefault("top_p", None)
            generate_kwargs.setdefault("top_k", None)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                 **generate_kwargs)
