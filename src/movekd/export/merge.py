"""Fold the MoLE experts of a student into plain FFN weights (the lossy dense merge of the export).

A MoLE FFN (paper Eq. 1) adds to fc1 and fc2 the LoRA pair of the expert its router picks per token.
A stock ViT has one fc1/fc2 for every token, so the merge replaces the routed sum by its expectation
under weights ``w_e`` per layer:

    fc1' = fc1 + sum_e w_e * dW1_e,   fc2' = fc2 + sum_e w_e * dW2_e     (dW_e = scaling * B_e A_e, + bias)

- ``mean``: ``w_e = 1 / E``.
- ``usage``: ``w_e`` = the mean over calibration tokens of the gate that multiplies expert e in the
  layer's routing mode (``MoLEFFN.gates``: the routed fraction for ``sparse``, fraction x gate
  probability for ``gated``, the probability for ``dense``), measured on real images, so an expert
  the router rarely picks contributes little.

The result is exact when one expert takes every token (and ``w`` is its one-hot); otherwise the
cost is measured, never assumed (:func:`feature_distance`, or accuracy in ``movekd export``).
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
from torch import nn

from movekd.errors import UserError
from movekd.mole import MoLEFFN, mole_layers, record_router_probs

MERGES = ("mean", "usage")


class MergeError(UserError, ValueError):
    """A merge that cannot be done as asked (no experts, no calibration images, ...)."""


@torch.no_grad()
def expert_usage(student: nn.Module, image_batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per MoLE layer (qualified name), the mean gate of each expert over all tokens of ``image_batches``
    (uint8 ``[B, 3, H, W]`` batches as the student takes them). Returns ``{name: [E]}`` in float32."""
    names = {layer: name for name, layer in student.named_modules() if isinstance(layer, MoLEFFN)}
    if not names:
        raise MergeError("the student has no MoLE layers: nothing to merge")
    sums = {name: torch.zeros(layer.num_experts) for layer, name in names.items()}
    tokens = 0
    was_training = student.training
    student.eval()
    try:
        with record_router_probs(student):
            for images in image_batches:
                student(images)
                for layer, name in names.items():
                    probs = layer.router_probs
                    flat = probs.reshape(-1, probs.shape[-1]).float()
                    sums[name] += layer.gates(flat).sum(0).cpu()
                tokens += flat.shape[0]
    finally:
        student.train(was_training)
    if tokens == 0:
        raise MergeError("no calibration images: expert usage cannot be measured")
    return {name: total / tokens for name, total in sums.items()}


@torch.no_grad()
def merged_ffn_weights(layer: MoLEFFN, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}`` of ``layer`` with its experts folded in
    with ``weights`` ``[E]`` (in the base weights' dtype; computed in float32)."""
    out = {}
    for name, base, experts in (("fc1", layer.fc1, layer.moe_down), ("fc2", layer.fc2, layer.moe_up)):
        w = base.weight.float().clone()
        b = base.bias.float().clone() if base.bias is not None else torch.zeros(base.out_features)
        for weight, lora in zip(weights.tolist(), experts):
            dw, db = lora.delta_weight()
            w += weight * dw
            b += weight * db
        out[f"{name}.weight"] = w.to(base.weight.dtype)
        out[f"{name}.bias"] = b.to(base.weight.dtype)
    return out


def merge_weights(student: nn.Module, how: Literal["mean", "usage"],
                  usage: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The per-layer expert weights ``w`` of a merge: ``{layer name: [E]}``."""
    if how not in MERGES:
        raise MergeError(f"unknown merge {how!r}; expected one of {MERGES}")
    layers = {name: layer for name, layer in student.named_modules() if isinstance(layer, MoLEFFN)}
    if how == "mean":
        return {name: torch.full((layer.num_experts,), 1.0 / layer.num_experts) for name, layer in layers.items()}
    if usage is None:
        raise MergeError("merge 'usage' needs the measured expert usage (expert_usage on calibration images)")
    missing = sorted(set(layers) - set(usage))
    if missing:
        raise MergeError(f"expert usage is missing for MoLE layer {missing[0]}")
    return {name: usage[name].float() for name in layers}


@torch.no_grad()
def merged_student(student: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A plain student (``mole=False``, same architecture, select layer and preprocessing) whose
    FFNs hold the merged weights. ``student`` is a :class:`movekd.student.Student` with MoLE."""
    from movekd.student import build_student

    if not mole_layers(student):
        raise MergeError("the student has no MoLE layers: nothing to merge")
    config = {**student.config, "mole": False, "mole_options": {}}
    plain = build_student(config)
    state = {k: v for k, v in student.state_dict().items()
             if not any(f".{key}." in k for key in ("router", "moe_down", "moe_up"))}
    for name, layer in student.named_modules():
        if isinstance(layer, MoLEFFN):
            for key, value in merged_ffn_weights(layer, weights[name]).items():
                state[f"{name}.{key}"] = value
    plain.load_state_dict(state, strict=True)
    param = next(student.parameters())
    return plain.to(device=param.device, dtype=param.dtype).eval()


@torch.no_grad()
def feature_distance(reference: nn.Module, other: nn.Module, image_batches: Iterable[torch.Tensor]) -> dict:
    """How far ``other``'s tokens are from ``reference``'s on the same images: relative L2 error
    ``||a - b|| / ||a||`` per token and cosine similarity, averaged over tokens."""
    rel, cos, count = 0.0, 0.0, 0
    for images in image_batches:
        a = reference(images).tokens.float()
        b = other(images).tokens.float()
        rel += ((a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)).sum().item()
        cos += torch.nn.functional.cosine_similarity(a, b, dim=-1).sum().item()
        count += a.shape[0] * a.shape[1]
    if count == 0:
        raise MergeError("no images to measure the feature distance on")
    return {"relative_l2": rel / count, "cosine": cos / count, "tokens": count}
