"""Training checkpoints: safetensors weights + JSON config and state, written atomically, resumable.

A checkpoint folder holds
- ``model.safetensors``: every trainable-module tensor of the model, teachers excluded (tensors that
  share storage, such as tied LLM embeddings, are stored once; ``aliases`` in the metadata names the
  others). With LoRA on the LLM (``model.llm_lora``) the LLM's own weights, which never train, are
  left out too: they are reloaded from ``model.llm`` on resume; the metadata (``omitted_frozen``)
  lists them with a fingerprint of their bytes, checked before resuming (:func:`load_model_weights`);
- ``optimizer.pt`` / ``scheduler.pt``: their state dicts (tensors, numbers and lists only, so they load
  with ``torch.load(weights_only=True)``);
- ``trainer_state.json``: stage, step, data position, RNG states, and metrics so far;
- ``config.json``: the full training config;
- ``COMPLETE``: written last, after every file is flushed to disk.
It is written into a temporary sibling folder (``.NAME.building.*``) and renamed into place, so a
crash or a SIGKILL mid-write leaves the previous checkpoint intact; :func:`latest_checkpoint` only
considers folders with the ``COMPLETE`` marker and says which half-written ones it passed over.
Weights that are not finite are never written (:class:`NonFiniteWeightsError`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from movekd.atomic import atomic_folder
from movekd.errors import CheckpointError

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
OMITTED = "omitted_frozen"  # weights metadata: frozen tensors left out of the file, reloadable
STATE = "trainer_state.json"
COMPLETE = "COMPLETE"


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


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of names, shapes, dtypes and bytes: equal iff the tensors are the same (to BLAKE2b)."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):
        tensor = tensors[key].detach()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        digest.update(tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def weights_metadata(path: Path) -> dict:
    """The JSON metadata of a weights file written by :func:`save_weights` (aliases, omitted_frozen, ...)."""
    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    return {k: json.loads(v) for k, v in raw.items() if k != "format"}


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


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (usually a full disk); earlier checkpoints are intact."""


class NonFiniteWeightsError(CheckpointError):
    """Refused to write a checkpoint whose weights hold NaN or inf."""


def non_finite_tensors(weights: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in weights.items() if t.is_floating_point() and t.device.type != "meta"
            and not bool(torch.isfinite(t).all())]


def _fsync_folder(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself, so COMPLETE never precedes the data."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, *, weights: dict[str, torch.Tensor], optimizer=None, scheduler=None,
                    trainer_state: dict, config: dict, weights_meta: dict | None = None) -> Path:
    folder = Path(folder)
    bad = non_finite_tensors(weights)
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to write checkpoint {folder}: {len(bad)} weight tensor(s) hold NaN or inf (first: "
            f"{', '.join(bad[:3])}). The run diverged; resume from an earlier checkpoint with a lower learning "
            "rate or precision=fp32")
    try:
        with atomic_folder(folder) as tmp:
            save_weights(tmp / WEIGHTS, weights, weights_meta)
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / STATE).write_text(json.dumps({**trainer_state, "rng": rng_state()}, indent=1))
            (tmp / "config.json").write_text(json.dumps(config, indent=1))
            _fsync_folder(tmp)
            (tmp / COMPLETE).write_text("")
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


def is_complete(folder: Path) -> bool:
    """A checkpoint folder that was fully written: the COMPLETE marker (or, for checkpoints written
    before the marker existed, every file, config.json last) and not a temporary ``.NAME`` folder."""
    folder = Path(folder)
    if folder.name.startswith("."):
        return False
    if (folder / COMPLETE).is_file():
        return True
    return all((folder / name).is_file() for name in (WEIGHTS, STATE, "config.json"))


def _order(folder: Path) -> tuple:
    """Newest first by global step, then stage (a stage's end checkpoint follows its last step's)."""
    state = json.loads((folder / STATE).read_text())
    return state.get("global_step", 0), state.get("stage", 0), folder.name.startswith("stage-")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints under ``run_dir/checkpoints``, oldest first; half-written ones are
    logged and passed over (a run killed mid-write leaves one)."""
    found = []
    for folder in sorted((Path(run_dir) / "checkpoints").glob("*")):
        if not folder.is_dir():
            continue
        if is_complete(folder):
            try:
                found.append((_order(folder), folder))
                continue
            except (OSError, ValueError):
                pass
        log.warning("passing over %s: a half-written checkpoint (the run was stopped while writing it)", folder)
    return [folder for _, folder in sorted(found, key=lambda pair: pair[0])]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir/checkpoints`` (or ``run_dir`` itself)."""
    run_dir = Path(run_dir)
    if (run_dir / STATE).is_file():
        if not is_complete(run_dir):
            raise CheckpointError(f"{run_dir} is a half-written checkpoint; resume from its run folder instead")
        return run_dir
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_model_weights(model: torch.nn.Module, folder: Path, skip_prefixes: tuple[str, ...] = ("teachers.",)) -> None:
    """Load a checkpoint's weights into ``model``; :class:`CheckpointError` listing what does not fit
    (missing or unexpected keys, shapes) when the checkpoint was written for another config."""
    state = load_weights(Path(folder) / WEIGHTS)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip_prefixes)}
    missing = [k for k in own if k not in state]
    omitted = weights_metadata(Path(folder) / WEIGHTS).get(OMITTED)
    if omitted and set(missing) & set(omitted["keys"]):
        # Left out as reloadable (the frozen base LLM under LoRA): the model must hold them unchanged.
        present = {k: own[k] for k in omitted["keys"] if k in own}
        if len(present) != len(omitted["keys"]) or fingerprint(present) != omitted["fingerprint"]:
            raise CheckpointError(
                f"checkpoint {folder} does not store the {len(omitted['keys'])} frozen weights it reloads from "
                f"{omitted.get('source', 'the base model')}, and the ones loaded now differ from those it was "
                "trained with (fingerprint mismatch): resume with the same model.llm (and llm_dtype) as the run")
        missing = [k for k in missing if k not in set(omitted["keys"])]
    unexpected = [k for k in state if k not in own and not k.startswith(skip_prefixes)]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape checkpoint vs model", shapes)) if items]
        raise CheckpointError(f"checkpoint {folder} does not fit the model of this config: " + "; ".join(parts)
                              + ". Resume with the config the checkpoint was written with (its config.json)")
    model.load_state_dict(state, strict=False)


def prune_checkpoints(run_dir: Path, keep: int, protect: Iterable[Path] = ()) -> None:
    """Remove all but the ``keep`` newest checkpoints."""
    if keep <= 0:
        return
    protected = {Path(p).resolve() for p in protect}
    for stale in (Path(run_dir) / "checkpoints").glob(".*.building.*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    found = complete_checkpoints(run_dir)
    for old in found[:-keep]:
        if old.resolve() not in protected:
            shutil.rmtree(old, ignore_errors=True)
