"""Fail fast: every stage's data is opened and checked before any model is built.

A wrong path, a file that is not JSON, a missing image folder or data that is mostly broken then costs
seconds, not the minutes of loading a 7B LLM and three teachers first. Bad samples found here are
dropped and counted (``strict`` refuses them), and the summary of each file is logged.
"""

from __future__ import annotations

import logging

from movekd.data import DataScan, check_skip_budget, scan_llava
from movekd.errors import DataError
from movekd.train.build import resolve_path
from movekd.train.config import StageConfig, TrainConfig

log = logging.getLogger(__name__)


def scan_stage(stage: StageConfig) -> DataScan:
    """Scan one stage's data file (structure, image files exist); raise :class:`DataError` when it
    cannot be used at all, is strict and has bad samples, or has more than ``max_skip_ratio`` of them."""
    path = resolve_path(stage.data)
    root = resolve_path(stage.image_root) if stage.image_root else path.parent
    if not path.is_file():
        raise DataError(f"stage '{stage.name}': data file not found: {path}")
    if not root.is_dir():
        raise DataError(f"stage '{stage.name}': image_root is not a folder: {root}")
    scan = scan_llava(path, image_root=root)
    scan.source = f"stage '{stage.name}' data {path}"
    scan.log()
    if stage.strict and scan.problems:
        raise DataError(scan.describe_problems() + "\n(the stage is strict: fix these samples, or drop "
                        "strict to skip and count them)")
    check_skip_budget(scan.by_kind(), source=scan.source, total=scan.total, drawn=0,
                      max_skip_ratio=stage.max_skip_ratio, strict=stage.strict)
    if not scan.samples:
        raise DataError(f"{scan.source}: no usable sample")
    return scan


def scan_stages(config: TrainConfig, first_stage: int = 0) -> dict[int, DataScan]:
    """Scans of the stages from ``first_stage`` on (a resumed run skips the finished ones)."""
    return {i: scan_stage(stage) for i, stage in enumerate(config.stages) if i >= first_stage}
