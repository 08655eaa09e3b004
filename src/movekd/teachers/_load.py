"""Where weights come from: ``asset:NAME`` references, local files and folders, and one clear error
when the hub cannot be reached."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from movekd.teachers.base import TeacherLoadError, TeacherSpec

ASSET_PREFIX = "asset:"
# Weight files looked for inside a checkpoint folder, in order.
WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                "open_clip_pytorch_model.bin")


def resolve_reference(ref: str) -> str:
    """``asset:NAME`` → the asset folder (converted on first use); a local path → expanded path;
    anything else (a hub id) unchanged."""
    if ref.startswith(ASSET_PREFIX):
        name = ref[len(ASSET_PREFIX):]
        try:
            from movekd.assets import ensure
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise TeacherLoadError(f"'{ref}' needs movekd.assets, which is not importable: {exc}") from exc
        try:
            return str(ensure(name))
        except Exception as exc:
            raise TeacherLoadError(f"could not prepare asset '{name}': {exc}") from exc
    path = Path(ref).expanduser()
    return str(path) if path.exists() else ref


def is_local(ref: str) -> bool:
    return Path(ref).exists()


def weights_file(ref: str) -> Path:
    """A weights file from a file path or a folder holding one of :data:`WEIGHT_FILES`."""
    path = Path(resolve_reference(ref))
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.iterdir() if p.suffix in {".safetensors", ".pth", ".pt", ".bin"})
        if len(found) == 1:
            return path / found[0]
        raise TeacherLoadError(f"no single weights file in {path} (looked for {', '.join(WEIGHT_FILES)}; found {found})")
    raise TeacherLoadError(f"checkpoint '{ref}' does not exist")


def _hint(spec: TeacherSpec, what: str, hub_id: str | None) -> str:
    if what == "config":
        return ("set model to a local folder holding config.json, or give the architecture in the spec's "
                "config (a dict of the model's config fields)")
    if spec.source.startswith("hf_"):
        return (f"set model to a local folder holding config.json + model.safetensors (e.g. from "
                f"`huggingface-cli download {spec.model}` or `save_pretrained`); or pass pretrained=False "
                f"for random weights")
    example = f" (e.g. from `huggingface-cli download {hub_id}`)" if hub_id else ""
    return (f"set checkpoint to a local weights file (.safetensors / .pth) or a folder holding one{example}; "
            f"or pass pretrained=False for random weights")


@contextmanager
def loading(spec: TeacherSpec, what: str, hub_id: str | None = None) -> Iterator[None]:
    """Turn the libraries' network / missing-file errors into one :class:`TeacherLoadError`."""
    try:
        yield
    except TeacherLoadError as exc:
        if str(exc).startswith("teacher '"):
            raise
        raise TeacherLoadError(f"teacher '{spec.name}': {exc}") from exc
    except (OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TeacherLoadError(
            f"teacher '{spec.name}': cannot load {what} from '{spec.model}' ({type(exc).__name__}: {first}). "
            f"Offline or without hub access, {_hint(spec, what, hub_id)}."
        ) from exc
