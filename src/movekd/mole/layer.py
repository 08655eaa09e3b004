"""The MoLE FFN: a ViT block's FFN plus per-token routed LoRA experts (paper Eq. 1).

Eq. 1:  F*(x) = F(x) + E_i(x),  i = argmax Softmax(f(x)),  f = Linear(d, E), per token.

An expert is a *pair* of LoRAs, one added to fc1 and one to fc2, picked by the same routing decision
(official-movekd.md §4):  h = fc1(x) + down_i(x);  a = act(h);  y = fc2(a) + up_i(a).
Routing modes (``routing=``):

- ``"sparse"`` (official / paper): top-1, expert output *not* scaled by its gate. The task and KD
  losses give the router no gradient; only the balance loss trains it.
- ``"gated"``: top-1, expert output scaled by its gate probability (router learns from the task).
- ``"dense"``: gate-weighted sum of all experts (the official unused ``dense`` flag).
- ``"topk"``: the ``top_k`` most probable experts, gates renormalised over them.

Four execution paths give the same numbers (tested against a plain per-expert reference):

- *grouped* (default for sparse/gated, training and inference): tokens are sorted by expert once
  (one d-wide row gather), and each of fc1 / fc2 with its experts is one fused autograd kernel
  (``movekd.mole.kernels.mole_linear``): each expert's LoRA runs on its contiguous segment only (LoRA
  costs one expert's FLOPs), the wide LoRA output (with the base bias folded in) is written first and
  the big GEMM accumulates onto it in place over *all* tokens; the backward likewise accumulates the
  big input-gradient GEMM onto the LoRA's. One d-wide gather restores the token order. Nothing H-wide
  is gathered, scattered or concatenated. On CPU in bf16 / fp16 the small GEMMs run on row windows of
  bucketed sizes, so changing segment lengths do not make oneDNN build new GEMM kernels every batch
  (``movekd.mole.kernels.bucket_rows``).
- *dense-masked* (``grouped_kernel="dense_masked"``, sparse/gated, opt-in): no sorting; per linear one
  fused kernel (``movekd.mole.kernels.mole_linear_masked``) runs every routed expert's LoRA on every
  token as one GEMM per side and zeroes the others with the gate matrix: 3 GEMMs forward and at most 6
  backward whatever E, against 2 + 2E and 2 + 4E plus 4 row gathers for *grouped*, but E times the
  LoRA FLOPs (CLIP-L, E=3, r=32: +11.7 % of the FFN against +3.9 %). ``movekd bench mole`` measured
  it no faster than *grouped* at CLIP-L shapes on CPU (README, Performance), hence not the default; it
  suits many experts with few tokens each, or devices where a GEMM call costs more than its FLOPs.
- *folded* (``fold_inference=True``, or ``"auto"``: where weights can be pre-packed, i.e. CPU with
  oneDNN; sparse, eval, no autograd): each expert folded into its own cached copy of fc1/fc2 (in the
  compute dtype), so no LoRA FLOPs, and on CPU pre-packed once into oneDNN's blocked layout, so the E
  segment GEMMs re-pack nothing. It stores E extra copies of fc1+fc2 per layer (CLIP-L, E=3: 25M
  values per layer, 604M over 24 layers; 96 MiB fp32 / 48 MiB bf16 per layer), hence off by default in the layer; ``load_trained``
  uses ``"auto"``. Measured ratios are in the README (Performance, ``movekd bench mole``). The cache is
  rebuilt when a weight, its storage or the compute dtype changes, and dropped on ``train()``.
- *stacked* (dense, topk, and every mode under ``torch.compile`` or on the meta device): all experts
  in one GEMM pair with a per-token gate matrix; static shapes, no host sync, E times the LoRA FLOPs.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from movekd.mole.kernels import (
    mole_linear,
    mole_linear_masked,
    pack_linear_weight,
    packed_linear,
    packed_linear_supported,
    permute_rows,
    segmented_linear,
)
from movekd.mole.lora import LoRAExpert

ROUTINGS = ("sparse", "gated", "dense", "topk")
FOLD_CHOICES = (False, True, "auto")
GROUPED_KERNELS = ("segments", "dense_masked")
_TICKS = itertools.count()  # global order of router-probability records


def _recomputing() -> bool:
    """True inside a backward pass: activation checkpointing re-runs this forward there. The balance
    loss already holds the first forward's probabilities, so the recomputation must not record again
    (a second record would be a stale, graph-detached copy kept alive until the next forward)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class MoLEFFN(nn.Module):
    """Mixture-of-LoRA-Experts FFN wrapping an existing ``fc1 -> act [-> ...] -> fc2 [-> ...]`` MLP.

    The original sub-modules stay registered under their original names (``fc1``, ``fc2``,
    ``activation_fn`` / ``act``, timm's ``drop1``, ``norm``, ``drop2``), so the base weights keep their
    state-dict keys (``...mlp.fc1.weight``). New parameters: ``router.{weight,bias}``,
    ``moe_down.{e}.lora_{A,B}.{weight,bias}`` (on fc1) and ``moe_up.{e}.lora_{A,B}.{weight,bias}`` (on
    fc2); the official checkpoints use the same names except that their base weights sit under
    ``original_module.``.

    Router probabilities of the last forward are kept (``router_probs``) when autograd records the
    forward (any mode), in training mode with autograd on, or when ``record_probs`` is True; see
    ``movekd.mole.collect_router_probs``.
    """

    def __init__(
        self,
        fc1: nn.Linear,
        fc2: nn.Linear,
        mid: Sequence[tuple[str, nn.Module]],
        post: Sequence[tuple[str, nn.Module]] = (),
        *,
        num_experts: int = 3,
        rank: int = 32,
        alpha: float = 1.0,
        dropout: float = 0.05,
        routing: str = "sparse",
        top_k: int = 2,
        init: str = "paper",
        fold_inference: bool | str = False,
        grouped_kernel: str = "segments",
    ) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")
        if num_experts < 1 or rank < 1:
            raise ValueError(f"num_experts and rank must be >= 1, got {num_experts} and {rank}")
        if routing == "topk" and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if fold_inference not in FOLD_CHOICES:
            raise ValueError(f"fold_inference must be one of {FOLD_CHOICES}, got {fold_inference!r}")
        if grouped_kernel not in GROUPED_KERNELS:
            raise ValueError(f"grouped_kernel must be one of {GROUPED_KERNELS}, got {grouped_kernel!r}")
        self.fc1 = fc1
        self.fc2 = fc2
        # Everything between fc1 and fc2 (activation, timm's drop1/norm) and after fc2 (timm's drop2),
        # registered under the original names so the base state-dict keys do not move.
        self._mid_names = tuple(name for name, _ in mid)
        self._post_names = tuple(name for name, _ in post)
        for name, module in (*mid, *post):
            self.add_module(name, module)

        factory = {"device": fc1.weight.device, "dtype": fc1.weight.dtype}
        d_in, hidden, d_out = fc1.in_features, fc1.out_features, fc2.out_features
        self.router = nn.Linear(d_in, num_experts, bias=True, **factory)
        experts = range(num_experts)
        self.moe_down = nn.ModuleList(LoRAExpert(d_in, hidden, rank, alpha, init, **factory) for _ in experts)
        self.moe_up = nn.ModuleList(LoRAExpert(hidden, d_out, rank, alpha, init, **factory) for _ in experts)
        self.num_experts = num_experts
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_dropout = dropout
        self.routing = routing
        self.top_k = top_k
        self.fold_inference = fold_inference
        self.record_probs: bool = False
        self.router_probs: Tensor | None = None
        self.router_tick: int | None = None
        # Which experts some token was routed to since the last optimiser step (forwards under
        # autograd only): an expert no token chose gets no gradient (None), and a sharded run must
        # keep it that way (movekd.train.sharding.drop_unrouted_expert_grads).
        self.experts_routed = [False] * num_experts
        self.grouped_kernel = grouped_kernel
        self._fold_cache: tuple | None = None
        self._fold_key: tuple | None = None

    # ------------------------------------------------------------------ public helpers
    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, rank={self.rank}, scaling={self.scaling:g}, "
            f"routing={self.routing!r}, dropout={self.lora_dropout}"
        )

    def train(self, mode: bool = True) -> "MoLEFFN":
        if mode:
            self.clear_fold_cache()  # weights are about to change; free E copies of fc1/fc2
        return super().train(mode)

    def clear_fold_cache(self) -> None:
        self._fold_cache = None
        self._fold_key = None

    def gates(self, probs: Tensor) -> Tensor:
        """Per-token expert weights ``[T, E]`` of the current routing mode (what multiplies each
        expert's LoRA output): one-hot (sparse, no gradient), one-hot * p (gated), p (dense),
        renormalised top-k p (topk)."""
        if self.routing == "dense":
            return probs
        if self.routing == "topk":
            top, idx = probs.topk(self.top_k, dim=-1)
            return torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        onehot = F.one_hot(probs.argmax(-1), self.num_experts).to(probs.dtype)
        return onehot * probs if self.routing == "gated" else onehot

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        device_type = x.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            # Cast once to the autocast dtype and run the body with autocast off: the custom kernels
            # and the in-place GEMMs below then see one dtype, exactly as autocast would give them.
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return self._forward(x.to(dtype), dtype)
        return self._forward(x, None)

    def _forward(self, x: Tensor, dtype: torch.dtype | None) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        # Softmax in float32: bf16 logits give visibly quantised gates.
        logits = F.linear(x2, _cast(self.router.weight, dtype), _cast(self.router.bias, dtype))
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        # Recorded whenever autograd records the router (probs.requires_grad), whatever the module
        # mode: a student run in eval mode (dropout off) still trains its routers by the balance loss.
        # Not during activation checkpointing's recomputation (inside the backward).
        if self.record_probs or (not _recomputing() and (probs.requires_grad or (self.training and torch.is_grad_enabled()))):
            self.router_probs = probs.view(*lead, self.num_experts)
            # Order stamp for collect_router_probs (a Python counter would force recompiles: skip
            # it under torch.compile, where the root pre-hook alone keeps records fresh).
            self.router_tick = None if torch.compiler.is_compiling() else next(_TICKS)
        # Data-dependent segment sizes need real values: compile, meta tensors and empty inputs take
        # the static-shape stacked path.
        if (self.routing in ("dense", "topk") or torch.compiler.is_compiling() or x2.device.type == "meta"
                or x2.shape[0] == 0):
            y = self._forward_stacked(x2, self.gates(probs), dtype)
            if torch.is_grad_enabled():  # every expert is in the graph (zero gates give zero gradients)
                self.experts_routed = [True] * self.num_experts
        elif (self.routing == "sparse" and not self.training and not torch.is_grad_enabled()
              and self._fold_now(x2.device, dtype or x2.dtype)):
            y = self._forward_folded(x2, probs.argmax(-1), dtype)
        elif self.grouped_kernel == "dense_masked":
            y = self._forward_masked(x2, probs, dtype)
        else:
            expert = probs.argmax(-1)
            gate = probs.gather(1, expert[:, None]) if self.routing == "gated" else None
            y = self._forward_grouped(x2, expert, gate, dtype)
        return y.view(*lead, y.shape[-1])

    def _fold_now(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether sparse inference runs on folded experts: ``fold_inference`` True, or ``"auto"`` where
        the folded GEMMs run on pre-packed weights (CPU with oneDNN, fp32/bf16), the case where
        ``movekd bench mole`` measured folding faster than the LoRA path (README, Performance)."""
        if self.fold_inference == "auto":
            return packed_linear_supported(device, dtype)
        return bool(self.fold_inference)

    def _mid(self, h: Tensor, dtype: torch.dtype | None) -> Tensor:
        if dtype is not None:
            # activation / norm run under the caller's autocast, as they would without MoLE
            with torch.autocast(h.device.type, dtype=dtype):
                for name in self._mid_names:
                    h = getattr(self, name)(h)
            return h.to(dtype)
        for name in self._mid_names:
            h = getattr(self, name)(h)
        return h

    def _post(self, y: Tensor) -> Tensor:
        for name in self._post_names:
            y = getattr(self, name)(y)
        return y

    def _dropout_p(self) -> float:
        return self.lora_dropout if self.training else 0.0

    # ------------------------------------------------------------------ grouped (top-1)
    def _forward_grouped(self, x: Tensor, expert: Tensor, gate: Tensor | None, dtype: torch.dtype | None) -> Tensor:
        order, inverse, counts = _group_by_expert(expert, self.num_experts)
        if torch.is_grad_enabled():
            self.experts_routed = [was or n > 0 for was, n in zip(self.experts_routed, counts)]
        xs = permute_rows(x, order, inverse)  # the only gather of inputs (d wide)
        gs = permute_rows(gate, order, inverse).to(x.dtype) if gate is not None else None
        h = self._linear_grouped(self.fc1, self.moe_down, xs, counts, gs, dtype)
        y = self._linear_grouped(self.fc2, self.moe_up, self._mid(h, dtype), counts, gs, dtype)
        return self._post(permute_rows(y, inverse, order))  # back to token order (d wide)

    def _linear_grouped(
        self, base: nn.Linear, experts: nn.ModuleList, z: Tensor, counts: list[int], gate: Tensor | None,
        dtype: torch.dtype | None,
    ) -> Tensor:
        """``base(z) + g * lora_e(drop(z))`` on each expert's segment of the sorted rows, one fused
        kernel (``movekd.mole.kernels.mole_linear``)."""
        used = [e for e, n in enumerate(counts) if n]
        loras = [experts[e] for e in used]
        return mole_linear(
            z, [counts[e] for e in used], self._dropout_p(), self.scaling,
            _cast(base.weight, dtype), _cast(base.bias, dtype), gate,
            [_cast(m.lora_A.weight, dtype) for m in loras], [_cast(m.lora_A.bias, dtype) for m in loras],
            [_cast(m.lora_B.weight, dtype) for m in loras], [_cast(m.lora_B.bias, dtype) for m in loras],
        )

    # ------------------------------------------------------------------ dense-masked (top-1)
    def _forward_masked(self, x: Tensor, probs: Tensor, dtype: torch.dtype | None) -> Tensor:
        """Top-1 in token order: each of fc1 / fc2 one ``mole_linear_masked`` over the experts some
        token chose, with the gate matrix (one-hot, times the gate for ``gated``) as the mask. The
        host counts drop unrouted experts from the stack, so they get no gradient (None)."""
        expert = probs.argmax(-1)
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        if torch.is_grad_enabled():
            self.experts_routed = [was or n > 0 for was, n in zip(self.experts_routed, counts)]
        used = [e for e, n in enumerate(counts) if n]
        gates = self.gates(probs)  # one-hot, times the routed probability for "gated"
        if len(used) < self.num_experts:
            gates = gates[:, used]
        gates = gates.to(x.dtype)
        h = self._linear_masked(self.fc1, self.moe_down, x, gates, used)
        y = self._linear_masked(self.fc2, self.moe_up, self._mid(h, dtype), gates, used)
        return self._post(y)

    def _linear_masked(self, base: nn.Linear, experts: nn.ModuleList, z: Tensor, gates: Tensor,
                       used: list[int]) -> Tensor:
        loras = [experts[e] for e in used]
        return mole_linear_masked(
            z, gates, self._dropout_p(), self.scaling, base.weight, base.bias,
            [m.lora_A.weight for m in loras], [m.lora_A.bias for m in loras],
            [m.lora_B.weight for m in loras], [m.lora_B.bias for m in loras],
        )

    # ------------------------------------------------------------------ folded (sparse inference)
    def _fold_params(self) -> list[Tensor]:
        params = [self.fc1.weight, self.fc2.weight]
        params += [p for p in (self.fc1.bias, self.fc2.bias) if p is not None]
        params += [p for m in (*self.moe_down, *self.moe_up) for p in m.parameters()]
        return params

    def _folded_weights(self, dtype: torch.dtype | None, device: torch.device, rows_hint: int) -> tuple:
        """``(w1, b1, w2, b2, packed)``: per-expert folded fc1/fc2 ([E, out, in] / [E, out]) in the
        compute dtype; on CPU with oneDNN the weights are kept only in packed form (``packed`` True,
        ``w1``/``w2`` lists of packed tensors), else ``packed`` is False."""
        # The cache key sees in-place updates (optimizer steps, load_state_dict bump ``_version``),
        # replaced storage (``.to()``, ``param.data = ...`` change ``data_ptr``) and the compute dtype.
        key = (dtype,) + tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self._fold_params())
        if self._fold_cache is None or key != self._fold_key:
            self._fold_cache = None  # free the old copies before building new ones
            with torch.no_grad():
                w1, b1, w2, b2 = _fold(self.fc1, self.moe_down) + _fold(self.fc2, self.moe_up)
                if dtype is not None:
                    w1, b1, w2, b2 = (t.to(dtype) for t in (w1, b1, w2, b2))
                packed = packed_linear_supported(device, w1.dtype)
                if packed:
                    w1 = [pack_linear_weight(w, rows_hint) for w in w1.unbind(0)]
                    w2 = [pack_linear_weight(w, rows_hint) for w in w2.unbind(0)]
            self._fold_cache = (w1, b1, w2, b2, packed)
            self._fold_key = key
        return self._fold_cache

    def _forward_folded(self, x: Tensor, expert: Tensor, dtype: torch.dtype | None) -> Tensor:
        order, inverse, counts = _group_by_expert(expert, self.num_experts)
        w1, b1, w2, b2, packed = self._folded_weights(dtype, x.device, max(x.shape[0] // self.num_experts, 1))
        xs = x.index_select(0, order)
        if packed:
            # Each expert's segment through its own pre-packed fc1 / fc2 (no per-call weight packing).
            parts, start = [], 0
            for e, n in enumerate(counts):
                if n:
                    h = packed_linear(xs.narrow(0, start, n), w1[e], b1[e])
                    parts.append(packed_linear(self._mid(h, dtype), w2[e], b2[e]))
                start += n
            y = torch.cat(parts) if len(parts) > 1 else parts[0]
        else:
            used = [e for e, n in enumerate(counts) if n]
            seg = [counts[e] for e in used]
            h = segmented_linear(xs, seg, [w1[e] for e in used], [b1[e] for e in used])
            y = segmented_linear(self._mid(h, dtype), seg, [w2[e] for e in used], [b2[e] for e in used])
        return self._post(y.index_select(0, inverse))

    # ------------------------------------------------------------------ stacked (dense / topk / compile)
    def _forward_stacked(self, x: Tensor, gates: Tensor, dtype: torch.dtype | None) -> Tensor:
        g = gates.to(x.dtype)
        h = torch.addmm(self._lora_stacked(self.moe_down, self.fc1, self._drop(x), g, dtype), x,
                        _cast(self.fc1.weight, dtype).t())
        a = self._mid(h, dtype)
        y = torch.addmm(self._lora_stacked(self.moe_up, self.fc2, self._drop(a), g, dtype), a,
                        _cast(self.fc2.weight, dtype).t())
        return self._post(y)

    def _drop(self, z: Tensor) -> Tensor:
        p = self._dropout_p()
        return F.dropout(z, p, training=True) if p > 0 else z

    def _lora_stacked(
        self, experts: nn.ModuleList, base: nn.Linear, z: Tensor, gates: Tensor, dtype: torch.dtype | None
    ) -> Tensor:
        """``base.bias + sum_e g_e * lora_e(z)`` for all tokens, as two GEMMs over the stacked experts."""
        w_a = torch.cat([_cast(m.lora_A.weight, dtype) for m in experts], 0)  # [E*r, in]
        b_a = torch.cat([_cast(m.lora_A.bias, dtype) for m in experts], 0)
        low = F.linear(z, w_a, b_a) * gates.repeat_interleave(self.rank, dim=1)  # [T, E*r]
        w_b = torch.cat([_cast(m.lora_B.weight, dtype) for m in experts], 1)  # [out, E*r]
        b_b = torch.stack([_cast(m.lora_B.bias, dtype) for m in experts], 1)  # [out, E]
        # g_e * (B_e low_e + b_e) summed over e = [g*low, g] @ [B, b]^T
        return F.linear(torch.cat([low, gates], 1), torch.cat([w_b, b_b], 1) * self.scaling, _cast(base.bias, dtype))


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def _group_by_expert(expert: Tensor, num_experts: int) -> tuple[Tensor, Tensor, list[int]]:
    """Permutation sorting tokens by expert, its inverse, and the tokens per expert (host ints)."""
    order = torch.argsort(expert, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(expert, minlength=num_experts).tolist()
    return order, inverse, counts


def _fold(base: nn.Linear, experts: nn.ModuleList) -> tuple[Tensor, Tensor]:
    """``[E, out, in]`` weights and ``[E, out]`` biases of ``base + expert e`` for every e."""
    weights, biases = [], []
    w0 = base.weight.float()
    b0 = base.bias.float() if base.bias is not None else torch.zeros(base.out_features, device=w0.device)
    for lora in experts:
        dw, db = lora.delta_weight()
        weights.append((w0 + dw).to(base.weight.dtype))
        biases.append((b0 + db).to(base.weight.dtype))
    return torch.stack(weights), torch.stack(biases)
