"""Teacher-feature cache on disk: the frozen teachers run once (``movekd cache CONFIG``), training
reads what the KD loss needs from fp16 safetensors shards (``teacher_cache_dir`` in the config).

Stored per image: every teacher's tokens ``[N_k, C_k]``; for the CLIP-role teacher 0 also its CLS
``[C_0]`` and the token weight (Eq. 3, ``[N_0]``, in the config's ``kd.token_weight_mode``), instead
of the attention map. Layout::

    manifest.json           format, fingerprint (teacher specs, token-weight settings, decode size and
                            fill colour), grids, images {key: [shard, row, file size]}, the image-list
                            checksum, shards [{file, sha256, images}], bytes per image per teacher
    shard-00000.safetensors t{k}.tokens [n, N_k, C_k] fp16, t0.cls [n, C_0], t0.token_weight [n, N_0];
                            metadata "keys": the n image keys in row order

Keys are the trainer's image keys (the JSON's image path, plus ``|square`` / ``|pad``): the same
file cropped or padded is a different teacher input. Safety:

- a cache whose fingerprint differs from the config's is refused, naming the first differing field;
- per stage, the stage's images must be all in the cache (same file sizes) or none (then they are
  computed online, in memory); anything in between means the cache was written for other images;
- each shard's sha256 is checked when it is first read; a mismatch is refused as corrupt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from movekd.errors import UserError
from movekd.train.teacher_cache import CachedTeacher, TeacherCache

FORMAT = "movekd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class TeacherCacheError(UserError, ValueError):
    """The on-disk teacher cache does not fit this config or is corrupt; the message says why."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_settings(config) -> dict:
    """Decode size and fill colour of the training data path (as ``build_system`` derives them)."""
    from movekd.data import fill_colour

    student = config.model.student.spec
    size = config.image_size or max([student.image_size] + [t.image_size for t in config.model.teachers])
    return {"image_size": int(size), "fill": list(fill_colour(student.mean))}


def fingerprint(config) -> dict:
    """Everything that changes a cached value (teacher specs, Eq. 3 settings, decoding)."""
    return {"teachers": [spec.to_dict() for spec in config.model.teachers],
            "token_weight": bool(config.kd.token_weight), "token_weight_mode": config.kd.token_weight_mode,
            **decode_settings(config)}


def stage_images(config, stage) -> list[tuple[str, Path]]:
    """Distinct ``(image key, path)`` of a stage, in file order (keys as ``StageDataset.image_key``)."""
    from movekd.data import load_llava_json
    from movekd.train.build import resolve_path

    path = resolve_path(stage.data)
    root = resolve_path(stage.image_root) if stage.image_root else path.parent
    seen: dict[str, Path] = {}
    for sample in load_llava_json(path):
        if sample.get("image"):
            key = sample["image"] if stage.image_aspect_ratio == "stretch" else f"{sample['image']}|{stage.image_aspect_ratio}"
            seen.setdefault(key, root / sample["image"])
    return list(seen.items())


def _image_list_checksum(entries: dict[str, int]) -> str:
    return hashlib.sha256("\n".join(f"{k}\t{v}" for k, v in sorted(entries.items())).encode()).hexdigest()


