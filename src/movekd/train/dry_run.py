"""``movekd train CONFIG --dry-run``: the whole system on the meta device, without weights or data.

Reports, per stage, trainable and frozen parameters per group (the MoLE group is what MoLE adds to the
student), and the FLOPs of one training step (forward + backward of one sample) split into student,
teachers and the rest, counted with ``torch.utils.flop_counter`` on meta tensors (on real CPU tensors
the attention kernel is not counted).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from movekd.train.build import build_system
from movekd.train.config import TrainConfig
from movekd.train.groups import format_table

TEXT_TOKENS = 64  # text tokens per sample besides the image tokens (the step FLOPs assume this)


def _largest_anyres_image(anyres):
    """AnyRes crops (on meta) of an image that fills the largest grid exactly: the most tokens."""
    from movekd.data.anyres import AnyResImages

    height, width = max(anyres.pinpoints, key=lambda p: (p[0] // anyres.crop_size) * (p[1] // anyres.crop_size))
    crops = 1 + (height // anyres.crop_size) * (width // anyres.crop_size)
    side = anyres.crop_size
    return AnyResImages(torch.zeros(crops, 3, side, side, dtype=torch.uint8, device="meta"),
                        torch.tensor([[height, width]]), torch.tensor([crops]))


def _step_flops(system, text_tokens: int = TEXT_TOKENS) -> dict:
    """FLOPs of one training step for one sample: frozen teachers forward, the rest forward + backward.
    A last stage with ``image_aspect_ratio: anyres`` counts an image of the largest grid: the student
    on every crop, the teachers on every crop (``kd.anyres_distill: all_crops``) or the overview."""
    model = system.model
    size = system.image_size
    images = torch.zeros(1, 3, size, size, dtype=torch.uint8, device="meta")
    anyres = system.config.stages[-1].image_aspect_ratio == "anyres"
    student_images = teacher_images = images
    if anyres:
        tiled = _largest_anyres_image(model.vlm.anyres)
        student_images = tiled.crops
        teacher_images = tiled.crops if system.config.kd.anyres_distill == "all_crops" else tiled.crops[:1]
    model.train()
    with FlopCounterMode(display=False) as teacher_counter:
        teacher_outs = [t(teacher_images) for t in model.teachers]
    with FlopCounterMode(display=False) as counter:
        vision = model.vlm.vision(student_images)
        student_tokens = vision.tokens
        embeds = model.vlm.projector(student_tokens)
        if anyres:
            embeds = model.vlm.anyres.pack(embeds, tiled)[0][None]
        text = model.vlm.llm.get_input_embeddings()(torch.zeros(1, text_tokens, dtype=torch.long, device="meta"))
        seq = torch.cat([embeds, text], dim=1)
        out = model.vlm.llm(inputs_embeds=seq)  # no mask: all tokens attend causally (mask building calls .item())
        loss = out.logits.float().mean() + student_tokens.float().mean()
        for k, t in enumerate(teacher_outs):
            if k:
                adapted = model.adapters[k](t.tokens.to(student_tokens.dtype), t.grid, model.student_grid)
                loss = loss + adapted.float().mean()
        loss.backward()
    teachers = teacher_counter.get_total_flops()
    return {"total": teachers + counter.get_total_flops(), "teachers_forward": teachers,
            "image_tokens": int(embeds.shape[1]), "text_tokens": text_tokens,
            "crops": int(student_images.shape[0]) if anyres else 1}


def dry_run(config: TrainConfig, devices: int = 1, strategy: str | None = None,
            device_memory_gb: float = 80.0) -> dict:
    """``strategy`` None: the config's ``strategy``."""
    from movekd.train.memory_plan import memory_plan

    # FLOPs are counted without activation checkpointing (its recomputation needs real RNG states;
    # the memory plan below still reads the config's setting)
    system = build_system(dataclasses.replace(config, gradient_checkpointing=False), device="meta")
    system.config = config
    stages = []
    for stage in config.stages:
        rows = system.parameter_rows(stage.train)
        stages.append({"name": stage.name, "train": stage.train,
                       "groups": {g: {"trainable": on, "frozen": off} for g, on, off in rows}})
    groups = {g: on + off for g, on, off in system.parameter_rows([])}
    flops = None
    try:
        flops = _step_flops(system)
    except Exception as error:  # some kernels have no meta implementation: report instead of failing
        flops = {"error": f"{type(error).__name__}: {error}"}
    return {"name": config.name, "parameters": groups, "mole_added_parameters": groups["mole"],
            "stages": stages, "step_flops": flops,
            "teachers": [t.name for t in system.model.teachers], "student_grid": list(system.model.student_grid),
            "memory": memory_plan(system, strategy or config.strategy, devices, device_memory_gb)}


def format_dry_run(report: dict) -> str:
    lines = [f"dry run of '{report['name']}' on the meta device (no weights, no data)",
             f"teachers: {', '.join(report['teachers']) or 'none'}; student grid {report['student_grid']}",
             f"MoLE adds {report['mole_added_parameters']:,} parameters to the student", ""]
    for stage in report["stages"]:
        rows = [(g, v["trainable"], v["frozen"]) for g, v in stage["groups"].items()]
        lines.append(format_table(f"stage {stage['name']} (train: {', '.join(stage['train'])})", rows))
        lines.append("")
    flops = report["step_flops"]
    if "error" in flops:
        lines.append(f"step FLOPs: not counted ({flops['error']})")
    else:
        crops = f", {flops['crops']} AnyRes crops" if flops.get("crops", 1) > 1 else ""
        lines.append(f"one stage-2 training step (all but the teachers train), 1 sample ({flops['image_tokens']} image + "
                     f"{flops['text_tokens']} text tokens{crops}), forward + backward: {flops['total'] / 1e12:.2f} TFLOP "
                     f"(teachers' forward {flops['teachers_forward'] / 1e12:.2f} TFLOP)")
    from movekd.train.memory_plan import format_memory_plan

    lines += ["", format_memory_plan(report["memory"])]
    return "\n".join(lines)
