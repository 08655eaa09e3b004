"""Peak tensor memory of a forward, counted op by op: works on the ``meta`` device (paper scale without
weights) as well as on real tensors.

:class:`PeakMemory` is a ``TorchDispatchMode``: every tensor an op creates (not a view, not an
in-place result, which alias an input) adds its bytes to the live total until Python frees it; the
peak of that total is the activation memory of the code run under the mode (the KV cache included,
while the caller holds it). Memory the model holds before (its weights) is not counted: add
:func:`module_bytes` for the total. Allocator overhead and kernel workspaces are not counted.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def module_bytes(*modules: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``modules`` (each tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as pm: ...`` then ``pm.peak`` (bytes) and ``pm.live`` (still held)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        flat, _ = tree_flatten(out)
        for index, tensor in enumerate(flat):
            if not isinstance(tensor, torch.Tensor):
                continue
            # Views and in-place/out= results alias an input: their memory is already counted.
            alias = returns[min(index, len(returns) - 1)].alias_info if returns else None
            if alias is not None:
                continue
            nbytes = tensor.numel() * tensor.element_size()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._release, nbytes)
        return out
