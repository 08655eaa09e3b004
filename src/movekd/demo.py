"""``movekd demo``: the embedded default end to end, offline, on a CPU.

Prepares the assets, trains both stages of the ``demo`` preset with MoVE-KD, evaluates the student-only
VLM on a fixed held-out easy-vqa subset, and writes ``OUT/results.json``. With ``compare=True`` it also
trains the same recipe without KD and MoLE and with the encoder frozen (the LLaVA-1.5 recipe) and
reports that accuracy as ``baseline_accuracy``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Callable

from movekd.atomic import atomic_write_text
from movekd.train.config import TrainConfig, config_dict, load_config

log = logging.getLogger(__name__)


def baseline_config(config: TrainConfig) -> TrainConfig:
    """The same recipe with KD and MoLE off and the vision encoder frozen (LLaVA-1.5)."""
    data = copy.deepcopy(config_dict(config))
    data["name"] = f"{config.name}-baseline"
    if "{name}" not in data["output_dir"]:  # its own run folder: never the MoVE-KD run's checkpoints or bundle
        data["output_dir"] = data["output_dir"].rstrip("/") + "-baseline"
    data["kd"]["enabled"] = False
    data["model"]["student"]["mole"]["enabled"] = False
    data["model"]["teachers"] = []
    for stage in data["stages"]:
        stage["train"] = [g for g in stage["train"] if g in ("projector", "llm")]
        stage["lrs"] = {k: v for k, v in stage["lrs"].items() if k in stage["train"]}
        stage["kd"] = False
    return load_config(data)


def _run(config: TrainConfig, show_progress: bool, on_log) -> dict:
    from movekd.inference import load_trained
    from movekd.train.evaluate import run_eval
    from movekd.train.loop import train

    start = time.perf_counter()
    result = train(config, show_progress=show_progress, on_log=on_log)
    train_seconds = time.perf_counter() - start
    loaded = load_trained(result.final_dir)
    evaluation = run_eval(loaded, config.eval)
    return {
        "accuracy": evaluation["accuracy"],
        "per_type": {t: v["accuracy"] for t, v in evaluation["per_type"].items()},
        "n_test": evaluation["n"],
        "skipped": evaluation["skipped"],
        "prior": evaluation.get("prior"),
        "stages": [
            {"name": s.name, "steps": s.steps, "seconds": s.seconds, "loss_start": s.first.get("loss"),
             "loss_end": s.last.get("loss"), "kd_start": s.first.get("kd"), "kd_end": s.last.get("kd"),
             "text_start": s.first.get("text"), "text_end": s.last.get("text"), "stopped_early": s.stopped_early}
            for s in result.stages
        ],
        "train_minutes": train_seconds / 60,
        "minutes": (time.perf_counter() - start) / 60,
        "run_dir": str(result.run_dir),
    }


PRESETS = ("demo", "demo_next")  # the LLaVA-1.5-style demo, and its AnyRes (LLaVA-NeXT) variant


def _data_assets(config: TrainConfig) -> list[str]:
    """The ``asset:NAME/...`` data a config reads (stages, evaluation), in order."""
    refs = [s.data for s in config.stages] + ([config.eval.data] if config.eval else [])
    names = [ref[len("asset:"):].split("/")[0] for ref in refs if ref.startswith("asset:")]
    return list(dict.fromkeys(names))


def run_demo(out: str | Path = "runs/demo", *, compare: bool = False, overrides: list[str] | None = None,
             show_progress: bool = True, on_log: Callable[[dict], None] | None = None,
             preset: str = "demo") -> dict:
    """Run the demo (``preset``: ``demo`` or ``demo_next``); returns (and writes to
    ``out/results.json``) the figures."""
    from movekd.assets import prepare_all

    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; expected one of {', '.join(PRESETS)}")
    start = time.perf_counter()
    out = Path(out)
    config = load_config(preset, [f"output_dir={out / 'movekd'}", *(overrides or [])])  # bad overrides fail first
    models = ["smollm2", "dinov2_s14", "efficientnet_lite0", "efficientnet_lite2"]
    assets = prepare_all(models + [name for name in _data_assets(config) if name not in models])
    movekd = _run(config, show_progress, on_log)
    baseline = _run(baseline_config(config), show_progress, on_log) if compare else None
    results = {
        **{k: movekd[k] for k in ("accuracy", "per_type", "n_test", "prior")},
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "baseline_accuracy": baseline["accuracy"] if baseline else None,
        "baseline": baseline,
        "movekd": movekd,
        "assets_seconds": round(sum(a.seconds for a in assets), 2),
        "config": config_dict(config),
    }
    if baseline:
        results["probe"] = probe_students(movekd["run_dir"], baseline["run_dir"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    return results


def probe_students(movekd_run: str | Path, baseline_run: str | Path, dataset: str = "easyvqa-colour") -> dict:
    """Linear / kNN probe of the MoVE-KD student and the baseline's (frozen: the student before
    distillation) on easy-vqa colours: did the student gain what the teachers know?"""
    from movekd.probe import probe

    result = probe([str(movekd_run), str(baseline_run)], dataset, n_train=500, n_test=250, seed=0)
    names = ("MoVE-KD", "baseline")
    return {"dataset": dataset, **{name: {"linear": row["linear"], "knn": row["knn"]}
                                   for name, row in zip(names, result["rows"])}}


def format_results(results: dict) -> str:
    """The demo's summary table."""
    lines = []
    runs = [("MoVE-KD", results["movekd"])] + ([("baseline", results["baseline"])] if results.get("baseline") else [])
    lines.append(f"{'run':<9} {'stage':<9} {'steps':>5} {'loss start→end':>16} {'KD start→end':>16} {'min':>5}")
    for name, run in runs:
        for s in run["stages"]:
            kd = f"{s['kd_start']:.3f}→{s['kd_end']:.3f}" if s.get("kd_start") is not None else "-"
            lines.append(f"{name:<9} {s['name']:<9} {s['steps']:>5} {s['loss_start']:>7.3f}→{s['loss_end']:<8.3f}"
                         f" {kd:>16} {s['seconds'] / 60:>5.1f}")
    types = sorted(results["per_type"])
    lines.append("")
    lines.append(f"{'accuracy':<14} {'all':>6} " + " ".join(f"{t:>7}" for t in types) + f"   (n={results['n_test']})")
    for name, run in runs:
        lines.append(f"{name:<14} {run['accuracy']:>6.3f} " + " ".join(f"{run['per_type'].get(t, 0):>7.3f}" for t in types))
    prior = results.get("prior")
    if prior:
        lines.append(f"{'answer prior':<14} {prior['accuracy']:>6.3f} "
                     + " ".join(f"{prior['per_type'].get(t, 0):>7.3f}" for t in types))
    probe = results.get("probe")
    if probe:
        lines.append("")
        lines.append(f"student probe on {probe['dataset']} (frozen features; baseline = before distillation)")
        for name in ("MoVE-KD", "baseline"):
            lines.append(f"{name:<14} linear {probe[name]['linear']:.3f}  kNN {probe[name]['knn']:.3f}")
    lines.append(f"total minutes: {results['minutes']:.1f}")
    return "\n".join(lines)
