"""``movekd train CONFIG --dry-run``: the whole system on the meta device, without weights or data.

Reports, per stage, trainable and frozen parameters per group (the MoLE group is what MoLE adds to the
student), and the FLOPs of one training step (forward + backward of one sample) split into student,
teachers and the rest, counted with ``torch.utils.flop_counter`` on meta tensors (on real CPU tensors
the attention kernel is not counted).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from movekd.train.build import build_system
from movekd.train.config import TrainConfig
from movekd.train.groups import format_table

TEXT_TOKENS = 64  # text tokens per sample besides the image tokens (the step FLOPs assume this)


def _step_flops(system, text_tokens: int = TEXT_TOKENS) -> dict:
    model = system.model
    size = system.image_size
    images = torch.zeros(1, 3, size, size, dtype=torch.uint8, device="meta")
    ids = torch.zeros(1, text_tokens + 1, dtype=torch.long, device="meta")
    ids[:, 1] = -200  # the image placeholder (meta tensors ignore values; shapes are what count)
    mask = torch.ones_like(ids)
    counter = FlopCounterMode(display=False, depth=3)
    model.train()
    with counter:
        vision = model.vlm.vision(images)
        student_tokens = vision.tokens
        teacher_outs = [t(images) for t in model.teachers]
        embeds = model.vlm.projector(student_tokens)
        text = model.vlm.llm.get_input_embeddings()(torch.zeros(1, text_tokens, dtype=torch.long, device="meta"))
        seq = torch.cat([embeds, text], dim=1)
        out = model.vlm.llm(inputs_embeds=seq, attention_mask=torch.ones(seq.shape[:2], device="meta"))
        loss = out.logits.float().mean() + student_tokens.float().mean()
        for k, t in enumerate(teacher_outs):
            if k:
                loss = loss + model.adapters[k](t.tokens.to(student_tokens.dtype), t.grid, model.student_grid).float().mean()
        loss.backward()
    del mask
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()

    def module_flops(prefix: str) -> int:
        return sum(sum(v.values()) for k, v in counts.items() if k == prefix)

    teacher_flops = sum(module_flops(f"MoveKDModel.teachers.{k}") or module_flops(f"teachers.{k}")
                        for k in range(len(model.teachers)))
    return {"total": total, "teachers_forward": teacher_flops, "image_tokens": int(student_tokens.shape[1]),
            "text_tokens": text_tokens}


def dry_run(config: TrainConfig) -> dict:
    system = build_system(config, device="meta")
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
            "teachers": [t.name for t in system.model.teachers], "student_grid": list(system.model.student_grid)}


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
        lines.append(f"one training step, 1 sample ({flops['image_tokens']} image + {flops['text_tokens']} text "
                     f"tokens), forward + backward: {flops['total'] / 1e12:.2f} TFLOP "
                     f"(teachers' forward {flops['teachers_forward'] / 1e12:.2f} TFLOP)")
    return "\n".join(lines)
