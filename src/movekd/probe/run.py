"""One probe table: several frozen encoders, one dataset, linear-probe and kNN accuracy each."""

from __future__ import annotations

import time
from typing import Callable

from movekd.probe.classifiers import knn_probe, linear_probe
from movekd.probe.datasets import load_probe_dataset
from movekd.probe.encoders import load_encoder, pooled_features


def probe(models: list[str], dataset: str, *, n_train: int | None = 500, n_test: int | None = 250, seed: int = 0,
          k: int = 20, batch_size: int = 32, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """``{"dataset": summary, "rows": [{"model", "kind", "dim", "linear", "knn", "l2", "seconds"}]}``.

    ``progress(model, done, total)`` is called after each feature batch.
    """
    data = load_probe_dataset(dataset, n_train, n_test, seed)
    rows = []
    for name in models:
        start = time.perf_counter()
        encoder = load_encoder(name)
        total = len(data.train_labels) + len(data.test_labels)
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(name, done, total)

        train_x = pooled_features(encoder.module, data.train_images, batch_size, step)
        test_x = pooled_features(encoder.module, data.test_images, batch_size, step)
        linear = linear_probe(train_x, data.train_labels, test_x, data.test_labels)
        knn = knn_probe(train_x, data.train_labels, test_x, data.test_labels, k=k)
        rows.append({"model": name, "kind": encoder.kind, "dim": int(train_x.shape[1]),
                     "linear": linear["accuracy"], "l2": linear["l2"], "knn": knn["accuracy"], "k": knn["k"],
                     "seconds": round(time.perf_counter() - start, 1)})
        del encoder
    return {"dataset": data.summary(), "seed": seed, "rows": rows}


def format_table(result: dict) -> str:
    d = result["dataset"]
    lines = [f"{d['dataset']}: {d['classes']} classes, {d['train']} train / {d['test']} test images, seed {result['seed']}",
             f"{'model':<34} {'kind':<8} {'dim':>5}  {'linear':>6}  {'kNN':>6}  {'time':>6}"]
    for r in result["rows"]:
        lines.append(f"{r['model'][-34:]:<34} {r['kind']:<8} {r['dim']:>5}  {r['linear']:>6.3f}  {r['knn']:>6.3f}  "
                     f"{r['seconds']:>5.0f}s")
    return "\n".join(lines)
