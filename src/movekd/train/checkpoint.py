"""Training checkpoints: safetensors weights + JSON config and state, written atomically, resumable.

A checkpoint folder holds
- ``model.safetensors``: every trainable-module tensor of the model, teachers excluded (tensors that
  share storage, such as tied LLM embeddings, are stored once; ``aliases`` in the metadata names the
  others);
- ``optimizer.pt`` / ``scheduler.pt``: their state dicts (tensors, numbers and lists only, so they load
  with ``torch.load(weights_only=True)``);
- ``trainer_state.json``: stage, step, data position, RNG states, and metrics so far;
- ``config.json``: the full training config.
It is written into a temporary sibling folder and renamed into place, so a crash mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from movekd.atomic import atomic_folder

WEIGHTS = "model.safetensors"
STATE = "trainer_state.json"


def dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one key per storage; return (tensors, alias → kept key)."""
    kept: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if ident in kept and tensor.device.type != "meta":
            aliases[key] = kept[ident]
            continue
        kept[ident] = key
        tensors[key] = tensor.detach().contiguous().cpu()
    return tensors, aliases


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors, aliases = dedupe_shared(state)
    meta = {"format": "pt", "aliases": json.dumps(aliases)}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    save_file(tensors, str(path), metadata=meta)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, aliases restored (sharing the same tensor)."""
    with safe_open(str(path), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    for alias, key in aliases.items():
        state[alias] = state[key]
    return state


def rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "python": repr(random.getstate()),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (usually a full disk); earlier checkpoints are intact."""


def save_checkpoint(folder: Path, *, weights: dict[str, torch.Tensor], optimizer=None, scheduler=None,
                    trainer_state: dict, config: dict) -> Path:
    folder = Path(folder)
    try:
        with atomic_folder(folder) as tmp:
            save_weights(tmp / WEIGHTS, weights)
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / STATE).write_text(json.dumps({**trainer_state, "rng": rng_state()}, indent=1))
            (tmp / "config.json").write_text(json.dumps(config, indent=1))
    except (OSError, RuntimeError) as err:
        # A full disk surfaces from torch.save as an opaque "unexpected pos ..." RuntimeError.
        free = shutil.disk_usage(folder.parent).free / 1e9 if folder.parent.exists() else float("nan")
        raise CheckpointWriteError(
            f"could not write checkpoint {folder} ({free:.1f} GB free on its disk; the optimizer state "
            f"alone is about 8 bytes per trainable parameter): {err}. Earlier checkpoints are intact; "
            f"free space and continue with --resume.") from err
    return folder


def load_trainer_state(folder: Path) -> dict:
    path = Path(folder) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a movekd checkpoint (no {STATE})")
    return json.loads(path.read_text())


def load_torch_state(path: Path):
    """Optimizer/scheduler state: plain tensors and numbers only (weights_only=True)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir/checkpoints`` (or ``run_dir`` itself)."""
    run_dir = Path(run_dir)
    if (run_dir / STATE).is_file():
        return run_dir
    found = [p for p in (run_dir / "checkpoints").glob("*") if (p / STATE).is_file()]
    if not found:
        return None
    return max(found, key=lambda p: json.loads((p / STATE).read_text()).get("global_step", 0))


def prune_checkpoints(run_dir: Path, keep: int, protect: Iterable[Path] = ()) -> None:
    """Remove all but the ``keep`` newest checkpoints."""
    if keep <= 0:
        return
    protected = {Path(p).resolve() for p in protect}
    found = sorted((p for p in (Path(run_dir) / "checkpoints").glob("*") if (p / STATE).is_file()),
                   key=lambda p: json.loads((p / STATE).read_text()).get("global_step", 0))
    for old in found[:-keep]:
        if old.resolve() not in protected:
            shutil.rmtree(old, ignore_errors=True)
