"""Autograd kernels for routing tokens grouped by expert (the fast paths of ``MoLEFFN``).

Tokens are sorted by expert once, so each expert owns one contiguous row segment. Then:

- ``permute_rows``: a row gather whose backward is the inverse gather. The stock backward of
  ``index_select`` is ``index_add_``, measured at ~80 ms against ~5 ms for the gather on a
  [577, 1024] tensor with 2 threads on a shared 2-core machine (both < 0.1 ms with 1 thread).
- ``mole_linear``: one MoLE linear (fc1 or fc2 with its routed LoRA experts and their input dropout)
  as a single autograd function; see its section below for what it saves over composing autograd ops.
- ``mole_linear_masked``: the same MoLE linear in token order, every expert's LoRA on every row in one
  GEMM per side, masked by the routing gates (a fixed number of GEMMs, E times the LoRA FLOPs).
- ``segmented_linear``: ``out[seg_e] = inp[seg_e] @ W_e^T + b_e`` written straight into one output
  buffer (``out=`` slices); used by the folded inference path on devices without oneDNN packing.

The segment kernels take ``counts`` (tokens per expert, host ints): empty segments are skipped and
their parameters get no gradient; the masked kernel is given only the experts some row is routed to.
On CPU in bf16 / fp16, ``mole_linear`` runs each segment's small GEMMs on windows of bucketed row
counts (``bucket_rows``; see "Stable GEMM shapes" below).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torch.autograd import Function

from movekd.mole import native_rng


class _PermuteRows(Function):
    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """``x[index]`` for a permutation ``index`` whose inverse is ``inverse``."""
    return _PermuteRows.apply(x, index, inverse)


class _SegmentedLinear(Function):
    @staticmethod
    def forward(ctx, inp: Tensor, counts: list[int], *params: Tensor) -> Tensor:
        num = len(counts)
        weights, biases = params[:num], params[num:]
        out = inp.new_empty(inp.shape[0], weights[0].shape[0])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.addmm(biases[e], inp.narrow(0, start, n), weights[e].t(), out=out.narrow(0, start, n))
            start += n
        ctx.counts = counts
        ctx.save_for_backward(inp, *weights)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        inp, *weights = ctx.saved_tensors
        counts = ctx.counts
        need_inp = ctx.needs_input_grad[0]
        grad = grad.contiguous()
        grad_inp = grad.new_empty(inp.shape) if need_inp else None
        grad_w: list[Tensor | None] = [None] * len(counts)
        grad_b: list[Tensor | None] = [None] * len(counts)
        start = 0
        for e, n in enumerate(counts):
            if n:
                g = grad.narrow(0, start, n)
                if need_inp:
                    torch.mm(g, weights[e], out=grad_inp.narrow(0, start, n))
                if ctx.needs_input_grad[2 + e]:
                    # (inp^T g)^T: MKL is faster with the long H side as N than as a transposed M
                    grad_w[e] = (inp.narrow(0, start, n).t() @ g).t()
                if ctx.needs_input_grad[2 + len(counts) + e]:
                    grad_b[e] = g.sum(0)
            start += n
        return (grad_inp, None, *grad_w, *grad_b)


def segmented_linear(inp: Tensor, counts: list[int], weights: Sequence[Tensor], biases: Sequence[Tensor]) -> Tensor:
    """Per-segment affine map (rows sorted by expert, ``counts`` rows per expert)."""
    return _SegmentedLinear.apply(inp, counts, *weights, *biases)


# ---------------------------------------------------------------------------------------------------
# One fused autograd function per MoLE linear (the grouped training and inference path).
#
# ``out = z W^T + b + g * s * (B_e (A_e drop(z) + a_e) + b_e)`` for rows sorted by expert, in one
# Function instead of a LoRA-in kernel, a LoRA-out kernel and an in-place GEMM glued by autograd, so
# that the backward needs no extra pass over the wide tensors:
# - the wide output is written once by the LoRA B GEMM (with both biases folded in) and the big GEMM
#   accumulates onto it (beta=1), as a plain Linear's GEMM accumulates onto its broadcast bias;
# - the input gradient of the LoRA (masked by dropout) is written first and the big ``g W`` GEMM
#   accumulates onto it, instead of autograd adding two wide gradients;
# - the weight gradient is ``g^T z`` in the weight's own layout (what a plain Linear computes), with no
#   transposed copy; per-segment bias sums are computed once and summed for the base bias;
# - dropout keeps no mask: a ``DropoutMask`` re-derives it from a seed whenever it is applied (the
#   input in the forward, the LoRA input gradient in the backward), on CPU in one fused pass; drop(z)
#   is saved for the A gradients instead of being made again (the same memory as the 2-byte lanes
#   the kernel saved before, in bf16 / fp16).


def draw_dropout_lanes(shape: torch.Size, device: torch.device, seed: int) -> Tensor:
    """Uniform random lanes for ``seed`` deciding a dropout mask of ``shape``: on CPU int16 lanes
    carved out of full 64-bit words (4 lanes per word; the words from the compiled counter-based
    generator of ``movekd.mole.native_rng``, else from mt19937 seeded with ``seed``), elsewhere floats
    in [0, 1) from the device's generator seeded with ``seed``."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.rand(shape, device=device, generator=torch.Generator(device).manual_seed(seed))
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    if not native_rng.fill_random_words(words, seed):
        words.random_(-(2**63), None, generator=torch.Generator().manual_seed(seed))
    return words.view(torch.int16)[:numel].view(shape)


