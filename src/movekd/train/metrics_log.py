"""Training logs: one JSON line per logged step (``metrics.jsonl``) and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
                except ImportError:  # tensorboard is optional at run time
                    log.warning("tensorboard is not installed: logging to metrics.jsonl only")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.writer is not None:
            step = record.get("global_step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "global_step":
                    self.writer.add_scalar(f"{record.get('stage', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.handle.close()
            if self.writer is not None:
                self.writer.close()


def truncate_metrics(run_dir: Path, global_step: int) -> None:
    """Keep the records up to ``global_step`` (a resumed run logs the later ones again) and drop a
    last line cut short by a kill, so a resumed run's ``metrics.jsonl`` equals an uninterrupted one's."""
    from movekd.atomic import atomic_write_text

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("global_step", 0) <= global_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
