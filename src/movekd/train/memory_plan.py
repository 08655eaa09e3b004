"""Per-device memory of a training stage under DDP, FSDP or DeepSpeed ZeRO-2/3 (``--dry-run``).

Counted from the model built on the meta device (real parameter counts and dtypes), per device:

- ``parameters``: trained ones as float32 (``trainable_fp32``; the mixed-precision copy of DeepSpeed
  is bf16/fp16 and its fp32 copy is counted in ``master_weights``), frozen ones in their dtype.
  Sharded over the devices by FSDP and ZeRO-3, replicated by DDP and ZeRO-2.
- ``gradients``: one per trained parameter (fp32; DeepSpeed: compute dtype), sharded by FSDP, ZeRO-2/3.
- ``optimizer_states``: AdamW's two fp32 moments, sharded by FSDP and ZeRO.
- ``master_weights``: DeepSpeed's fp32 copy of trained weights (sharded); zero for DDP/FSDP, whose
  trained parameters are already fp32.
- ``teachers``: frozen, replicated under every strategy (movekd.train.sharding says why).
- ``activations``: what backward keeps, at the stage's per-device batch size and ``max_length``
  tokens (image tokens included): without checkpointing ~(10·h + 4·i) values per token and
  layer of the LLM (and the student's blocks when the student trains), the attention itself by a
  fused kernel (no L² scores); with checkpointing one h-wide input per layer plus one layer's full
  set during its recomputation. Supervised logits in fp32, all positions assumed supervised.
- ``model.llm_lora``: the LLM's own weights are frozen (counted in their dtype in ``parameters``,
  no gradients, Adam moments or master copies); its fp32 LoRA adapters count as trained. The
  activations are those of the full-weight run (backward still crosses every LLM layer; the
  adapters' rank-r intermediates are negligible).
- ``runtime``: a fixed 2 GB for the CUDA context, allocator fragmentation and communication buffers.

These are estimates for planning (±20%); they assume the longest sequence in every sample.
"""

from __future__ import annotations

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
GB = 1024**3
RUNTIME_GB = 2.0


def _geometry(module) -> tuple[int, int, int] | None:
    """(hidden, intermediate, layers) of a transformers model's config, if it has one."""
    config = getattr(module, "config", None)
    try:
        return int(config.hidden_size), int(config.intermediate_size), int(config.num_hidden_layers)
    except (AttributeError, TypeError):
        return None


def _activation_bytes(geometry, tokens: int, batch: int, value_bytes: int, checkpointing: bool,
                      layers: int | None = None) -> float:
    if geometry is None:
        return 0.0
    hidden, inter, all_layers = geometry
    layers = layers or all_layers
    full_layer = (10 * hidden + 4 * inter) * value_bytes * tokens * batch
    if checkpointing:
        return layers * hidden * value_bytes * tokens * batch + full_layer
    return layers * full_layer