def lane_threshold(p: float) -> int:
    """The int16 lane below which an entry is dropped (``p`` rounded to a multiple of 2^-16)."""
    return -32768 + round(p * 65536)


def keep_mask(lanes: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """{0, 1} tensor in ``dtype``: 0 (dropped) with probability ``p`` (on CPU ``p`` is rounded to a
    multiple of 2^-16: 0.05 becomes 0.050003)."""
    out = torch.empty(lanes.shape, dtype=dtype, device=lanes.device)
    if lanes.dtype == torch.int16:
        return torch.ge(lanes, lane_threshold(p), out=out)
    return torch.ge(lanes, p, out=out)


class DropoutMask:
    """Which entries of a tensor LoRA dropout keeps (probability ``1 - p``), applied as often as the
    kernel needs (to the input in the forward, to the input gradient in the backward) and the same
    every time. Not rescaled: the kernels apply 1 / (1 - p) to the r-wide product."""

    def __init__(self, p: float):
        self.p = p

    def lanes(self) -> Tensor:
        raise NotImplementedError

    def apply(self, src: Tensor, out: Tensor | None = None) -> Tensor:
        """``src`` with the dropped entries zeroed, into ``out`` (``src`` itself is allowed) or a new
        tensor: a multiply by a {0, 1} mask in ``src``'s dtype (bool-mask ``where`` / ``masked_fill``
        measured 3-5x slower than a multiply on CPU)."""
        keep = keep_mask(self.lanes(), self.p, src.dtype)
        return keep.mul_(src) if out is None else torch.mul(src, keep, out=out)


class StoredDropoutMask(DropoutMask):
    """A mask given by its lanes (int16 as on CPU, or floats in [0, 1)), kept as they are."""

    def __init__(self, lanes: Tensor, p: float):
        super().__init__(p)
        self._lanes = lanes

    def lanes(self) -> Tensor:
        return self._lanes


class SeededDropoutMask(DropoutMask):
    """A mask of which nothing is stored but a 64-bit seed, drawn from PyTorch's default generator
    (so ``torch.manual_seed`` fixes it, and activation checkpointing's replay of the RNG state draws
    the same one): each ``apply`` re-derives it, on CPU in one pass from the compiled counter-based
    generator (``native_rng.apply_dropout``), elsewhere from lanes drawn again (``draw_dropout_lanes``)."""

    def __init__(self, shape: torch.Size, p: float, device: torch.device):
        super().__init__(p)
        self.shape, self.device, self.seed = torch.Size(shape), torch.device(device), native_rng.draw_seed()

    def lanes(self) -> Tensor:
        return draw_dropout_lanes(self.shape, self.device, self.seed)

    def apply(self, src: Tensor, out: Tensor | None = None) -> Tensor:
        if src.shape != self.shape:
            raise ValueError(f"dropout mask of shape {tuple(self.shape)} applied to a tensor of shape {tuple(src.shape)}")
        fused = native_rng.apply_dropout(src, self.seed, lane_threshold(self.p), out)
        return fused if fused is not None else super().apply(src, out)


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> DropoutMask:
    """A fresh dropout mask for a tensor of ``shape`` (the kernels' one hook for it)."""
    return SeededDropoutMask(shape, p, device)


def bernoulli_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """Bool tensor, True with probability ``p`` (the dropped entries), drawn as the kernels draw it."""
    return keep_mask(dropout_mask(shape, p, device).lanes(), p, torch.bool).logical_not_()


# Stable GEMM shapes for the expert segments (CPU, bf16 / fp16).
#
# oneDNN runs PyTorch's bf16 / fp16 GEMMs on CPU and builds (JIT-compiles) a kernel for every new
# problem shape: about 1-2 ms per new segment length against 0.05-0.1 ms for the rank-32 GEMM itself,
# measured with 2 threads. Segment lengths change with the routing at every batch, so in the demo's
# bf16 training about 100 kernels a step were built for the LoRA GEMMs alone (oneDNN's verbose log:
# 3,900 of 6,300 matmul kernels built in 40 steps of `movekd bench train`). So on CPU in those
# dtypes each segment's small GEMMs run on a *window* of ``bucket_rows(n)`` rows: a fixed ladder of
# sizes (multiples of 8 up to 64 rows, then 8 sizes per octave, at most 1/8 extra rows), so a training
# run sees a few dozen shapes per GEMM instead of one per batch. The window's extra rows are neutralised:
# - where the row count is the output's (M): a read window of the input ``[w, w + size)`` inside the
#   tensor, and only the segment's rows of the r-wide result are kept; for the two wide outputs (the
#   LoRA B GEMM into ``out`` and the LoRA input gradient) the window starts at the segment and runs on,
#   segments are written in order so a later one overwrites what the previous window wrote past its
#   rows, and the buffer has spare rows after its end for the last window (``_rows_with_spare``);
# - where the row count is the reduction (K: the weight gradients): the r-wide operand is zero outside
#   the segment's rows, so the other rows of the window add nothing (exact).
# Elsewhere (fp32 on CPU runs MKL, which builds nothing per shape; CUDA) every GEMM uses the exact rows.


def bucket_rows(n: int) -> int:
    """``n`` rounded up on the ladder of GEMM row counts: multiples of 8 up to 64, then 8 sizes per
    octave (multiples of 2^(k-3) in (2^(k-1), 2^k]), so at most n/8 extra rows."""
    if n <= 64:
        return -(-n // 8) * 8
    step = 1 << ((n - 1).bit_length() - 4)
    return -(-n // step) * step


def stable_segment_shapes(t: Tensor) -> bool:
    """Whether segment GEMMs on ``t`` should run on bucketed windows: CPU in bf16 / fp16 (oneDNN)."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def _segment_windows(counts: Sequence[int], rows: int, bucketed: bool) -> tuple[list[tuple[int, int, int, int]], int]:
    """Per segment ``(start, n, size, read)``: its rows ``[start, start + n)``, the GEMM row count
    ``size`` and the start ``read`` of a window of ``size`` rows inside ``[0, rows)`` holding the
    segment; and the spare rows a buffer needs for windows ``[start, start + size)``."""
    windows, start, spare = [], 0, 0
    for n in counts:
        size = min(bucket_rows(n), rows) if bucketed else n
        windows.append((start, n, size, min(start, rows - size)))
        spare = max(spare, start + size - rows)
        start += n
    return windows, spare


def _rows_with_spare(like: Tensor, rows: int, cols: int, spare: int) -> tuple[Tensor, Tensor]:
    """``(head, full)``: an uninitialised ``[rows, cols]`` tensor and a ``[rows + spare, cols]`` one on
    the same storage. ``head`` is a tensor of its own, not a view, so a custom Function may return it
    and callers may modify it in place (autograd forbids that on a view made inside a Function)."""
    full = like.new_empty(rows + spare, cols)
    if not spare:
        return full, full
    head = like.new_empty(0).set_(full.untyped_storage(), full.storage_offset(), (rows, cols), (cols, 1))
    return head, full


def _padded(src: Tensor, size: int, offset: int) -> Tensor:
    """``src`` ``[n, c]`` placed at rows ``[offset, offset + n)`` of a ``[size, c]`` zero tensor (itself
    when it already has ``size`` rows)."""
    if src.shape[0] == size:
        return src
    out = src.new_zeros(size, src.shape[1])
    out[offset:offset + src.shape[0]] = src
    return out


class _MoLELinear(Function):
    @staticmethod
    def forward(ctx, z: Tensor, counts: list[int], p: float, scaling: float, weight: Tensor,
                bias: Tensor | None, gate: Tensor | None, *lora: Tensor) -> Tensor:
        num = len(counts)
        a_w, a_b, b_w, b_b = (lora[i * num:(i + 1) * num] for i in range(4))
        mask = dropout_mask(z.shape, p, z.device) if p > 0 else None
        zd = mask.apply(z) if mask is not None else z
        inv_keep = 1.0 / (1.0 - p)  # dropout's rescale, applied to the r-wide product, not to z
        rank, total = a_w[0].shape[0], z.shape[0]
        windows, spare = _segment_windows(counts, total, stable_segment_shapes(z))
        low = z.new_empty(total, rank)
        out, out_rows = _rows_with_spare(z, total, weight.shape[0], spare)
        for e, (start, n, size, read) in enumerate(windows):
            rows = slice(start, start + n)
            if size == n:
                torch.addmm(a_b[e], zd[rows], a_w[e].t(), alpha=inv_keep, out=low[rows])
            else:  # a window of the input; the segment's rows of the r-wide result kept
                window = torch.addmm(a_b[e], zd[read:read + size], a_w[e].t(), alpha=inv_keep)
                low[rows] = window[start - read:start - read + n]
            if gate is None:
                # s * (B low + b_e) + bias: both biases go into the one wide write
                b_e = b_b[e] * scaling if bias is None else torch.add(bias, b_b[e], alpha=scaling)
                torch.addmm(b_e, _padded(low[rows], size, 0), b_w[e].t(), alpha=scaling,
                            out=out_rows[start:start + size])
            else:
                # g * s * (B low + b_e) = s * [g*low, g] @ [B, b_e]^T: the gate scales the r-wide side
                ucat = torch.cat([low[rows] * gate[rows], gate[rows]], 1)
                bcat = torch.cat([b_w[e], b_b[e][:, None]], 1)
                base = bias if bias is not None else out.new_zeros(())
                torch.addmm(base, _padded(ucat, size, 0), bcat.t(), alpha=scaling, out=out_rows[start:start + size])
        out.addmm_(z, weight.t())
        ctx.counts, ctx.p, ctx.scaling, ctx.has_bias = counts, p, scaling, bias is not None
        ctx.windows, ctx.spare = windows, spare  # the backward runs the same windows
        ctx.mask = mask
        ctx.save_for_backward(z, zd if mask is not None else None, low, gate, weight, *a_w, *b_w, *b_b)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, zd, low, gate, weight, *rest = ctx.saved_tensors
        counts, p, s, mask = ctx.counts, ctx.p, ctx.scaling, ctx.mask
        num = len(counts)
        a_w, b_w, b_b = rest[:num], rest[num:2 * num], rest[2 * num:]
        needs = ctx.needs_input_grad
        need_z, need_w, need_bias, need_gate = needs[0], needs[4], needs[5], needs[6]
        lora_needs = needs[7:]
        grad = grad.contiguous()
        inv_keep = 1.0 / (1.0 - p)
        rank = low.shape[1]
        need_a_w = any(lora_needs[:num])
        grad_weight = grad.t().mm(z) if need_w else None
        grad_gate = torch.empty_like(gate) if need_gate else None
        windows, spare = ctx.windows, ctx.spare
        grad_z_lora, grad_z_rows = _rows_with_spare(z, z.shape[0], z.shape[1], spare) if need_z else (None, None)
        g_a_w, g_a_b, g_b_w, g_b_b = ([None] * num for _ in range(4))
        seg_sums, g_lows = [], []
        for e, (start, n, size, read) in enumerate(windows):
            rows = slice(start, start + n)
            g = grad[read:read + size]  # the segment's rows at [at, at + n) of this window
            at = start - read
            gt = gate[rows] if gate is not None else None
            # g^T [u, (gate,) 1] in one GEMM: the B gradient, the expert-bias gradient and the segment's
            # column sums (for the base bias) without another pass over the wide gradient. Zero rows
            # outside the segment keep a window exact.
            u = low[rows] if gt is None else low[rows] * gt
            cols = [u] + ([gt] if gt is not None else []) + [u.new_ones(n, 1)]
            g_cols = torch.mm(g.t(), _padded(torch.cat(cols, 1), size, at))  # [out, r (+1) + 1]
            seg_sums.append(g_cols[:, -1])
            if lora_needs[2 * num + e]:
                g_b_w[e] = g_cols[:, :rank] * s
            if lora_needs[3 * num + e]:
                g_b_b[e] = g_cols[:, rank if gt is not None else -1] * s
            if gt is None:
                g_low = torch.mm(g, b_w[e])[at:at + n].mul_(s)  # [n, r]
            else:
                g_ucat = torch.mm(g, torch.cat([b_w[e], b_b[e][:, None]], 1))[at:at + n].mul_(s)  # [n, r + 1]
                g_u = g_ucat[:, :-1]
                if need_gate:
                    grad_gate[rows] = g_ucat[:, -1:] + (g_u * low[rows]).sum(1, keepdim=True)
                g_low = g_u * gt
            if lora_needs[num + e]:
                g_a_b[e] = g_low.sum(0)
            g_lows.append((rows, g_low, size, read))
            if need_z:  # written from the segment's first row on (the next segment overwrites the rest)
                g_in = g_low * inv_keep if mask is not None else g_low
                torch.mm(_padded(g_in, size, 0), a_w[e], out=grad_z_rows[start:start + size])
        grad_z = None
        if need_z:
            if mask is not None:  # the forward's mask, derived again, on the LoRA input gradient
                mask.apply(grad_z_lora, out=grad_z_lora)
            grad_z = grad_z_lora.addmm_(grad, weight)  # the big GEMM accumulates onto the LoRA part
        if need_a_w:
            zd = zd if mask is not None else z
            for e, (rows, g_low, size, read) in enumerate(g_lows):
                if lora_needs[e]:
                    g_a_w[e] = torch.mm(_padded(g_low, size, rows.start - read).t(), zd[read:read + size]).mul_(inv_keep)
        grad_bias = torch.stack(seg_sums).sum(0) if need_bias and ctx.has_bias else None
        return (grad_z, None, None, None, grad_weight, grad_bias, grad_gate, *g_a_w, *g_a_b, *g_b_w, *g_b_b)


def mole_linear(
    z: Tensor, counts: list[int], p: float, scaling: float, weight: Tensor, bias: Tensor | None,
    gate: Tensor | None, a_w: Sequence[Tensor], a_b: Sequence[Tensor], b_w: Sequence[Tensor],
    b_b: Sequence[Tensor],
) -> Tensor:
    """``z W^T + b + gate * scaling * (B_e (A_e drop_p(z) + a_e) + b_e)`` with ``z``'s rows sorted by
    expert (``counts`` rows per segment, all > 0; the LoRA tensors list those experts in order); ``gate``
    ``[rows, 1]`` or None (sparse: 1)."""
    return _MoLELinear.apply(z, counts, p, scaling, weight, bias, gate, *a_w, *a_b, *b_w, *b_b)


# ---------------------------------------------------------------------------------------------------
# One MoLE linear over all experts at once, masked by the routing gates (the "dense-masked" path).
#
# ``out = z W^T + b + s * sum_e G[:, e] * (B_e (A_e drop(z) + a_e) + b_e)`` for a gate matrix ``G``
# ``[N, E]`` (top-1: the routed expert's gate, or 1 for sparse routing, and 0 elsewhere), in token
# order: no row permutation and a fixed number of GEMMs whatever E (forward 3, backward at most 6),
# against ``_MoLELinear``'s 2 + 2E and 2 + 4E on sorted rows plus the permutations around them. The
# price is FLOPs: every token runs all E experts' LoRA (E * r columns) and the gates zero the others,
# so the LoRA costs E times one expert's FLOPs (CLIP-L, E=3, r=32: 11.7 % of the FFN against 3.9 %).
# The same write-first / accumulate-the-big-GEMM layout as ``_MoLELinear``:
# - forward: ``low = drop(z) A_cat^T + a_cat`` ([N, E*r], one GEMM); ``u = [low * G, G]`` (each
#   expert's r columns scaled by its gate, then the gates themselves for the expert biases b_e);
#   ``out = bias + s * u [B_cat, b_cat]^T`` (one GEMM writes the wide output) and ``out += z W^T``;
# - backward: ``g^T [u, 1]`` gives the B and b_e gradients and the base bias' sum in one GEMM;
#   ``g_u = s * g [B_cat, b_cat]``, ``g_low = g_u * G``; ``g_low^T drop(z)`` the A gradient;
#   ``(g_low A_cat) * keep`` written first and ``g W`` accumulated onto it for the input gradient.


class _MoLELinearMasked(Function):
    @staticmethod
    def forward(ctx, z: Tensor, gates: Tensor, p: float, scaling: float, weight: Tensor,
                bias: Tensor | None, *lora: Tensor) -> Tensor:
        num = gates.shape[1]
        a_w, a_b, b_w, b_b = (lora[i * num:(i + 1) * num] for i in range(4))
        dtype, rows = z.dtype, z.shape[0]
        rank = a_w[0].shape[0]
        cols = num * rank
        # Cast inside (a no-op in float32): one cast per stacked tensor instead of one autograd
        # cast node per parameter; autograd casts the gradients back to each parameter's dtype.
        weight = weight.to(dtype)
        a_cat = torch.cat(a_w).to(dtype)  # [E*r, in]
        # [s B_cat, s b_cat, bias]: the scaling and the base bias go into the LoRA B GEMM, so it writes
        # the whole LoRA part plus bias (no broadcast copy of the bias, no alpha pass)
        out_features = weight.shape[0]
        bb = b_w[0].new_empty(out_features, cols + num + 1)
        for e in range(num):
            torch.mul(b_w[e], scaling, out=bb[:, e * rank:(e + 1) * rank])
        torch.mul(torch.stack(b_b, 1), scaling, out=bb[:, cols:cols + num])
        bb[:, -1] = 0 if bias is None else bias
        bb = bb.to(dtype)  # [out, E*r + E + 1]
        mask = dropout_mask(z.shape, p, z.device) if p > 0 else None
        zd = mask.apply(z) if mask is not None else z
        inv_keep = 1.0 / (1.0 - p)  # dropout's rescale, applied to the r-wide product, not to z
        low = torch.addmm(torch.cat(a_b).to(dtype), zd, a_cat.t(), alpha=inv_keep)  # [N, E*r]
        # u = [low * G, G, 1]: each expert's r columns times its gate, the gates (for the expert
        # biases), ones (for the base bias; in the backward GEMM, the base bias gradient)
        u = z.new_empty(rows, cols + num + 1)
        torch.mul(low.view(rows, num, rank), gates[:, :, None], out=u[:, :cols].unflatten(1, (num, rank)))
        u[:, cols:cols + num] = gates
        u[:, -1] = 1
        out = torch.mm(u, bb.t())
        out.addmm_(z, weight.t())  # the big GEMM accumulates onto the LoRA part
        ctx.p, ctx.scaling, ctx.has_bias, ctx.rank, ctx.mask = p, scaling, bias is not None, rank, mask
        ctx.save_for_backward(z, zd if mask is not None else None, low, u, gates, weight, a_cat, bb)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, zd, low, u, gates, weight, a_cat, bb = ctx.saved_tensors
        p, s, rank, mask = ctx.p, ctx.scaling, ctx.rank, ctx.mask
        rows, num = gates.shape
        cols = num * rank
        needs = ctx.needs_input_grad
        need_z, need_gates, need_w, need_bias = needs[0], needs[1], needs[4], needs[5] and ctx.has_bias
        lora_needs = needs[6:]
        need_a_w, need_a_b = any(lora_needs[:num]), any(lora_needs[num:2 * num])
        need_b = any(lora_needs[2 * num:])
        grad = grad.contiguous()
        grad_weight = grad.t().mm(z) if need_w else None
        g_a_w, g_a_b, g_b_w, g_b_b = ([None] * num for _ in range(4))
        grad_bias = None
        if need_b or need_bias:
            g_cols = torch.mm(grad.t(), u)  # [out, E*r + E + 1]
            for e in range(num):
                if lora_needs[2 * num + e]:
                    g_b_w[e] = g_cols[:, e * rank:(e + 1) * rank] * s
                if lora_needs[3 * num + e]:
                    g_b_b[e] = g_cols[:, cols + e] * s
            grad_bias = g_cols[:, -1] if need_bias else None
        grad_gates = grad_z = None
        if need_gates or need_a_w or need_a_b or need_z:
            g_u = torch.mm(grad, bb)  # [N, E*r + E + 1] (B already scaled; the last column unused)
            g_u_low = g_u[:, :cols].unflatten(1, (num, rank))
            if need_gates:
                grad_gates = (g_u_low * low.view(rows, num, rank)).sum(2) + g_u[:, cols:cols + num]
            g_low = (g_u_low * gates[:, :, None]).view(rows, cols)
            if need_a_b:
                g_a_b = list(g_low.sum(0).split(rank))
            if mask is not None:
                g_low = g_low * (1.0 / (1.0 - p))
            if need_z:
                grad_z = torch.mm(g_low, a_cat)
                if mask is not None:
                    mask.apply(grad_z, out=grad_z)
                grad_z.addmm_(grad, weight)  # the big GEMM accumulates onto the LoRA part
            if need_a_w:
                zd = zd if mask is not None else z
                g_a_w = list(torch.mm(g_low.t(), zd).split(rank))
        elif need_z:
            grad_z = grad.mm(weight)
        g_a_w = [g if lora_needs[e] else None for e, g in enumerate(g_a_w)]
        g_a_b = [g if lora_needs[num + e] else None for e, g in enumerate(g_a_b)]
        return (grad_z, grad_gates, None, None, grad_weight, grad_bias, *g_a_w, *g_a_b, *g_b_w, *g_b_b)


def mole_linear_masked(
    z: Tensor, gates: Tensor, p: float, scaling: float, weight: Tensor, bias: Tensor | None,
    a_w: Sequence[Tensor], a_b: Sequence[Tensor], b_w: Sequence[Tensor], b_b: Sequence[Tensor],
) -> Tensor:
    """``z W^T + b + scaling * sum_e gates[:, e] * (B_e (A_e drop_p(z) + a_e) + b_e)`` in token order,
    ``gates`` ``[rows, E]`` in ``z``'s dtype (the LoRA tensors list those E experts in order; pass only
    experts some row is routed to, so the others get no gradient). Parameters may be in a wider dtype
    than ``z`` (autocast's float32 masters): they are cast to ``z``'s dtype inside."""
    return _MoLELinearMasked.apply(z, gates, p, scaling, weight, bias, *a_w, *a_b, *b_w, *b_b)


# ---------------------------------------------------------------------------------------------------
# Pre-packed weights for the folded inference path (CPU).
#
# On CPU every GEMM call re-packs its weight into the BLAS kernel's blocked layout. The folded path
# runs fc1/fc2 once per expert segment, so a plain call pays that packing E times instead of once:
# that, not the FLOPs, made folding slower than the plain FFN in fp32. oneDNN can reorder a weight
# once (``mkldnn._reorder_linear_weight``) and reuse it for any number of rows
# (``mkldnn._linear_pointwise``, what Inductor uses for frozen CPU linears). The packed tensors are an
# in-memory cache only: they cannot be saved or moved, and are rebuilt from the real weights.


def packed_linear_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True where ``pack_linear_weight`` / ``packed_linear`` can run (CPU with oneDNN, fp32/bf16)."""
    return (
        torch.device(device).type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack_linear_weight(weight: Tensor, rows_hint: int) -> Tensor:
    """``weight`` ``[out, in]`` reordered once into oneDNN's blocked layout (``rows_hint``: typical
    number of input rows; any row count works at call time)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), max(int(rows_hint), 1))


def packed_linear(inp: Tensor, packed_weight: Tensor, bias: Tensor | None) -> Tensor:
    """``inp @ W^T + b`` with a weight from ``pack_linear_weight`` (inference only, no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(inp, packed_weight, bias, "none", [], "")
