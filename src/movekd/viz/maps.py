"""Per-image and per-dataset quantities behind the pictures (pure computation, no plotting).

- token weight (Eq. 3) of the CLIP-role teacher, as the run computes it (``kd.token_weight_mode``)
  and as the renormalised [CLS] attention row (the map's shape; the official double softmax is
  near uniform, so both are shown);
- the student's routed expert per patch token per MoLE layer (argmax of the router probabilities);
- PCA maps: each encoder's tokens of one image projected on their first 3 principal components,
  each component min-max scaled to 0..1 over the image (RADIO's feature pictures);
- over a dataset: per-sample teacher weights (Eq. 4, with the run's settings, needs the trained
  adapters) and the fraction of patch tokens routed to each expert per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from movekd.functional import teacher_weight, token_weight


def student_forward(student, images: Tensor):
    """Student output and router probabilities (``[L, B, N, E]`` patch tokens; None without MoLE)."""
    from movekd.mole import collect_router_probs, record_router_probs

    with torch.no_grad(), record_router_probs(student.encoder):
        out = student(images)
        probs = collect_router_probs(student.encoder, clear=True) if student.mole else []
    return out, (torch.stack([p[:, 1:].float() for p in probs]) if probs else None)


def pca_rgb(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[N, C]`` tokens of one image -> ``[h, w, 3]`` in 0..1 (first 3 principal components)."""
    x = tokens.float() - tokens.float().mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    comps = x @ v[:3].T
    if comps.shape[1] < 3:
        comps = torch.cat([comps, comps.new_zeros(comps.shape[0], 3 - comps.shape[1])], 1)
    lo, hi = comps.min(0).values, comps.max(0).values
    return ((comps - lo) / (hi - lo).clamp_min(1e-8)).reshape(*grid, 3)


def image_maps(run, images: Tensor) -> list[dict]:
    """One dict per image: ``token_weight`` / ``cls_attention`` ``[h, w]`` (None without a CLIP-role
    teacher giving attention), ``experts`` ``[L, h, w]`` (None without MoLE), ``pca``
    ``{name: [h, w, 3]}`` (student first)."""
    out, probs = student_forward(run.student, images)
    grid = run.student_grid
    teacher_outs = [t(images) for t in run.teachers]
    results = []
    for b in range(images.shape[0]):
        item = {"token_weight": None, "cls_attention": None, "experts": None,
                "pca": {"student": pca_rgb(out.tokens[b], grid)}}
        if teacher_outs and teacher_outs[0].attn is not None:
            t0 = teacher_outs[0]
            attn = t0.attn[b:b + 1]
            item["token_weight"] = token_weight(attn, mode=run.config.kd.token_weight_mode)[0].reshape(t0.grid)
            item["cls_attention"] = token_weight(attn, mode="renorm")[0].reshape(t0.grid)
        if probs is not None:
            item["experts"] = probs[:, b].argmax(-1).reshape(probs.shape[0], *grid)
        for teacher, t_out in zip(run.teachers, teacher_outs):
            item["pca"][teacher.name] = pca_rgb(t_out.tokens[b], t_out.grid)
        results.append(item)
    return results


def dataset_stats(run, batches) -> dict:
    """``teacher_weights`` ``[S, K]`` (None without adapters or a CLS-giving teacher 0) and
    ``expert_usage`` ``[L, E]`` (fractions of patch tokens; None without MoLE) over image batches."""
    kd = run.config.kd
    weights, usage = [], None
    for images in batches:
        out, probs = student_forward(run.student, images)
        if probs is not None:
            counts = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).sum((1, 2)).double()
            usage = counts if usage is None else usage + counts
        if run.adapters is None or not run.teachers:
            continue
        with torch.no_grad():
            t0 = run.teachers[0](images)
            if t0.cls is None:
                continue
            adapted = [t0.tokens.float()]
            for teacher, adapter in zip(run.teachers[1:], run.adapters[1:]):
                t_out = teacher(images)
                adapted.append(adapter(t_out.tokens.float(), t_out.grid, run.student_grid))
            scale = t0.cls.shape[-1] ** -0.5 if kd.teacher_weight_scale == "sqrt_d" else None
            weights.append(teacher_weight(t0.cls.float(), adapted, alpha=kd.alpha, adaptive=kd.teacher_weight,
                                          flatten_threshold=kd.teacher_weight_flatten_threshold, scale=scale))
    return {"teacher_weights": torch.cat(weights) if weights else None,
            "expert_usage": (usage / usage.sum(-1, keepdim=True)) if usage is not None else None}
