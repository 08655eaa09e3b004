"""easy-vqa on larger canvases (asset ``easyvqa_canvas``), for the ``demo_next`` AnyRes preset.

Each 64 × 64 easy-vqa image is pasted into a canvas of one of several aspect ratios, filled with the
image's own (uniform) background colour, so the picture is the same scene with more empty space.
The canvas sizes are exactly the AnyRes pinpoints of an 84-px student (the demo's): LLaVA-NeXT then
picks the canvas's own grid (no resize, no padding), and the 64-px image lies inside one 84-px tile
cell (random cell, random offset inside it). The tile holding it sees the shape at full resolution;
the overview sees it shrunk (to half or a third on the long side). Same questions, answers and
captions as ``easyvqa``; the canvas of each image is drawn with a fixed seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CELL = 84  # the demo student's input side: one AnyRes tile
# (rows, cols) of tile cells: wide, tall, square, very wide, very tall (LLaVA-NeXT's default grid)
GRIDS = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))
SEED = 0


def place(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` ``[64, 64, 3]`` on a canvas of a random grid, inside a random cell."""
    rows, cols = GRIDS[rng.integers(len(GRIDS))]
    size = image.shape[0]
    canvas = np.empty((rows * CELL, cols * CELL, 3), np.uint8)
    canvas[:] = image[0, 0]  # easy-vqa backgrounds are one colour
    row, col = rng.integers(rows), rng.integers(cols)
    dy, dx = rng.integers(0, CELL - size + 1, size=2)
    top, left = row * CELL + dy, col * CELL + dx
    canvas[top:top + size, left:left + size] = image
    return canvas


def build_easyvqa_canvas(out: Path) -> dict:
    """Write the canvas images and the three JSONs (image paths rewritten) into ``out``."""
    from PIL import Image

    from movekd.assets import ensure

    source = ensure("easyvqa")
    out = Path(out)
    rng = np.random.default_rng(SEED)
    shapes: dict[str, int] = {}
    for split in ("train", "test"):
        folder = out / "images" / split
        folder.mkdir(parents=True)
        for path in sorted((source / "images" / split).glob("*.png"), key=lambda p: int(p.stem)):
            canvas = place(np.asarray(Image.open(path).convert("RGB")), rng)
            Image.fromarray(canvas).save(folder / path.name)
            key = f"{canvas.shape[0]}x{canvas.shape[1]}"
            shapes[key] = shapes.get(key, 0) + 1
    for name in ("train.json", "test.json", "pretrain.json"):  # same samples, same relative image paths
        (out / name).write_text(json.dumps(json.loads((source / name).read_text())))
    return {"source": "easyvqa (MIT) on canvases", "cell": CELL, "canvases": dict(sorted(shapes.items()))}
