"""Evaluation harnesses: lmms-eval's ``llava_hf`` model class loads a merged export and answers one
local image + question like movekd does. Runs in the separate evaluation venv (``make eval-env``:
requirements/eval-lock.txt, lmms-eval without movekd); skipped, saying so, when that venv is absent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from test_export import _make_bundle

pytestmark = pytest.mark.harness

REPO = Path(__file__).resolve().parents[1]
EVAL_PYTHON = Path(os.environ.get("MOVEKD_EVAL_PYTHON", REPO / ".venv-eval" / "bin" / "python"))
QUESTION = "what color is the shape?"
MAX_NEW_TOKENS = 3


@pytest.fixture(scope="module")
def eval_python() -> Path:
    if not EVAL_PYTHON.is_file():
        pytest.skip(f"no evaluation venv at {EVAL_PYTHON}: `make eval-env` builds it (`make test-harness` "
                    "builds it and runs these tests; MOVEKD_EVAL_PYTHON points elsewhere)")
    return EVAL_PYTHON


def _eval_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no movekd source on the path
    # offline as the harness must be here: nothing may be fetched from the hub
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def test_lmms_eval_llava_hf_answers_like_movekd(eval_python, tmp_path):
    from movekd.cli import main
    from movekd.inference import answer, load_trained

    path, raw = _make_bundle(tmp_path)
    out = tmp_path / "export-mean"
    assert main(["export", str(path), str(out), "--merge", "mean"]) == 0
    data = Path(raw["stages"][1]["data"])
    image = str(data.parent / json.loads(data.read_text())[0]["image"])
    ours = answer(load_trained(out), image, QUESTION, max_new_tokens=MAX_NEW_TOKENS)
    assert ours  # something to compare with

    proc = subprocess.run([str(eval_python), str(REPO / "tests" / "harness" / "lmms_eval_answer.py"), str(out),
                           image, QUESTION, str(MAX_NEW_TOKENS)],
                          capture_output=True, text=True, env=_eval_env(), timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Error" not in proc.stdout, proc.stdout[-3000:]  # lmms-eval logs a failed generate and answers ""
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {name: text.strip() for name, text in theirs.items()} == {"chat": ours, "simple": ours}
