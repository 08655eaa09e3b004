"""The demo's --compare baseline: the LLaVA-1.5 recipe of the same preset, in its own run folder."""

from __future__ import annotations

from movekd.demo import baseline_config
from movekd.train.config import load_config


def test_baseline_is_llava15_recipe_in_its_own_run_folder(tmp_path):
    config = load_config("demo", [f"output_dir={tmp_path / 'movekd'}"])
    baseline = baseline_config(config)
    # Sharing the folder would let the baseline overwrite the MoVE-KD bundle and checkpoints.
    assert baseline.run_dir != config.run_dir and baseline.run_dir.parent == config.run_dir.parent
    assert not baseline.kd.enabled and not baseline.model.student.mole.enabled and not baseline.model.teachers
    for stage, original in zip(baseline.stages, config.stages):
        assert set(stage.train) == set(original.train) & {"projector", "llm"}
        assert set(stage.lrs) <= set(stage.train)
        assert (stage.max_steps, stage.batch_size, stage.data) == (original.max_steps, original.batch_size, original.data)


def test_baseline_of_a_name_templated_folder_differs_by_name():
    config = load_config("demo")
    assert "{name}" in config.output_dir
    assert baseline_config(config).run_dir != config.run_dir


def test_demo_table_shows_the_student_probe_row():
    from movekd.demo import format_results

    run = {"accuracy": 0.5, "per_type": {"color": 0.5}, "stages": []}
    text = format_results({"movekd": run, "baseline": run, "per_type": {"color": 0.5}, "n_test": 2, "minutes": 1.0,
                           "probe": {"dataset": "easyvqa-colour", "MoVE-KD": {"linear": 0.91, "knn": 0.72},
                                     "baseline": {"linear": 0.88, "knn": 0.70}}})
    assert "MoVE-KD        linear 0.910  kNN 0.720" in text and "baseline       linear 0.880" in text


def test_demo_next_canvases_put_the_picture_inside_one_tile():
    import numpy as np

    from movekd.assets.easyvqa_canvas import CELL, GRIDS, place
    from movekd.data.anyres import default_pinpoints, select_best_resolution

    config = load_config("demo_next")
    assert config.stages[-1].image_aspect_ratio == "anyres" and config.eval.data.startswith("asset:easyvqa_canvas/")
    pinpoints = config.model.grid_pinpoints
    assert pinpoints == default_pinpoints(CELL)
    rng = np.random.default_rng(0)
    picture = np.full((64, 64, 3), 240, np.uint8)
    picture[20:40, 10:50] = (200, 30, 30)
    seen = set()
    for _ in range(60):
        canvas = place(picture, rng)
        height, width = canvas.shape[:2]
        seen.add((height // CELL, width // CELL))
        # the canvas is its own pinpoint: tiled without resize or padding
        assert select_best_resolution((height, width), pinpoints) == (height, width)
        red = np.argwhere((canvas == (200, 30, 30)).all(-1))
        cells = {(int(y) // CELL, int(x) // CELL) for y, x in red}
        assert len(red) == 20 * 40 and len(cells) == 1  # the shape lies inside one tile
    assert seen == set(GRIDS)


def test_demo_reads_the_data_assets_of_its_preset():
    from movekd.demo import _data_assets

    assert _data_assets(load_config("demo")) == ["easyvqa"]
    assert _data_assets(load_config("demo_next")) == ["easyvqa", "easyvqa_canvas"]
