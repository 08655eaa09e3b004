"""Mixture-of-LoRA-Experts (MoLE) in the student's FFNs (paper Eq. 1).

``inject_mole(model)`` wraps every plain FFN of a ViT in place; ``collect_router_probs(model)`` returns
the router probabilities of the last forward autograd recorded, for ``movekd.functional.balance_loss``.
"""

from movekd.mole.inject import (
    MOLE_PARAM_KEYS,
    collect_router_probs,
    inject_mole,
    mole_layers,
    mole_parameters,
    record_router_probs,
    set_fold_inference,
    wrap_ffn,
)
from movekd.mole.layer import ROUTINGS, MoLEFFN
from movekd.mole.lora import LORA_INITS, LoRAExpert

__all__ = [
    "LORA_INITS",
    "MOLE_PARAM_KEYS",
    "ROUTINGS",
    "LoRAExpert",
    "MoLEFFN",
    "collect_router_probs",
    "inject_mole",
    "mole_layers",
    "mole_parameters",
    "record_router_probs",
    "set_fold_inference",
    "wrap_ffn",
]
