"""FLOP counting on real CPU tensors, and the matmul rates a step's FLOP rate is compared with.

``FlopCounterMode`` knows the attention kernels of CUDA (flash, memory-efficient) but not the CPU flash
kernel that ``scaled_dot_product_attention`` dispatches to here, so on CPU tensors it silently counts
no attention. :func:`flop_counter` registers that kernel (forward and backward) with torch's own SDPA
formulas, so a step counted on this machine equals the same step counted on the ``meta`` device.
"""

from __future__ import annotations

import time

import torch
from torch.utils import flop_counter as fc


def flop_counter() -> fc.FlopCounterMode:
    """A quiet ``FlopCounterMode`` that also counts CPU flash attention."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _raw(fc.sdpa_flop)
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _raw(fc.sdpa_backward_flop)
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def _raw(formula):
    """torch's formulas are already wrapped to take tensors: tell ``FlopCounterMode`` not to wrap again."""
    def count(*args, out_val=None, **kwargs):
        return formula(*args, out_val=out_val, **kwargs)

    count._get_raw = True
    return count


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a ``size``² matmul in ``dtype`` on the CPU (the hardware's rate)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up (oneDNN picks and caches its kernel)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
