"""Pictures of what a run distilled (``movekd viz RUN IMAGE... --out DIR``).

Per image: the CLIP-role teacher's token weight (Eq. 3) over the image, the student's routed expert
per token per layer, PCA maps of student and teacher features. Over a dataset (``data``): the
teacher-weight distribution (Eq. 4) and expert usage per layer. From ``metrics.jsonl``: the
training curves of every loss term.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from movekd.viz.maps import dataset_stats, image_maps, pca_rgb
from movekd.viz.run import LoadedRun, load_run

__all__ = ["LoadedRun", "dataset_stats", "image_maps", "load_run", "pca_rgb", "visualize"]


def _dataset_images(data: str | Path, image_root: str | Path | None, max_images: int) -> list[Path]:
    """Distinct image paths of a LLaVA-format JSON (first ``max_images`` in file order)."""
    from movekd.data import load_llava_json

    data = Path(data)
    root = Path(image_root) if image_root else data.parent
    seen: dict[str, None] = {}
    for sample in load_llava_json(data):
        if sample.get("image") and sample["image"] not in seen:
            seen[sample["image"]] = None
            if len(seen) >= max_images:
                break
    return [root / rel for rel in seen]


def visualize(run_dir: str | Path, images: list[str | Path], out: str | Path, *, data: str | Path | None = None,
              image_root: str | Path | None = None, max_images: int = 200, batch_size: int = 16,
              progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write the PNGs into ``out``; returns ``{picture name: path}``."""
    from movekd.viz import plots

    out = Path(out)
    say = progress or (lambda message: None)
    say(f"loading {run_dir}")
    run = load_run(run_dir)
    written: dict[str, Path] = {}
    for path in map(Path, images):
        batch = run.load_images([path])
        maps = image_maps(run, batch)[0]
        stem = path.stem
        if maps["token_weight"] is not None:
            written[f"{stem}/token_weight"] = plots.token_weight_figure(
                out / f"{stem}_token_weight.png", batch[0], maps, run.config.kd.token_weight_mode)
        if maps["experts"] is not None:
            written[f"{stem}/experts"] = plots.experts_figure(out / f"{stem}_experts.png", batch[0], maps["experts"],
                                                              run.config.model.student.mole.num_experts)
        written[f"{stem}/pca"] = plots.pca_figure(out / f"{stem}_pca.png", batch[0], maps["pca"])
        say(f"{path}: {len(written)} pictures so far")
    if data is not None:
        paths = _dataset_images(data, image_root, max_images)
        say(f"dataset: {len(paths)} images")
        batches = (run.load_images(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size))
        stats = dataset_stats(run, batches)
        if stats["teacher_weights"] is not None:
            written["teacher_weights"] = plots.teacher_weight_figure(out / "teacher_weights.png",
                                                                     stats["teacher_weights"],
                                                                     [t.name for t in run.teachers])
        if stats["expert_usage"] is not None:
            written["expert_usage"] = plots.expert_usage_figure(out / "expert_usage.png", stats["expert_usage"])
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():
        records = plots.read_metrics(metrics)
        if records:
            written["training_curves"] = plots.curves_figure(out / "training_curves.png", records)
    return written
