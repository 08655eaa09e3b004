"""Tiny offline building blocks for the data / VLM / eval tests: tokenizer, vision tower, LLM, images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are tiny.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = ("what is the shape color colour of a an in image yes no circle rectangle triangle red green blue "
         "gray teal black yellow brown there does contain picture photo caption shows describe you are tiny "
         "system user assistant USER ASSISTANT A chat between curious human and artificial intelligence "
         "gives helpful detailed polite answers to human's questions . ? , :")


def make_tokenizer(chat_template: str | None = CHATML, bos: bool = False):
    """A byte-level BPE tokenizer trained on a few words, with ChatML specials (like SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([WORDS] * 20, trainer)
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                 bos_token="<s>" if bos else None)
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def make_llm(vocab_size: int, hidden: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@dataclass
class VisionOut:
    tokens: torch.Tensor


class TinyVision(nn.Module):
    """Conv patchify: uint8 [B,3,H,W] → tokens [B,(H/p)(W/p),dim]."""

    def __init__(self, dim: int = 16, patch: int = 8):
        super().__init__()
        self.config = {"dim": dim, "patch": patch}
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, images):
        x = images.to(self.proj.weight.dtype) / 255.0
        return VisionOut(self.proj(x).flatten(2).transpose(1, 2))


def write_image(path: Path, color=(255, 0, 0), size: int = 16) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:] = color
    Image.fromarray(arr).save(path)


def write_json(path: Path, samples) -> Path:
    path.write_text(json.dumps(samples))
    return path


def batch_loss_and_grads(vlm, collate, dataset):
    """``(loss, {name: grad}, batch)`` of one training batch holding every item of ``dataset``
    (shared-prefix groups included): what the grouped-vs-separate equality tests compare."""
    batch = collate([dataset[i] for i in range(len(dataset))])
    vlm.zero_grad()
    out = vlm(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"],
              supervised_logits_only=True, segment_ids=batch.get("segment_ids"))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}, batch
