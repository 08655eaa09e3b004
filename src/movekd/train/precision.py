"""Trainable parameters are updated in float32, whatever dtype the frozen parts are kept in.

AdamW applied to bfloat16 weights loses every update smaller than half a bf16 spacing: at lr 2e-5 a
weight of magnitude 0.03 (spacing 1.2e-4) never moves, nor does any RMSNorm gain. So at the start of
each stage the parameters that stage trains are cast to float32 (the "fp32 copy": compute still
runs in ``precision`` under autocast, as DeepSpeed's and FSDP's mixed precision do with their master
weights); frozen parts (teachers, the LLM in stage 1) stay in their loaded dtype to save memory.
With ``model.llm_lora`` the LLM's own weights never train (they may stay bf16): only its LoRA
adapters do, created in float32 (movekd.train.llm_lora). ``trainable_fp32: false`` keeps the loaded dtype; then a stage that would train half-precision
weights is an error naming the key that sets their dtype.
"""

from __future__ import annotations

import torch
from torch import nn

HALF = (torch.bfloat16, torch.float16)
# Which config key sets the dtype a group's parameters are loaded in.
DTYPE_KEYS = {"llm": "model.llm_dtype", "student": "model.student.spec.dtype",
              "mole": "model.student.spec.dtype"}


def check_trainable_dtypes(config) -> None:
    """Config-level check (no model needed): bf16/fp16 LLM weights trained without an fp32 copy."""
    # with model.llm_lora only the LoRA adapters of the LLM train, and they are always float32
    if config.trainable_fp32 or config.model.llm_dtype == "float32" or config.model.llm_lora is not None:
        return
    for index, stage in enumerate(config.stages):
        if "llm" in stage.train:
            raise ValueError(
                f"model.llm_dtype is {config.model.llm_dtype} and stages.{index}.train ('{stage.name}') trains "
                "the llm with trainable_fp32: false: AdamW would update half-precision weights and lose "
                "every small update. Set trainable_fp32: true (fp32 copy of trained weights) or "
                "model.llm_dtype: float32")


def upcast_trainable(groups: dict[str, list[nn.Parameter]], keep_dtype: bool = False) -> int:
    """Cast the half-precision parameters of ``groups`` to float32 in place (same Parameter
    objects, so tied weights stay tied); return how many were cast. ``keep_dtype``: raise instead."""
    cast = 0
    for group, params in groups.items():
        for p in params:
            if p.dtype not in HALF:
                continue
            if keep_dtype:
                raise ValueError(f"trainable_fp32 is false but group '{group}' has {p.dtype} parameters "
                                 f"(set by {DTYPE_KEYS.get(group, 'its model spec')}): their updates would be "
                                 "lost in half precision; set trainable_fp32: true")
            p.data = p.data.float()
            cast += 1
    return cast


def match_checkpoint_dtypes(model: nn.Module, weights_file) -> None:
    """Before resuming: parameters saved as float32 trained copies become float32 again, so loading
    does not round them back to the half precision they were first loaded in. Reads only the
    file's header."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as f:
        saved = set(f.keys())
        for name, p in model.named_parameters():
            if name in saved and p.dtype in HALF and f.get_slice(name).get_dtype() == "F32":
                p.data = p.data.float()
