"""Sharded training (FSDP2) through Accelerate: what the MoVE-KD model needs on top of the plugin.

The strategy comes from the Accelerate config the run is launched with (``accelerate launch
--config_file configs/accelerate/fsdp_1x8.yaml``: ``ACCELERATE_USE_FSDP`` and friends in the
environment). Plugin options (resharding, CPU offload, the mixed-precision compute dtype) are
honoured; the wrapping is ours:

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
- **fp32 trained weights**: FSDP2 needs one dtype for the parameters of a unit that take gradients
  and never re-shards a changed dtype, so every parameter that *some* stage trains is cast to float32
  before wrapping (compute follows the mixed-precision policy / autocast).
- **LoRA on the LLM** (``model.llm_lora``): the adapters of each decoder layer are a unit of their
  own (fp32 masters, all-gathered in the policy's ``param_dtype``), inside the layer's unit, which
  then holds only the frozen base weights (bf16 in the presets, never a gradient). In one unit with
  the base they broke the backward under bf16: FSDP2 fixes a unit's gradient dtype once, at the first
  forward, from the parameters that require a gradient *then*; in stage 1 the adapters do not, so
  the unit's floating dtypes were {bf16, fp32}, none was fixed, and stage 2's gradients were
  reduce-scattered in their compute dtype and assigned to the fp32 adapters unconverted ("attempting
  to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float"). A unit that still
  mixes dtypes (the root: the frozen bf16 embeddings and head of a LoRA LLM next to the fp32
  projector) is checked before wrapping: if a later stage trains one of its parameters, the first
  sharded stage must too (:func:`units_without_gradient_dtype`).
- **Mixed precision**: the policy's ``param_dtype`` (bf16 for ``mixed_precision: bf16``) is kept,
  but gradients are reduced in fp32 and outputs are not cast (:func:`mixed_precision_policy`).

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


def fsdp_units(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The FSDP units below the root, innermost first: per LLM decoder layer its LoRA adapters (if
    any), then every block. Names are the blocks' paths in ``model``."""
    from movekd.train.llm_lora import lora_adapter_modules

    names = {id(m): name for name, m in model.named_modules()}
    units = []
    for block in _blocks(model):
        adapters = lora_adapter_modules(block)
        if adapters:
            units.append((f"{names[id(block)]} (LoRA adapters)", adapters))
        units.append((names[id(block)], [block]))
    return units


def units_without_gradient_dtype(model: nn.Module, units: list[tuple[str, list[nn.Module]]],
                                 trained: list[nn.Parameter], trained_first: list[nn.Parameter]) -> list[str]:
    """Names of the units (``units`` innermost first, then the root: every other non-teacher
    parameter) whose backward FSDP2 would break: parameters of several dtypes, some trained by a
    stage (``trained``) but none by the first stage this process shards (``trained_first``). FSDP2
    takes a unit's gradient dtype from the parameters that require a gradient at the first forward,
    and from all of them when none do: with mixed dtypes it then fixes none, and a later stage's
    half-precision gradients reach its fp32 parameters unconverted."""
    owned: list[tuple[str, list[nn.Parameter]]] = []
    seen: set[int] = set()
    for name, modules in units:
        params = [p for m in modules for p in m.parameters() if id(p) not in seen]
        seen |= {id(p) for p in params}
        owned.append((name, params))
    owned.append(("root", [p for n, p in model.named_parameters()
                           if id(p) not in seen and not n.startswith(TEACHERS_PREFIX)]))
    ever, first = {id(p) for p in trained}, {id(p) for p in trained_first}
    bad = []
    for name, params in owned:
        ids = {id(p) for p in params}
        if len({p.dtype for p in params if p.is_floating_point()}) > 1 and ids & ever and not ids & first:
            bad.append(name)
    return bad


def mixed_precision_policy(plugin):
    """Accelerate's FSDP2 policy for ``mixed_precision: bf16`` reduce-scatters gradients in bf16 and
    casts every unit's output to bf16, the root's too: the loss terms left the model rounded to bf16
    and the loop's item-count rescaling (movekd.train.distributed) ran in bf16. Keep its compute
    dtype; reduce in fp32, as DDP all-reduces the fp32 gradients of the trained weights; cast no
    output (2 processes vs one with each policy: README, Multi-GPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = plugin.mixed_precision_policy
    if policy is None or policy.param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=torch.float32)


def shard_model(accelerator, model: nn.Module, trained: list[nn.Parameter],
                trained_first: list[nn.Parameter]) -> None:
    """Prepare ``model`` for Accelerate's FSDP2 ``prepare``: fp32 trained weights, one unit per block
    (and per decoder layer's LoRA adapters), teachers ignored (replicated), zeros reduce-scattered
    for unused experts. ``trained``: what some stage trains; ``trained_first``: what the stage about
    to run (the first forward) trains. Idempotent."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(f"fsdp_version {plugin.fsdp_version} in the Accelerate config: movekd shards with FSDP2 "
                         "(fsdp_version: 2, torch >= 2.6); use the shipped configs/accelerate/fsdp_*.yaml")
    if isinstance(model, FSDPModule):
        return
    for p in trained:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    units = fsdp_units(model)
    bad = units_without_gradient_dtype(model, units, trained, trained_first)
    if bad:
        from movekd.config.loader import ConfigError

        raise ConfigError(
            f"FSDP unit '{bad[0]}' holds parameters of several dtypes that a later stage trains but the first "
            "sharded stage does not: FSDP2 fixes a unit's gradient dtype at the first forward, from the "
            "parameters training then, so the later backward would fail. Let the first stage's 'train' hold "
            "one of them (e.g. the projector), or load the frozen ones in float32 (model.llm_dtype, "
            "model.student.spec.dtype)")
    plugin.mixed_precision_policy = mixed_precision_policy(plugin)  # Accelerate's root unit uses it too
    options = {"reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload,
               "mp_policy": plugin.mixed_precision_policy}
    for _, modules in units:
        fully_shard(modules if len(modules) > 1 else modules[0], **options)
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
