"""Every user error reaches the user as ``movekd: error: ...`` and a non-zero exit, never a traceback;
``--debug`` shows the traceback; a bug keeps its traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from movekd.cli import main
from movekd.train.config import load_config
from movekd.train.loop import train
from tiny_vlm import write_json
from train_fixtures import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny run, its config file, and a few bad inputs next to it."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    config = tiny_config(tmp, steps=(2, 2))
    train(load_config(config), show_progress=False)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    (tmp / "corrupt.png").write_bytes(b"not an image at all")
    good = (tmp / "data" / "images" / "red0.png").read_bytes()
    (tmp / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp / "bad.json").write_text('[{"id": "a", "conversations": []},\n {"id": "b",, }]')
    samples = json.loads((tmp / "data" / "train.json").read_text())
    write_json(tmp / "data" / "one_bad.json", samples + [{"id": "no-conv", "image": "images/red0.png"}])
    write_json(tmp / "data" / "many_bad.json", samples[:4] + [
        {"id": "two-tags", "image": "images/red0.png", "conversations": [
            {"from": "human", "value": "<image> <image> q"}, {"from": "gpt", "value": "a"}]},
        {"id": "order", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        {"id": "gone", "image": "images/nope.png", "conversations": samples[0]["conversations"]}])
    return {"tmp": tmp, "config": str(path), "run": config["output_dir"]}


def _user_error(capsys, argv, *fragments, code=2):
    assert main(argv) == code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1].startswith("movekd: error:") or "movekd: error:" in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def test_train_user_errors(run, capsys):
    tmp, config = run["tmp"], run["config"]
    out_dir = f"output_dir={tmp / 'other'}"
    _user_error(capsys, ["train", str(tmp / "nope.yaml")], "config file not found")
    _user_error(capsys, ["train", config, "--set", "stages.0.lrr=1"], "unknown config key 'stages.0.lrr'")
    _user_error(capsys, ["train", config, "--set", f"stages.0.data={tmp / 'nope.json'}"],
                "stage 'pretrain': data file not found", "nope.json")
    _user_error(capsys, ["train", config, "--set", f"stages.0.data={tmp / 'bad.json'}"],
                "bad.json: invalid JSON at line 2 column 13")
    _user_error(capsys, ["train", config, "--set", f"stages.0.image_root={tmp / 'nothing'}"],
                "image_root is not a folder")
    _user_error(capsys, ["train", config, "--set", f"stages.1.data={tmp / 'data' / 'many_bad.json'}"],
                "3 of 7 samples skipped", "image_tag_mismatch 1", "role_order 1", "missing_image 1", "max_skip_ratio")
    err = _user_error(capsys, ["train", config, "--strict", "--set", f"stages.1.data={tmp / 'data' / 'one_bad.json'}"],
                      "1 invalid sample(s)", "sample 12 (id=no-conv): missing_conversations")
    assert "strict" in err
    _user_error(capsys, ["train", config, "--set", f"model.llm={tmp / 'no-llm'}"], "model.llm: no folder")
    _user_error(capsys, ["train", config, "--resume", str(tmp / "nothing")], "no checkpoint found")
    _user_error(capsys, ["train", config, "--resume", run["run"], "--set", "model.student.mole.rank=8"],
                "does not fit the model of this config", "(4, 32) vs (8, 32)")
    _user_error(capsys, ["train", config, "--set", out_dir, "--set", "model.teachers.0.image_size=64"],
                "CLIP-role teacher 'clip_role' gives tokens (64, 32) but the student gives (16, 32)")


def test_a_few_bad_samples_are_skipped_counted_and_reported(run, capsys):
    tmp, config = run["tmp"], run["config"]
    assert main(["train", config, "--no-progress", "--set", f"output_dir={tmp / 'skips'}",
                 "--set", f"stages.1.data={tmp / 'data' / 'one_bad.json'}", "--set", "stages.1.max_skip_ratio=0.1"]) == 0
    out = capsys.readouterr().out
    assert "stage finetune: 2 steps" in out and "1 samples skipped (missing_conversations 1)" in out
    records = [json.loads(line) for line in (tmp / "skips" / "metrics.jsonl").read_text().splitlines()]
    finetune = [r for r in records if r["stage"] == "finetune"]
    assert all(r["skipped"] == 1 and r["skipped_missing_conversations"] == 1 for r in finetune)


def test_chat_and_eval_user_errors(run, capsys):
    tmp, bundle = run["tmp"], run["run"]
    _user_error(capsys, ["chat", bundle, "--image", str(tmp / "corrupt.png"), "q"],
                "cannot read image", "corrupt.png", "UnidentifiedImageError")
    _user_error(capsys, ["chat", bundle, "--image", str(tmp / "truncated.png"), "q"], "cannot read image", "truncated")
    _user_error(capsys, ["chat", bundle, "--image", str(tmp / "nope.png"), "q"], "image not found")
    _user_error(capsys, ["chat", str(tmp), "--image", str(tmp / "data" / "images" / "red0.png"), "q"],
                "neither a movekd VLM bundle")
    _user_error(capsys, ["eval", bundle, "--data", str(tmp / "bad.json")], "invalid JSON at line 2 column 13")
    _user_error(capsys, ["eval", bundle, "--data", str(tmp / "nope.json")], "data file not found")
    _user_error(capsys, ["demo", "--set", "stages.0.lrr=1", "--out", str(tmp / "demo")], "unknown config key")


def test_tool_commands_report_user_errors_through_the_central_handler(tmp_path, capsys):
    """cache, probe, viz, ablate, teachers, assets: the library raises UserErrors, the CLI prints them once."""
    _user_error(capsys, ["probe", "--dataset", "squares"], "give at least one MODEL")
    _user_error(capsys, ["probe", "no-such-model", "--dataset", "squares"], "unknown encoder 'no-such-model'")
    _user_error(capsys, ["teachers", "no-such-teacher"], "unknown teacher preset 'no-such-teacher'")
    _user_error(capsys, ["assets", "no-such-asset"], "unknown asset(s) no-such-asset")
    _user_error(capsys, ["cache", str(tmp_path / "nope.yaml")], "nope.yaml")
    _user_error(capsys, ["viz", str(tmp_path), "--out", str(tmp_path / "viz")], "not a run folder")
    _user_error(capsys, ["ablate", "demo", "--out", str(tmp_path / "ablate"), "--rows", "full,no-such-row"],
                "unknown ablation row 'no-such-row'")
    assert not (tmp_path / "ablate").exists()
    with pytest.raises(SystemExit):  # argparse: the usage line and the bad value
        main(["ablate", "demo", "--out", str(tmp_path / "ablate"), "--probe-images", "3"])
    assert "expected two positive integers TRAIN,TEST" in capsys.readouterr().err


def test_debug_shows_the_traceback_and_bugs_keep_theirs(run, monkeypatch):
    from movekd.errors import ImageError

    with pytest.raises(ImageError):
        main(["--debug", "chat", run["run"], "--image", str(run["tmp"] / "corrupt.png"), "q"])

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("movekd.cli.chat._run", bug)
    with pytest.raises(ZeroDivisionError):
        main(["chat", run["run"], "--image", "x.png", "q"])


def test_no_traceback_in_a_real_process(run):
    done = subprocess.run([sys.executable, "-m", "movekd", "chat", run["run"], "--image",
                           str(run["tmp"] / "corrupt.png"), "what?"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("movekd: error: cannot read image")


def test_teacher_output_that_does_not_fit_its_adapter_names_both_shapes(run):
    from movekd.adapters import build_adapter
    from movekd.train.build import build_system
    from movekd.train.kd_model import TeacherShapeError

    config = tiny_config(run["tmp"] / "shape", steps=(1, 1))
    system = build_system(load_config(config))
    model = system.model
    old = model.adapters[1]
    model.adapters[1] = build_adapter("resample_mlp", teacher_channels=old.teacher_channels + 1,
                                      teacher_grid=old.teacher_grid, student_dim=32, student_grid=(4, 4))
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    ids = torch.tensor([[5, -200, 7, 8]])
    with pytest.raises(TeacherShapeError, match=rf"teacher 'cnn' gives tokens \(\d+, {old.teacher_channels}\).*"
                       rf"built for \('N', {old.teacher_channels + 1}\)"):
        model(images, ids, torch.ones_like(ids), ids)
