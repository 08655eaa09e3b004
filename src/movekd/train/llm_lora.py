"""LoRA on the LLM (``model.llm_lora``): the memory-light alternative to training all its weights.

As LLaVA's ``scripts/v1_5/finetune_lora.sh`` (rank 128, alpha 256, every linear layer of the LLM but
the output head): low-rank adapters are injected into the LLM with ``peft`` when the system is built;
the LLM's own weights then never train (they stay in ``model.llm_dtype``, e.g. bf16), and a stage
whose ``train`` names ``llm`` trains only the adapters, which are held in float32 (so AdamW's small
updates are kept, as movekd.train.precision requires) and form the ``llm`` parameter group (its
``lrs.llm`` applies to them). Checkpoints hold the adapters, so a run resumes exactly. At the end
they are merged into the LLM's weights (W + B·A·alpha/rank) and removed, so the inference bundle is a
plain transformers LLM: ``movekd eval``/``chat``/``export`` load it without ``peft``.
"""

from __future__ import annotations

import torch
from torch import nn

# peft names every adapter parameter ``...lora_A.<adapter>.weight`` / ``lora_B`` (and lora_embedding_*)
LORA_MARK = "lora_"


def is_lora_parameter(name: str) -> bool:
    return LORA_MARK in name


def add_llm_lora(llm: nn.Module, lora) -> set[str]:
    """Inject ``lora`` (an ``LLMLoraConfig``) into ``llm`` in place; return the names (relative to
    ``llm``) of the LLM's own parameters, which stay frozen from now on."""
    from peft import LoraConfig, inject_adapter_in_model

    from movekd.config.loader import ConfigError

    peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, bias="none")
    try:
        inject_adapter_in_model(peft_config, llm)
    except ValueError as error:  # e.g. no module of the LLM matches target_modules
        raise ConfigError(f"'model.llm_lora.target_modules' ({lora.target_modules!r}): {error}") from error
    frozen = set()
    for name, p in llm.named_parameters():
        if is_lora_parameter(name):
            p.data = p.data.float()  # trained: fp32 whatever the LLM's dtype (precision.py)
        else:
            frozen.add(name)
            p.requires_grad_(False)
    return frozen


def lora_adapter_modules(module: nn.Module) -> list[nn.Module]:
    """The adapters inside ``module``: every ``lora_A``/``lora_B`` layer of its LoRA layers, which peft
    calls as modules in the forward (FSDP shards them as units of their own: movekd.train.sharding)."""
    from peft.tuners.lora import LoraLayer

    return [adapter for layer in module.modules() if isinstance(layer, LoraLayer)
            for adapters in (layer.lora_A, layer.lora_B) for adapter in adapters.values()]


def has_llm_lora(llm: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in llm.modules())


def set_llm_lora_active(llm: nn.Module, active: bool) -> int:
    """Switch every LoRA adapter of ``llm`` on or off; return how many layers were switched.

    Before any stage has trained them the adapters are exact no-ops (B = 0) that still cost two
    small matmuls forward and backward in every one of the LLM's linear layers: the loop switches
    them off until the first stage that trains ``llm`` (stage 1 of LLaVA, where the LLM is frozen).
    ``requires_grad`` is left to :func:`movekd.train.groups.set_trainable`, called afterwards."""
    from peft.tuners.lora import LoraLayer

    switched = 0
    for module in llm.modules():
        if isinstance(module, LoraLayer):
            grads = [p.requires_grad for p in module.parameters()]
            module.enable_adapters(active)
            for p, grad in zip(module.parameters(), grads):  # peft's toggle also sets requires_grad
                p.requires_grad_(grad)
            switched += 1
    return switched


@torch.no_grad()
def merge_llm_lora(llm: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer (in the base weight's dtype) and put the plain base
    layer back in its place; return how many layers were merged. The LLM is then peft-free."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(llm.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        setattr(parent, child, module.get_base_layer())
        merged += 1
    llm.__dict__.pop("peft_config", None)  # set by peft's injection on the instance, if at all
    return merged
