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
