"""The command line: every subcommand has help; train → eval → chat on a tiny run; clear errors."""

from __future__ import annotations

import json

import pytest

from movekd.cli import SUBCOMMANDS, main
from movekd.inference import load_trained
from movekd.train.config import load_config
from movekd.train.loop import train
from train_fixtures import tiny_config


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: movekd " + command in capsys.readouterr().out


def test_eval_and_chat_on_a_trained_run(tmp_path, capsys):
    config = tiny_config(tmp_path)
    config["stages"][1]["bos"] = "never"  # the last stage's template settings travel with the bundle
    train(load_config(config), show_progress=False)
    run = config["output_dir"]
    assert load_trained(run).bos == "never"
    data = config["stages"][1]["data"]
    predictions = tmp_path / "predictions.jsonl"
    assert main(["eval", run, "--data", data, "--json", "--prior-data", data, "--predictions", str(predictions)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 12 and 0.0 <= result["accuracy"] <= 1.0
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(records) == 12 and "predictions" not in result
    assert sum(r["correct"] for r in records) == result["correct"]
    assert {"id", "type", "prediction", "answer"} <= set(records[0])
    assert set(result["per_type"]) == {"color"} and "prior" in result
    image = tmp_path / "data" / "images" / "red0.png"
    assert main(["chat", run, "--image", str(image), "what color is the shape?"]) == 0
    assert capsys.readouterr().out.strip()


def test_chat_names_a_missing_image_or_bundle(tmp_path, capsys):
    assert main(["chat", str(tmp_path), "--image", "nope.png", "q"]) == 2
    assert "neither a movekd VLM bundle" in capsys.readouterr().err


def test_train_dry_run_prints_the_parameter_table(capsys):
    assert main(["train", "paper_llava15_7b_v1.1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "MoLE adds 24,040,008 parameters" in out and "sam_vit_l_1024" in out
