"""Run an ablation: rows x seeds, each trained and evaluated in its own folder, resumable.

``DIR/rows/ROW/seed-S/result.json`` marks a finished cell (a re-run skips it; an unfinished cell is
trained again from the start, so every row gets the same steps). ``DIR/ablation.json`` and
``DIR/ablation.md`` hold the table: mean ± std over seeds of the VQA accuracy (all and per type)
and, if a probe dataset is given, the trained student's linear-probe and kNN accuracy.
"""

from __future__ import annotations

import json
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
    return out


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(cells: list[dict], rows: list[str]) -> dict:
    table = {}
    for row in rows:
        mine = [c for c in cells if c["row"] == row]
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
                 probe_images: tuple[int, int] = (300, 200), show_progress: bool = False,
                 on_event: Callable[[str], None] | None = None) -> dict:
    """Train and evaluate every (row, seed) not finished yet; returns the summary table."""
    say = on_event or (lambda message: None)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise OptionError(f"unknown ablation row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    out = Path(out)
    cells_todo = [(r, s) for r in rows for s in seeds]
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
            f"{len(remaining)}: {statistics.fmean(known) * len(remaining):.0f} min (mean of the finished cells)")
    else:
        say(f"{len(cells_todo)} cells ({len(rows)} rows x {len(seeds)} seeds); expected time printed after the first")
    for i, (row, seed) in enumerate(remaining):
        folder = out / "rows" / row / f"seed-{seed}"
        say(f"[{i + 1}/{len(remaining)}] {row} seed {seed}: {ROWS[row][0]}")
        cell = _cell(data, row, seed, folder, probe_dataset, probe_images, show_progress)
        atomic_write_text(folder / "result.json", json.dumps(cell, indent=1))
        cells.append(cell)
        known.append(cell["minutes"])
        left = len(remaining) - i - 1
        say(f"  done in {cell['minutes']:.1f} min; expected for the {left} left: {statistics.fmean(known) * left:.0f} min")
    table = summarise(cells, rows)
    atomic_write_text(out / "ablation.json", json.dumps({"rows": table, "cells": cells}, indent=1))
    atomic_write_text(out / "ablation.md", format_markdown(table))
    return table
