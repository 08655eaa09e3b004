"""Sharded training (FSDP2) through Accelerate: what the MoVE-KD model needs on top of the plugin.

The strategy comes from the Accelerate config the run is launched with (``accelerate launch
--config_file configs/accelerate/fsdp_1x8.yaml``: ``ACCELERATE_USE_FSDP`` and friends in the
environment). Plugin options (resharding, CPU offload, mixed-precision policy) are honoured;
the wrapping is ours:

- **Blocks**: every LLM decoder layer and every student block is its own FSDP unit (all-gathered
  just before use, freed after), the rest (embeddings, projector, adapters, heads) is in the root unit.
- **Teachers are replicated, not sharded** (``ignored_params``): they are frozen, run under
  ``no_grad`` and hold no gradient or optimiser state, so sharding would save only their weights
  (1.44B bf16 parameters, 2.9 GB at paper scale) at the price of all-gathering them every step. They
  stay out of the optimiser and of the checkpoints exactly as under DDP.
- **MoLE top-1 routing** leaves experts that no token chose without gradient on some rank; FSDP2
  then reduce-scatters zeros for them (``set_reduce_scatter_unused_params``), so every rank joins
  the same collectives (DDP's ``find_unused_parameters`` plays that role under DDP); the loop
  then turns the zeros of experts no rank routed to back into ``None`` (see below).
- **fp32 trained weights**: FSDP2 needs one dtype per unit and never re-shards a changed dtype, so
  every parameter that *some* stage trains is cast to float32 before wrapping (compute follows the
  mixed-precision policy / autocast).

Checkpoints hold consolidated (full) weights and a consolidated optimiser state keyed by parameter
name, gathered on rank 0; the final bundle is written from the consolidated weights and loads in
one process unchanged. A resumed run loads them into the sharded parameters after ``prepare``.

Two things differ from DDP and are handled in the loop, so that N sharded processes train as one
process does (tests/test_train_ddp.py; figures in README, Multi-GPU and multi-node):

- the gradient norm (clipping) is taken over the optimiser's parameters *after* ``prepare``: the
  root ``fully_shard`` replaces the root unit's parameters (embeddings, lm_head, projector,
  adapters) with new sharded ones, and the pre-prepare objects never receive a gradient;
- MoLE experts that no token on any rank chose get no gradient (:func:`drop_unrouted_expert_grads`),
  not the zeros FSDP2 reduce-scatters for unused parameters.

On CPU (tests), Accelerate does not apply FSDP plugins; :func:`enable_cpu_fsdp` does it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

TEACHERS_PREFIX = "teachers."
LORA_ERROR = ("model.llm_lora under FSDP is not supported: on 2 CPU processes it trained like one process "
              "in fp32, but with precision bf16 the backward failed (a bf16 gradient assigned to an fp32 "
              "parameter), so it is refused rather than half-tested; train LoRA under DDP or DeepSpeed "
              "ZeRO-2 (with LoRA the LLM has no gradients or optimiser states, so DDP fits: see README, "
              "LoRA on the LLM)")


def strategy_name(accelerator) -> str:
    """``single``, ``ddp``, ``fsdp2``, ``deepspeed_zero{stage}`` (for logs and the run's launch.json)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed_zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def enable_cpu_fsdp(accelerator) -> None:
    """Accelerate ignores FSDP on CPU processes (gloo); apply the environment's FSDP plugin anyway."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
            or accelerator.distributed_type != DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def configure_deepspeed_stage(accelerator, stage_index: int, batch_size: int, grad_accum: int) -> None:
    """Before ``prepare`` under DeepSpeed: its config needs the micro-batch size, which Accelerate
    otherwise reads from a DataLoader passed to ``prepare`` (the loop builds its own, per stage; without
    this, ``prepare`` raises "requires you to pass at least one of training or evaluation dataloaders").
    Gradient accumulation is refused: DeepSpeed takes its accumulation boundary from Accelerate's
    ``accumulate()`` and divides the loss by its own step count, which the loop's normalisation over
    the step (movekd.train.distributed) does not go through; that combination was never run."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if grad_accum != 1:
        raise NotImplementedError(
            f"stages.{stage_index}.grad_accum is {grad_accum}: gradient accumulation under DeepSpeed is not "
            "supported by movekd yet; raise stages.N.batch_size or use more processes, or train under FSDP/DDP")
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = batch_size * accelerator.num_processes


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The LLM's decoder layers and the student's blocks (never a teacher's)."""
    from movekd.teachers._hf import block_list

    blocks = []
    llm_layers = getattr(getattr(model.vlm.llm, model.vlm.llm.base_model_prefix, None), "layers", None)
    if llm_layers is not None:
        blocks += list(llm_layers)
    encoder = getattr(model.vlm.vision, "encoder", None)
    if encoder is not None:
        blocks += list(block_list(encoder))
    return blocks


def shard_model(accelerator, model: nn.Module, trained: list[nn.Parameter]) -> None:
    """Prepare ``model`` for Accelerate's FSDP2 ``prepare``: fp32 trained weights, one unit per block,
    teachers ignored (replicated), zeros reduce-scattered for unused experts. Idempotent."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(f"fsdp_version {plugin.fsdp_version} in the Accelerate config: movekd shards with FSDP2 "
                         "(fsdp_version: 2, torch >= 2.6); use the shipped configs/accelerate/fsdp_*.yaml")
    if isinstance(model, FSDPModule):
        return
    for p in trained:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    options = {"reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload,
               "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    for block in _blocks(model):
        fully_shard(block, **options)
    plugin.ignored_modules = [model.teachers]
    plugin.auto_wrap_policy = None  # the blocks are wrapped above; Accelerate wraps the root
    plugin.cpu_ram_efficient_loading = False


def after_prepare(model: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_reduce_scatter_unused_params(True)


def drop_unrouted_expert_grads(model: nn.Module, ranks) -> int:
    """Give the MoLE experts that no token on any rank chose since the last step no gradient
    (``None``), as in one process and under DDP; return how many experts that was. Every rank must
    call (one all-reduce), at each optimiser step, after the last backward.

    FSDP2 reduce-scatters *zeros* for them (``set_reduce_scatter_unused_params``: every rank must
    join the same collectives), and AdamW treats a zero gradient as a real one: it advances the
    expert's step count and moves it along its old momentum, while a ``None`` gradient leaves the expert untouched."""
    from movekd.mole import mole_layers

    layers = mole_layers(model)
    if not layers:
        return 0
    routed = ranks.sum([float(flag) for layer in layers for flag in layer.experts_routed])
    dropped = 0
    for layer in layers:
        for e in range(layer.num_experts):
            if not routed.pop(0):
                for p in (*layer.moe_down[e].parameters(), *layer.moe_up[e].parameters()):
                    p.grad = None
                dropped += 1
        layer.experts_routed = [False] * layer.num_experts
    return dropped


def forget_routed_experts(model: nn.Module) -> None:
    """A skipped step: its forwards' routing must not count for the next step."""
    from movekd.mole import mole_layers

    for layer in mole_layers(model):
        layer.experts_routed = [False] * layer.num_experts


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Consolidated weights without the teachers, on rank 0 (empty elsewhere). Every rank must call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in state.items() if not k.startswith(TEACHERS_PREFIX)}


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """Consolidated optimiser state keyed by parameter name, on rank 0. Every rank must call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Load a state of :func:`full_optimizer_state` into the optimiser of the sharded ``model``:
    each rank keeps its shard of every moment tensor (same placement as the parameter)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    name_of = {id(p): name for name, p in model.named_parameters()}
    saved_state = state["state"]
    for group, saved_group in zip(optimizer.param_groups, state["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        for p in group["params"]:
            saved = saved_state.get(name_of[id(p)])
            if saved is None:
                continue

            def place(value, p=p):
                if not isinstance(value, torch.Tensor) or value.dim() == 0 or not isinstance(p, DTensor):
                    return value
                return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)

            optimizer.state[p] = {k: place(v) for k, v in saved.items()}


def consolidate(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put the consolidated ``weights`` back into ``model`` as plain tensors (rank 0, after training),
    so the inference bundle and ``checkpoint_weights`` see full weights. The model is not meant
    for further sharded training afterwards."""
    for name, value in weights.items():
        value = value.detach().clone()  # gathered tensors may be views of one flat buffer
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        elif attr in module._buffers:
            module._buffers[attr] = value
