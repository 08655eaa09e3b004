"""Autograd kernels for routing tokens grouped by expert (the fast path of ``MoLEFFN``).

Tokens are sorted by expert once, so each expert owns one contiguous row segment. Then:

- ``permute_rows``: a row gather whose backward is the inverse gather. The stock backward of
  ``index_select`` is ``index_add_``, measured at ~80 ms against ~5 ms for the gather on a
  [577, 1024] tensor with 2 threads on a shared 2-core machine (both < 0.1 ms with 1 thread).
- ``segmented_linear``: ``out[seg_e] = inp[seg_e] @ W_e^T + b_e`` written straight into one output
  buffer (``out=`` slices), so no per-expert output is concatenated or scattered; the backward writes
  the input gradient the same way. Used for the LoRA B half, whose output is the wide one.
- ``segmented_lora_in``: the LoRA A half with its input dropout, ``low[seg_e] = drop(z[seg_e]) @ A_e^T
  + a_e``. It saves a 1-byte drop mask instead of the dropped float input (for the fc2 LoRA the input
  is 4096 wide and ``z`` itself is saved by fc2 anyway), draws the mask cheaply (``bernoulli_mask``)
  and recomputes the dropped input in backward.

All of them take ``counts`` (tokens per expert, host ints): empty segments are skipped and their
parameters get no gradient.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torch.autograd import Function


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


def bernoulli_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """Bool tensor, True with probability ``p`` (the dropped entries).

    On CPU the default generator (mt19937) is single-threaded and ``rand``/``bernoulli_`` cost ~3 ns
    per element, several ms per step for a 577 x 4096 mask. Drawing one int64 per 4 entries and
    comparing 15-bit lanes is ~3x cheaper; ``p`` is then rounded to a multiple of 2^-15 (0.05 becomes
    0.049988). Other devices use ``rand < p``.
    """
    if torch.device(device).type != "cpu":
        return torch.rand(shape, device=device) < p
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 random bits
    lanes = words.view(torch.int16)[:numel].bitwise_and(0x7FFF)  # 4 lanes of 15 uniform bits
    return (lanes < round(p * 32768)).view(shape)


class _SegmentedLoRAIn(Function):
    @staticmethod
    def forward(ctx, z: Tensor, counts: list[int], p: float, *params: Tensor) -> Tensor:
        num = len(counts)
        weights, biases = params[:num], params[num:]
        drop = bernoulli_mask(z.shape, p, z.device) if p > 0 else None
        scale = 1.0 / (1.0 - p)
        # One masked copy for all segments (a transient; the saved state is z, shared with the caller,
        # and the 1-byte mask). The 1/(1-p) goes on the small A (r x in), not on the wide input.
        zd = torch.where(drop, 0, z) if drop is not None else z
        out = z.new_empty(z.shape[0], weights[0].shape[0])
        start = 0
        for e, n in enumerate(counts):
            if n:
                w = weights[e] * scale if drop is not None else weights[e]
                torch.addmm(biases[e], zd.narrow(0, start, n), w.t(), out=out.narrow(0, start, n))
            start += n
        ctx.counts, ctx.scale = counts, scale
        ctx.save_for_backward(z, drop, *weights)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, drop, *weights = ctx.saved_tensors
        counts, scale = ctx.counts, ctx.scale
        num = len(counts)
        need_z = ctx.needs_input_grad[0]
        need_w = any(ctx.needs_input_grad[3:3 + num])
        grad = grad.contiguous()
        grad_z = grad.new_empty(z.shape) if need_z else None
        zd = (torch.where(drop, 0, z) if drop is not None else z) if need_w else None  # recomputed
        grad_w: list[Tensor | None] = [None] * num
        grad_b: list[Tensor | None] = [None] * num
        start = 0
        for e, n in enumerate(counts):
            if n:
                g = grad.narrow(0, start, n)
                if need_z:
                    w = weights[e] * scale if drop is not None else weights[e]
                    torch.mm(g, w, out=grad_z.narrow(0, start, n))
                if ctx.needs_input_grad[3 + e]:
                    grad_w[e] = (g * scale if drop is not None else g).t() @ zd.narrow(0, start, n)
                if ctx.needs_input_grad[3 + num + e]:
                    grad_b[e] = g.sum(0)
            start += n
        if need_z and drop is not None:
            grad_z.masked_fill_(drop, 0)
        return (grad_z, None, None, *grad_w, *grad_b)


def segmented_lora_in(
    z: Tensor, counts: list[int], p: float, weights: Sequence[Tensor], biases: Sequence[Tensor]
) -> Tensor:
    """LoRA A half per segment with input dropout ``p`` (pass 0 in eval mode)."""
    return _SegmentedLoRAIn.apply(z, counts, p, *weights, *biases)


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
