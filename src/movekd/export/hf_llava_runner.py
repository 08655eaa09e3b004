"""Run an exported HF LLaVA folder through movekd's own evaluation (``movekd eval EXPORT``).

:class:`HFLlavaGenerator` gives a ``LlavaForConditionalGeneration`` the ``generate`` of
:class:`movekd.vlm.MoveKDVLM`: uint8 images through the exported image processor, each image
placeholder (-200) of movekd's prompts expanded into the export's ``<image>`` tokens, greedy
generation by transformers. So the same data path and scoring compare a bundle and its export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from movekd.data.templates import IMAGE_TOKEN_INDEX


def is_hf_llava_export(path: str | Path) -> bool:
    from movekd.export.hf_llava import EXPORT_INFO

    return (Path(path) / EXPORT_INFO).is_file() and (Path(path) / "config.json").is_file()


class HFLlavaGenerator(nn.Module):
    def __init__(self, model: nn.Module, image_processor, image_token_id: int, num_image_tokens: int):
        super().__init__()
        self.model = model
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens

    def expand_placeholders(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int,
                            counts: list[int] | None = None):
        """Each -200 → ``num_image_tokens`` image tokens (or ``counts[row]``); rows re-padded on the left."""
        rows = []
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            kept = [t for t, m in zip(ids, mask) if m]
            n = self.num_image_tokens if counts is None else counts[row]
            out = []
            for t in kept:
                out.extend([self.image_token_id] * n if t == IMAGE_TOKEN_INDEX else [t])
            rows.append(out)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids, mask

    def _image_inputs(self, images, input_ids: torch.Tensor, device, dtype) -> tuple[list[int] | None, dict]:
        """Image-token count per row (None: ``num_image_tokens`` each) and the model's image kwargs."""
        pixel_values = self.image_processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
        return None, {"pixel_values": pixel_values.to(device, dtype)}

    @torch.no_grad()
    def generate(self, images, input_ids, attention_mask=None, *, max_new_tokens: int = 32, do_sample: bool = False,
                 eos_token_id=None, pad_token_id=None, **kwargs) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pad = pad_token_id if pad_token_id is not None else 0
        parameter = next(self.model.parameters())
        counts, image_kwargs = self._image_inputs(images, input_ids, parameter.device, parameter.dtype)
        ids, mask = self.expand_placeholders(input_ids.cpu(), attention_mask.cpu(), pad, counts)
        out = self.model.generate(input_ids=ids.to(parameter.device), attention_mask=mask.to(parameter.device),
                                  max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_token_id,
                                  pad_token_id=pad, temperature=None, top_p=None, top_k=None, **image_kwargs,
                                  **kwargs)
        return out[:, ids.shape[1]:]


class HFLlavaNextGenerator(HFLlavaGenerator):
    """The same for a LLaVA-NeXT export, fed movekd's AnyRes crops (:class:`movekd.data.anyres.AnyResImages`,
    tiled by movekd exactly as the processor tiles): normalised with the processor's settings, padded
    to ``[B, max_crops, 3, S, S]`` with ``image_sizes``; each placeholder becomes the processor's
    count of ``<image>`` tokens for that image size."""

    def __init__(self, model: nn.Module, processor, image_token_id: int):
        super().__init__(model, processor.image_processor, image_token_id, 0)
        self.processor = processor

    def _image_inputs(self, images, input_ids: torch.Tensor, device, dtype) -> tuple[list[int] | None, dict]:
        images = images.to("cpu")
        has_image = (input_ids == IMAGE_TOKEN_INDEX).any(1).cpu()
        crop = images.crops.shape[-1]
        counts = [self.processor._get_number_of_features(h, w, crop, crop) - 1 if used else 0
                  for (h, w), used in zip(images.image_sizes.tolist(), has_image.tolist())]
        proc = self.image_processor
        mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
        used = images.select(has_image)
        pixels = (used.crops.float() * proc.rescale_factor - mean) / std
        per_image = list(torch.split(pixels, used.crop_counts.tolist()))
        if not per_image:
            return counts, {}
        return counts, {"pixel_values": torch.nn.utils.rnn.pad_sequence(per_image, batch_first=True).to(device, dtype),
                        "image_sizes": used.image_sizes.to(device)}


def load_hf_llava_export(path: str | Path, device: str | torch.device = "cpu"):
    """``(HFLlavaGenerator, tokenizer, VLMConfig)`` of an export folder written by ``movekd export``."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    import movekd.export.hf_student  # noqa: F401  (registers movekd_student for exact exports)
    from movekd.export.hf_llava import EXPORT_INFO
    from movekd.vlm import VLMConfig

    path = Path(path)
    info = json.loads((path / EXPORT_INFO).read_text())
    config = VLMConfig.from_dict(info["vlm"])
    # The LLM's attention kernel as in the bundle (eager and SDPA round differently in bf16); the
    # vision tower keeps SDPA, as movekd's student runs it.
    attn = {"text_config": config.attn_implementation, "vision_config": "sdpa", "": "sdpa"}
    if info.get("format") == "movekd-hf-llava-next":
        from transformers import AutoProcessor, LlavaNextForConditionalGeneration

        model = LlavaNextForConditionalGeneration.from_pretrained(path, attn_implementation=attn).to(device).eval()
        processor = AutoProcessor.from_pretrained(path)
        return HFLlavaNextGenerator(model, processor, int(info["image_token_id"])), processor.tokenizer, config
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    generator = HFLlavaGenerator(model, image_processor, int(info["image_token_id"]),
                                 int(model.config.image_seq_length))
    return generator, tokenizer, config
