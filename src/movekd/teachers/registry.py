"""Teacher registry: sources are factories ``(spec) -> Teacher`` registered under a name.

Adding a source is one file with one decorated factory (see ``docs/teachers.md``)::

    @register_teacher("my_source")
    def create(spec: TeacherSpec) -> Teacher: ...

``create_teacher`` accepts a :class:`TeacherSpec`, a dict (validated), or the name of a preset
(:mod:`movekd.teachers.presets`), plus field overrides.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Mapping

import torch

from movekd.teachers.base import SpecError, Teacher, TeacherSpec

Factory = Callable[[TeacherSpec], Teacher]
_REGISTRY: dict[str, Factory] = {}


def register_teacher(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering a factory ``(spec) -> Teacher`` for ``spec.source == name``."""

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"teacher source '{name}' is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_teachers() -> list[str]:
    """Names of the registered sources."""
    return sorted(_REGISTRY)


def teacher_factory(source: str) -> Factory:
    if source not in _REGISTRY:
        raise SpecError(f"unknown teacher source '{source}' (registered: {', '.join(list_teachers())})")
    return _REGISTRY[source]


def resolve_spec(spec_or_name: TeacherSpec | Mapping[str, Any] | str, **overrides: Any) -> TeacherSpec:
    """A :class:`TeacherSpec` from a spec, a dict or a preset name, with ``overrides`` applied."""
    if isinstance(spec_or_name, str):
        from movekd.teachers.presets import get_preset

        spec = get_preset(spec_or_name)
    elif isinstance(spec_or_name, TeacherSpec):
        spec = spec_or_name
    elif isinstance(spec_or_name, Mapping):
        spec = TeacherSpec.from_dict(spec_or_name)
    else:
        raise SpecError(f"expected a TeacherSpec, a dict or a preset name, got {type(spec_or_name).__name__}")
    return spec.replace(**overrides) if overrides else spec


def create_teacher(spec_or_name: TeacherSpec | Mapping[str, Any] | str, *,
                   device: str | torch.device | None = None, **overrides: Any) -> Teacher:
    """Build a frozen teacher in eval mode, cast to ``spec.dtype`` and moved to ``device``.

    ``device="meta"`` builds the architecture without allocating memory (``pretrained`` is forced to
    False): shapes, parameter counts and FLOPs can then be checked without weights.
    """
    spec = resolve_spec(spec_or_name, **overrides)
    factory = teacher_factory(spec.source)
    meta = device is not None and torch.device(device).type == "meta"
    if meta:
        spec = spec.replace(pretrained=False)
    with torch.device("meta") if meta else nullcontext():
        teacher = factory(spec)
    if not isinstance(teacher, Teacher):
        raise TypeError(f"factory of source '{spec.source}' returned {type(teacher).__name__}, not a Teacher")
    teacher.freeze()
    teacher.to(dtype=spec.torch_dtype)
    if device is not None and not meta:
        teacher.to(device)
    return teacher
