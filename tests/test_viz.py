"""movekd viz on a tiny trained run: every picture is written, non-empty, at its fixed size."""

from __future__ import annotations

import torch
from PIL import Image

from movekd.viz import pca_rgb
from movekd.viz import plots


def test_pca_rgb_separates_two_token_groups():
    tokens = torch.zeros(16, 8)
    tokens[:8, 0] = 5.0  # top half differs from the bottom half along one direction
    tokens += 0.01 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    rgb = pca_rgb(tokens, (4, 4))
    assert rgb.shape == (4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[..., 0]
    assert (first[:2].mean() - first[2:].mean()).abs() > 0.9  # first component = the split


def test_cli_viz_writes_every_picture(tmp_path, capsys):
    from movekd.cli import main
    from movekd.train.config import load_config
    from movekd.train.loop import train
    from train_fixtures import tiny_config

    config = load_config(tiny_config(tmp_path, steps=(2, 2)))
    train(config, show_progress=False)
    images = sorted((tmp_path / "data" / "images").glob("*.png"))[:2]
    out = tmp_path / "viz"
    assert main(["viz", str(config.run_dir), *map(str, images), "--out", str(out),
                 "--data", str(tmp_path / "data" / "train.json")]) == 0
    names = {p.name for p in out.glob("*.png")}
    stem = images[0].stem
    assert {f"{stem}_token_weight.png", f"{stem}_experts.png", f"{stem}_pca.png", "teacher_weights.png",
            "expert_usage.png", "training_curves.png"} <= names
    width = round((3 * plots.PANEL + 0.6) * plots.DPI)
    with Image.open(out / f"{stem}_token_weight.png") as im:
        assert im.size == (width, round(plots.PANEL * plots.DPI))
        assert len(im.convert("L").getcolors(maxcolors=65536)) > 10  # not blank
    with Image.open(out / f"{stem}_pca.png") as im:  # image + student + two teachers
        assert im.size == (round(4 * plots.PANEL * plots.DPI), round((plots.PANEL + 0.3) * plots.DPI))
    for path in out.glob("*.png"):
        assert path.stat().st_size > 5000
    assert main(["viz", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "not a run folder" in capsys.readouterr().err
