"""The expected training time of an ablation, from a few steps timed before any cell starts.

The most expensive row (``full``: every teacher, MoLE) is timed per stage with
:func:`movekd.bench.train_step.run_train_bench` at the thread count each cell will get; a row
without teachers is charged the no-KD step, the others the online step (the cached one when the
config reads a teacher cache from disk). Rows without MoLE or with a frozen encoder are a little
cheaper than charged: the estimate leans high.
"""

from __future__ import annotations

import tempfile

from movekd.ablate.ladder import row_config
from movekd.errors import OptionError


def _mode(config, stage) -> str:
    if not (config.kd.enabled and stage.kd and config.model.teachers):
        return "no_kd"
    return "cached" if config.teacher_cache_dir else "online"


def estimate_training_minutes(data: dict, cells_rows: list[str], *, threads: int, steps: int = 2,
                              warmup: int = 1) -> float:
    """Minutes of training for one cell of each entry of ``cells_rows`` (a row name per cell), summed."""
    import torch

    from movekd.bench.train_step import run_train_bench
    from movekd.train.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        configs = {row: load_config(row_config(data, row, 0, tmp)) for row in {*cells_rows, "full"}}
    unbounded = [s.name for s in configs["full"].stages if not s.max_steps]
    if unbounded:
        raise OptionError(f"the time estimate needs max_steps on every stage (stage '{unbounded[0]}' has none); "
                          "pass --no-estimate")
    before = torch.get_num_threads()
    try:
        bench = run_train_bench(configs["full"], steps=steps, warmup=warmup, threads=threads)
    finally:
        torch.set_num_threads(before)
    seconds = 0.0
    for row in cells_rows:
        config = configs[row]
        for stage in config.stages:
            modes = bench["stages"][stage.name]["modes"]
            seconds += stage.max_steps * modes[_mode(config, stage)]["seconds"]["step"]
    return seconds / 60
