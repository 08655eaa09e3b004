"""Run an ablation: rows x seeds, each trained and evaluated in its own folder, resumable.

``DIR/rows/ROW/seed-S/result.json`` marks a finished cell (a re-run skips it; an unfinished cell is
trained again from the start, so every row gets the same steps). ``DIR/ablation.json`` and
``DIR/ablation.md`` hold the table: mean ± std over seeds of the VQA accuracy (all and per type)
and, if a probe dataset is given, the trained student's linear-probe and kNN accuracy.

Cells run seed by seed (every row of seed 0 first, so a stopped ablation already holds a whole
ladder), ``jobs`` at a time in spawned worker processes, each with ``threads // jobs`` threads: the
demo's small steps are bound by per-op overheads, not FLOPs, so on the 2-core machine two 1-thread
cells finished 40 + 20 demo steps in 125 s side by side where one 2-thread cell took 100 s (1.6x
the throughput).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

from movekd.ablate.ladder import ROWS, row_config
from movekd.atomic import atomic_write_text
from movekd.errors import OptionError


def _cell(data: dict, row: str, seed: int, folder: Path, probe_dataset: str | None, probe_images: tuple[int, int],
          show_progress: bool) -> dict:
    from movekd.inference import load_trained
    from movekd.train.config import load_config
    from movekd.train.evaluate import run_eval
    from movekd.train.loop import train

    start = time.perf_counter()
    config = load_config(row_config(data, row, seed, str(folder / "run")))
    result = train(config, show_progress=show_progress)
    train_minutes = (time.perf_counter() - start) / 60
    out = {"row": row, "seed": seed, "train_minutes": train_minutes,
           "steps": [s.steps for s in result.stages]}
    if config.eval is not None:
        evaluation = run_eval(load_trained(result.final_dir), config.eval)
        out["accuracy"] = evaluation["accuracy"]
        out["per_type"] = {t: v["accuracy"] for t, v in evaluation["per_type"].items()}
    if probe_dataset:
        from movekd.probe import probe

        rows = probe([str(result.final_dir)], probe_dataset, n_train=probe_images[0], n_test=probe_images[1],
                     seed=0)["rows"]
        out["probe_linear"], out["probe_knn"] = rows[0]["linear"], rows[0]["knn"]
    out["minutes"] = (time.perf_counter() - start) / 60
    # The cell is finished (its result is written next): its resume checkpoints are dead weight
    # (~0.5 GB per demo cell); the inference bundle stays for `movekd viz` / `probe`.
    shutil.rmtree(config.run_dir / "checkpoints", ignore_errors=True)
    return out


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _cell_job(data: dict, row: str, seed: int, folder: str, probe_dataset: str | None,
              probe_images: tuple[int, int]) -> dict:
    return _cell(data, row, seed, Path(folder), probe_dataset, probe_images, False)


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(cells: list[dict], rows: list[str]) -> dict:
    table = {}
    for row in rows:
        mine = sorted((c for c in cells if c["row"] == row), key=lambda c: c["seed"])
        if not mine:
            continue
        entry = {"description": ROWS[row][0], "seeds": [c["seed"] for c in mine]}
        for key in ("accuracy", "probe_linear", "probe_knn", "train_minutes"):
            values = [c[key] for c in mine if key in c]
            if values:
                entry[key] = _stats(values)
        types = sorted({t for c in mine for t in c.get("per_type", {})})
        entry["per_type"] = {t: _stats([c["per_type"][t] for c in mine if t in c.get("per_type", {})]) for t in types}
        table[row] = entry
    return table


def format_markdown(table: dict) -> str:
    types = sorted({t for e in table.values() for t in e["per_type"]})
    cols = ["accuracy"] + [f"type:{t}" for t in types] + ["probe_linear", "probe_knn", "train_minutes"]
    lines = ["| row | what | seeds | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for row, e in table.items():
        cells = []
        for col in cols:
            s = e["per_type"].get(col[5:]) if col.startswith("type:") else e.get(col)
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}" if s else "—")
        lines.append(f"| {row} | {e['description']} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_ablation(data: dict, out: str | Path, *, rows: list[str], seeds: list[int], probe_dataset: str | None = None,
                 probe_images: tuple[int, int] = (300, 200), show_progress: bool = False, jobs: int = 1,
                 estimate: bool = False, on_event: Callable[[str], None] | None = None) -> dict:
    """Train and evaluate every (row, seed) not finished yet; returns the summary table.

    ``jobs`` cells run at once (worker processes, the threads split between them); ``estimate``
    times a few training steps first (:func:`movekd.ablate.estimate.estimate_training_minutes`) and
    prints the expected training time before any cell starts."""
    say = on_event or (lambda message: None)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise OptionError(f"unknown ablation row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    if jobs < 1:
        raise OptionError(f"jobs must be at least 1, got {jobs}")
    out = Path(out)
    cells_todo = [(r, s) for s in seeds for r in rows]
    done, cells = [], []
    for row, seed in cells_todo:
        path = out / "rows" / row / f"seed-{seed}" / "result.json"
        if path.is_file():
            cells.append(json.loads(path.read_text()))
            done.append((row, seed))
    remaining = [c for c in cells_todo if c not in done]
    known = [c["minutes"] for c in cells]
    if known:
        say(f"{len(done)} of {len(cells_todo)} cells already done; expected time for the remaining "
            f"{len(remaining)}: {statistics.fmean(known) * len(remaining) / jobs:.0f} min (mean of the finished cells, "
            f"{jobs} at a time)")
    else:
        say(f"{len(cells_todo)} cells ({len(rows)} rows x {len(seeds)} seeds), {jobs} at a time")
    if estimate and remaining:
        from movekd.ablate.estimate import estimate_training_minutes

        import torch

        threads = max(1, torch.get_num_threads() // jobs)
        say(f"timing a few training steps per stage at {threads} thread(s) for the estimate ...")
        minutes = estimate_training_minutes(data, [r for r, _ in remaining], threads=threads)
        say(f"expected training time: {minutes / jobs:.0f} min ({minutes:.0f} min of cells / {jobs} job(s); "
            "evaluation, probes and start-up not counted; refined after each cell)")

    def finished(row: str, seed: int, cell: dict, done_count: int) -> None:
        folder = out / "rows" / row / f"seed-{seed}"
        atomic_write_text(folder / "result.json", json.dumps(cell, indent=1))
        cells.append(cell)
        known.append(cell["minutes"])
        left = len(remaining) - done_count
        say(f"  {row} seed {seed} done in {cell['minutes']:.1f} min (accuracy {cell.get('accuracy', float('nan')):.3f}); "
            f"expected for the {left} left: {statistics.fmean(known) * left / jobs:.0f} min")

    if jobs == 1:
        for i, (row, seed) in enumerate(remaining):
            say(f"[{i + 1}/{len(remaining)}] {row} seed {seed}: {ROWS[row][0]}")
            finished(row, seed, _cell(data, row, seed, out / "rows" / row / f"seed-{seed}", probe_dataset,
                                      probe_images, show_progress), i + 1)
    else:
        _run_parallel(data, out, remaining, probe_dataset, probe_images, jobs, say, finished)
    table = summarise(cells, rows)
    atomic_write_text(out / "ablation.json", json.dumps({"rows": table, "cells": cells}, indent=1))
    atomic_write_text(out / "ablation.md", format_markdown(table))
    return table


def _run_parallel(data, out: Path, remaining, probe_dataset, probe_images, jobs: int, say, finished) -> None:
    """``jobs`` cells at a time in spawned workers; a failed cell stops the queue (finished cells stay)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        pending = {}
        for i, (row, seed) in enumerate(remaining):
            folder = out / "rows" / row / f"seed-{seed}"
            pending[pool.submit(_cell_job, data, row, seed, str(folder), probe_dataset, probe_images)] = (i, row, seed)
        say(f"{len(remaining)} cells queued, {jobs} at a time, {threads} thread(s) each")
        done_count = 0
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i, row, seed = pending.pop(future)
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise error
                done_count += 1
                finished(row, seed, future.result(), done_count)