def max_crops(anyres) -> int:
    """The most crops (overview + tiles) an image gets on ``anyres``'s grid."""
    return 1 + max((h // anyres.crop_size) * (w // anyres.crop_size) for h, w in anyres.pinpoints)


def stage_memory(system, stage, strategy: str, devices: int, checkpointing: bool | None = None) -> dict:
    """Per-device GB of one stage (see the module docstring); ``checkpointing`` None: the config's."""
    from movekd.train.groups import named_groups

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    config = system.config
    model = system.model
    compute_bytes = 4 if config.precision == "fp32" else 2
    deepspeed = strategy.startswith("zero")
    # FSDP casts whatever some stage trains to fp32 once, before wrapping (movekd.train.sharding)
    trained_later = {g for s in config.stages for g in s.train} if strategy == "fsdp" else set()
    trained = frozen_bytes = 0
    for group, params in named_groups(model).items():
        for name, p in params:
            if name in system.always_frozen:
                frozen_bytes += p.numel() * p.element_size()
            elif group in stage.train:
                trained += p.numel()
            else:
                frozen_bytes += p.numel() * (4 if group in trained_later else p.element_size())
    teachers = sum(p.numel() * p.element_size() for p in model.teachers.parameters())

    param_bytes = trained * (compute_bytes if deepspeed else 4) + frozen_bytes
    grad_bytes = trained * (compute_bytes if deepspeed else 4)
    optim_bytes = trained * 8
    master_bytes = trained * 4 if deepspeed and compute_bytes == 2 else 0
    shard_params = strategy in ("fsdp", "zero3")
    shard_grads = strategy != "ddp"
    parts = {
        "parameters": param_bytes / (devices if shard_params else 1),
        "gradients": grad_bytes / (devices if shard_grads else 1),
        "optimizer_states": optim_bytes / (devices if strategy != "ddp" else 1),
        "master_weights": master_bytes / devices,
        "teachers": teachers,
    }
    # activations: the LLM always backpropagates (to the projector at least); the student's blocks
    # only when some of their weights train
    tokens = stage.max_length
    student_trains = any(g in stage.train for g in ("student", "mole"))
    vision = model.vlm.vision
    student_layers = getattr(vision, "select_layer", None)
    student_tokens = getattr(vision, "num_tokens", 0) + 1
    llm_geometry = _geometry(model.vlm.llm)
    vocab = int(getattr(model.vlm.llm.config, "vocab_size", 0))
    # AnyRes: the student encodes every crop of an image (the most crops the grid allows)
    crops = max_crops(model.vlm.anyres) if stage.image_aspect_ratio == "anyres" else 1

    def activations(ckpt: bool) -> float:
        total = _activation_bytes(llm_geometry, tokens, stage.batch_size, compute_bytes, ckpt)
        if student_trains:
            total += _activation_bytes(_geometry(getattr(vision, "encoder", None)), student_tokens,
                                       stage.batch_size * crops, compute_bytes, ckpt, student_layers)
        return total + tokens * stage.batch_size * vocab * 4  # fp32 supervised logits

    with_ckpt, without = activations(True), activations(False)
    use_ckpt = config.gradient_checkpointing if checkpointing is None else checkpointing
    parts["activations"] = with_ckpt if use_ckpt else without
    out = {k: round(v / GB, 2) for k, v in parts.items()}
    out["runtime"] = RUNTIME_GB
    out["total"] = round(sum(out.values()), 2)
    out["activations_with_checkpointing"] = round(with_ckpt / GB, 2)
    out["activations_without_checkpointing"] = round(without / GB, 2)
    out["gradient_checkpointing"] = bool(use_ckpt)
    return out


def memory_plan(system, strategy: str, devices: int, device_memory_gb: float) -> dict:
    """Every stage's per-device estimate; ``per_device_gb`` is the most demanding stage's."""
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    stages = []
    for stage in system.config.stages:
        gb = stage_memory(system, stage, strategy, devices)
        stages.append({"name": stage.name, "batch_size": stage.batch_size, "max_length": stage.max_length,
                       "per_device_gb": gb, "fits": gb["total"] <= device_memory_gb})
    worst = max(stages, key=lambda s: s["per_device_gb"]["total"])
    return {"strategy": strategy, "devices": devices, "device_memory_gb": device_memory_gb,
            "per_device_gb": worst["per_device_gb"], "worst_stage": worst["name"],
            "fits": all(s["fits"] for s in stages), "stages": stages}


PART_ORDER = ("parameters", "gradients", "optimizer_states", "master_weights", "teachers", "activations", "runtime")


def format_memory_plan(plan: dict) -> str:
    lines = [f"memory per device: {plan['strategy']} on {plan['devices']} device(s) of "
             f"{plan['device_memory_gb']:g} GB (estimates, GB)"]
    header = f"  {'stage':<10}" + "".join(f"{p[:10]:>11}" for p in PART_ORDER) + f"{'total':>9}  fits"
    lines.append(header)
    for stage in plan["stages"]:
        gb = stage["per_device_gb"]
        lines.append(f"  {stage['name']:<10}" + "".join(f"{gb[p]:>11.2f}" for p in PART_ORDER)
                     + f"{gb['total']:>9.2f}  {'yes' if stage['fits'] else 'NO'}")
        lines.append(f"  {'':<10} activations {gb['activations_with_checkpointing']:.2f} with / "
                     f"{gb['activations_without_checkpointing']:.2f} without gradient checkpointing "
                     f"(batch {stage['batch_size']}, {stage['max_length']} tokens; checkpointing "
                     f"{'on' if gb['gradient_checkpointing'] else 'off'})")
    return "\n".join(lines)