def write_teacher_cache(config, out: str | Path, *, stages: list[int] | None = None, shard_size: int = 1024,
                        batch_size: int = 16, progress: Callable[[int, int], None] | None = None) -> dict:
    """Run the config's teachers over the images of ``stages`` (default: every stage with KD) and write
    the cache folder ``out`` atomically. Returns the manifest."""
    from safetensors.torch import save_file

    from movekd.atomic import atomic_folder
    from movekd.data.llava_json import read_image
    from movekd.functional import token_weight
    from movekd.teachers import create_teacher

    if not config.model.teachers:
        raise TeacherCacheError("the config has no teachers: nothing to cache")
    random = [spec.name for spec in config.model.teachers if not spec.pretrained]
    if random:
        raise TeacherCacheError(f"teacher '{random[0]}' has random weights (pretrained: false): they differ in "
                                "every process, so cached features would not match training's teachers")
    chosen = stages if stages is not None else [i for i, s in enumerate(config.stages) if s.kd]
    for i in chosen:
        if not 0 <= i < len(config.stages):
            raise TeacherCacheError(f"--stage {i}: the config has stages 0..{len(config.stages) - 1}")
    anyres = [config.stages[i].name for i in chosen if config.stages[i].image_aspect_ratio == "anyres"]
    if anyres:
        raise TeacherCacheError(f"stage {anyres[0]} tiles images (image_aspect_ratio: anyres): the disk cache does not "
                                "hold AnyRes crops; cache the other stages (--stage) and let training cache the "
                                "crops in the run (teacher_cache: true)")
    images: dict[str, tuple[Path, str]] = {}
    for i in chosen:
        for key, path in stage_images(config, config.stages[i]):
            images.setdefault(key, (path, config.stages[i].image_aspect_ratio))
    decode = decode_settings(config)
    teachers = [create_teacher(spec) for spec in config.model.teachers]
    keys = list(images)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fingerprint(config),
                "grids": {}, "images": {}, "shards": [], "bytes_per_image": {}}
    out = Path(out)
    with atomic_folder(out) as tmp:
        for shard_index, start in enumerate(range(0, len(keys), shard_size)):
            shard_keys = keys[start:start + shard_size]
            columns: dict[str, list[torch.Tensor]] = {}
            for b in range(0, len(shard_keys), batch_size):
                batch_keys = shard_keys[b:b + batch_size]
                batch = torch.stack([read_image(images[k][0], decode["image_size"], images[k][1], tuple(decode["fill"]))
                                     for k in batch_keys])
                for k, teacher in enumerate(teachers):
                    out_k = teacher(batch)
                    manifest["grids"][str(k)] = list(out_k.grid)
                    columns.setdefault(f"t{k}.tokens", []).append(out_k.tokens.half().cpu())
                    if k == 0 and out_k.cls is not None:
                        columns.setdefault("t0.cls", []).append(out_k.cls.half().cpu())
                    if k == 0 and out_k.attn is not None and config.kd.token_weight:
                        # float32: the official near-uniform weights (~1/N) need more than fp16's digits
                        weight = token_weight(out_k.attn, mode=config.kd.token_weight_mode)
                        columns.setdefault("t0.token_weight", []).append(weight.float().cpu())
                if progress:
                    progress(start + b + len(batch_keys), len(keys))
            tensors = {name: torch.cat(parts).contiguous() for name, parts in columns.items()}
            name = f"shard-{shard_index:05d}.safetensors"
            save_file(tensors, str(tmp / name), metadata={"keys": json.dumps(shard_keys)})
            manifest["shards"].append({"file": name, "sha256": _sha256(tmp / name), "images": len(shard_keys)})
            for row, key in enumerate(shard_keys):
                manifest["images"][key] = [shard_index, row, images[key][0].stat().st_size]
            if shard_index == 0:
                for k in range(len(teachers)):
                    per = [t for n, t in tensors.items() if n.startswith(f"t{k}.")]
                    manifest["bytes_per_image"][teachers[k].name] = sum(
                        t[0].numel() * t.element_size() for t in per)
        manifest["image_list_sha256"] = _image_list_checksum({k: v[2] for k, v in manifest["images"].items()})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise TeacherCacheError(f"{folder}: no {MANIFEST}; write the cache with `movekd cache CONFIG`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise TeacherCacheError(f"{folder}: not a movekd teacher cache of format version {FORMAT_VERSION}")
    return manifest


class DiskTeacherCache(TeacherCache):
    """The in-run cache, served from a cache folder first (images it holds), memory otherwise."""

    def __init__(self, folder: str | Path, config, max_items: int = 50_000):
        super().__init__(max_items)
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self._check_fingerprint(fingerprint(config))
        self._check_images(config)
        self.index = self.manifest["images"]
        self.grids.update({int(k): tuple(g) for k, g in self.manifest["grids"].items()})
        # Shards are memory-mapped (safetensors safe_open), each hashed once when first opened: training
        # samples images at random, so rows come from every shard in turn. Loading one whole shard at a
        # time (as before) re-read and re-hashed ~130 MB per batch on the demo: stage 1 took 2.4x longer
        # than running the teachers online.
        self._shards: dict[int, object] = {}
        self.disk_hits = 0

    def _check_fingerprint(self, expected: dict) -> None:
        cached = self.manifest["fingerprint"]
        for key in expected:
            if cached.get(key) != expected[key]:
                detail = ""
                if key == "teachers" and len(cached.get(key) or []) == len(expected[key]):
                    for k, (a, b) in enumerate(zip(cached[key], expected[key])):
                        diff = [f for f in b if a.get(f) != b[f]]
                        if diff:
                            detail = f" (teacher {k} '{b['name']}': {diff[0]} {a.get(diff[0])!r} in the cache, " \
                                     f"{b[diff[0]]!r} in the config)"
                            break
                else:
                    detail = f" ({cached.get(key)!r} in the cache, {expected[key]!r} in the config)"
                raise TeacherCacheError(f"teacher cache {self.folder} was written with other settings: "
                                        f"'{key}' differs{detail}; rewrite it with `movekd cache CONFIG`")

    def _check_images(self, config) -> None:
        images = self.manifest["images"]
        for i, stage in enumerate(config.stages):
            if not stage.kd:
                continue
            entries = stage_images(config, stage)
            held = [(key, path) for key, path in entries if key in images]
            if not held:
                continue
            if len(held) != len(entries):
                raise TeacherCacheError(
                    f"teacher cache {self.folder} holds {len(held)} of the {len(entries)} images of stage {i} "
                    f"('{stage.name}'): it was written for other images; rewrite it with `movekd cache CONFIG`")
            for key, path in held:
                if path.stat().st_size != images[key][2]:
                    raise TeacherCacheError(f"teacher cache {self.folder}: image {path} changed since the cache "
                                            f"was written (size {path.stat().st_size}, cached {images[key][2]})")

    def _shard(self, index: int):
        if index not in self._shards:
            from safetensors import safe_open

            entry = self.manifest["shards"][index]
            path = self.folder / entry["file"]
            if not path.is_file() or _sha256(path) != entry["sha256"]:
                raise TeacherCacheError(f"teacher cache shard {path} is missing or corrupt (sha256 differs from "
                                        "the manifest); rewrite the cache with `movekd cache CONFIG`")
            self._shards[index] = safe_open(str(path), framework="pt")
        return self._shards[index]

    def get(self, teacher: int, key: str) -> CachedTeacher | None:
        where = self.index.get(key)
        if where is None:
            return super().get(teacher, key)
        shard, row = self._shard(where[0]), where[1]
        self.disk_hits += 1
        names = set(shard.keys())
        pick = lambda name: shard.get_slice(name)[row:row + 1][0].float() if name in names else None  # noqa: E731
        return CachedTeacher(pick(f"t{teacher}.tokens"), pick(f"t{teacher}.cls") if teacher == 0 else None,
                             pick("t0.token_weight") if teacher == 0 else None)


def open_teacher_cache(config) -> TeacherCache | None:
    """The run's teacher cache: on disk (``teacher_cache_dir``), in memory (``teacher_cache``), or none."""
    if config.teacher_cache_dir:
        return DiskTeacherCache(config.teacher_cache_dir, config)
    return TeacherCache() if config.teacher_cache else None
