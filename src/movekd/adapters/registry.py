"""Registry of encoder adapters: name -> class, and one factory (timm style)."""

from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

ADAPTERS: dict[str, type[nn.Module]] = {}
_T = TypeVar("_T", bound=type[nn.Module])


def register_adapter(name: str) -> Callable[[_T], _T]:
    """Class decorator adding an adapter to ``ADAPTERS`` under ``name``."""

    def add(cls: _T) -> _T:
        if name in ADAPTERS:
            raise ValueError(f"adapter {name!r} is already registered ({ADAPTERS[name].__name__})")
        ADAPTERS[name] = cls
        return cls

    return add


def build_adapter(
    name: str,
    teacher_channels: int,
    teacher_grid: tuple[int, int],
    student_dim: int,
    student_grid: tuple[int, int],
    **kwargs,
) -> nn.Module:
    """Build the adapter ``name`` mapping teacher tokens ``[B, h_t*w_t, C_t]`` (row-major over the
    teacher grid) to student-shaped tokens ``[B, h*w, D]``.

    Every adapter's ``forward(tokens, teacher_grid=None, student_grid=None)`` takes the grids too, so
    callers need not know which adapters are resolution-agnostic.
    """
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; available: {sorted(ADAPTERS)}")
    return ADAPTERS[name](teacher_channels, tuple(teacher_grid), student_dim, tuple(student_grid), **kwargs)
