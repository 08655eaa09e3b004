"""movekd ablate: a 2-row ladder on tiny configs end to end, resumed without retraining."""

from __future__ import annotations

import json

import pytest

from movekd.ablate import ROWS, row_config
from movekd.train.config import load_config
from train_fixtures import tiny_config


def test_every_row_gives_a_valid_config(tmp_path):
    data = tiny_config(tmp_path)
    for row in ROWS:
        config = load_config(row_config(data, row, seed=1, out_dir=str(tmp_path / row)))
        assert config.seed == 1
    interpolate = load_config(row_config(data, "interpolate", 0, str(tmp_path)))
    assert interpolate.model.adapter == "interpolate" and not interpolate.model.student.mole.enabled
    assert not interpolate.kd.token_weight and not interpolate.kd.teacher_weight
    baseline = load_config(row_config(data, "baseline", 0, str(tmp_path)))
    assert not baseline.kd.enabled and baseline.model.teachers == []
    assert all("student" not in s.train and "mole" not in s.train for s in baseline.stages)
    with pytest.raises(ValueError, match="unknown ablation row 'nope'"):
        row_config(data, "nope", 0, str(tmp_path))


def test_cli_ablate_two_rows_and_resume(tmp_path, capsys, monkeypatch):
    from movekd.cli import main

    cfg = tiny_config(tmp_path, steps=(2, 2))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "ablation"
    args = ["ablate", str(path), "--out", str(out), "--rows", "interpolate,full", "--seeds", "2",
            "--probe", "squares", "--probe-images", "40,20"]
    from movekd.ablate import run_ablation

    events = []

    def on_event(message: str) -> None:
        events.append(message)
        if " done in " in message and sum(" done in " in m for m in events) == 1:
            # the first finished cell is on disk at once (a killed ablation keeps it), while the
            # last cells are still training
            assert len(list(out.glob("rows/*/seed-*/result.json"))) == 1
            assert len(list(out.glob("rows/*/seed-*/run/final"))) < 4

    run_ablation(cfg, out, rows=["interpolate", "full"], seeds=[0, 1], probe_dataset="squares",
                 probe_images=(40, 20), jobs=2, estimate=True, on_event=on_event)  # two worker processes
    assert any(m.startswith("expected training time:") for m in events)
    assert any(m.startswith("4 cells queued, 2 at a time") for m in events)
    assert sum(" done in " in m for m in events) == 4
    table = json.loads((out / "ablation.json").read_text())["rows"]
    assert set(table) == {"interpolate", "full"}
    for entry in table.values():
        assert entry["seeds"] == [0, 1] and 0.0 <= entry["accuracy"]["mean"] <= 1.0
        assert "color" in entry["per_type"] and 0.0 <= entry["probe_knn"]["mean"] <= 1.0
    assert not list(out.glob("rows/*/seed-*/run/checkpoints"))  # finished cells drop their resume state
    assert len(list(out.glob("rows/*/seed-*/run/final"))) == 4
    md = (out / "ablation.md").read_text()
    assert "| interpolate |" in md and "±" in md
    # A re-run trains nothing: every cell is read back.
    import movekd.ablate.run as run_module

    monkeypatch.setattr(run_module, "_cell", lambda *a, **k: pytest.fail("cell retrained"))
    capsys.readouterr()
    assert main(args + ["--jobs", "2"]) == 0
    assert "4 of 4 cells already done" in capsys.readouterr().err


def test_estimate_charges_rows_without_teachers_the_no_kd_step(tmp_path, monkeypatch):
    from movekd.ablate.estimate import estimate_training_minutes

    data = tiny_config(tmp_path, steps=(3, 2))
    calls = []

    def fake_bench(config, **kwargs):
        calls.append(kwargs["threads"])
        step = {"no_kd": 1.0, "online": 3.0, "cached": 2.0}
        return {"stages": {s.name: {"modes": {m: {"seconds": {"step": v}} for m, v in step.items()}}
                           for s in config.stages}}

    monkeypatch.setattr("movekd.bench.train_step.run_train_bench", fake_bench)
    # full: (3 + 2) online steps of 3 s; baseline: (3 + 2) no-KD steps of 1 s
    assert estimate_training_minutes(data, ["full", "baseline"], threads=1) == pytest.approx((15 + 5) / 60)
    cached = {**data, "teacher_cache_dir": str(tmp_path / "cache")}
    assert estimate_training_minutes(cached, ["full"], threads=1) == pytest.approx(10 / 60)
    assert calls == [1, 1]
    unbounded = json.loads(json.dumps(data))
    unbounded["stages"][0].pop("max_steps")
    with pytest.raises(ValueError, match="needs max_steps on every stage"):
        estimate_training_minutes(unbounded, ["full"], threads=1)
