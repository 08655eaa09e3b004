"""Interrupted runs: SIGKILL at random moments (one inside a checkpoint write) and resume ends
bit-identical to an uninterrupted run; SIGTERM writes a checkpoint and says how to resume;
half-written checkpoints are passed over; non-finite weights are never written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import movekd
from movekd.train import checkpoint as ckpt
from train_fixtures import tiny_config

TESTS = Path(__file__).parent
DRIVER = TESTS / "interrupt_driver.py"


def _env(**extra) -> dict:
    paths = [str(TESTS), str(Path(movekd.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p), **extra}


def _write_config(base: dict, tmp: Path, name: str) -> tuple[Path, Path]:
    config = {"save_every": 2, **base, "output_dir": str(tmp / name)}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp / name


def _train(config: Path, *args, **env) -> subprocess.Popen:
    """The CLI in a subprocess; its output goes to a log file (a pipe nobody reads could fill and block)."""
    log = config.parent / f"{config.stem}-{time.monotonic_ns()}.log"
    proc = subprocess.Popen([sys.executable, str(DRIVER), "train", str(config), "--no-progress", *args],
                            env=_env(**env), stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _finish(proc: subprocess.Popen) -> str:
    proc.wait(timeout=600)
    return proc.log.read_text()


def _logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["global_step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _kill_after(proc: subprocess.Popen, run: Path, step: int, delay: float) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after it logged global step ``step``; False if it finished first.

    A resumed run first drops the records logged after its checkpoint, before it logs a stage's
    parameter table: only records after that are its own."""
    while "parameters" not in proc.log.read_text() or _logged_steps(run) < step:
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _losses(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in records]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(ckpt.latest_checkpoint(run) / ckpt.WEIGHTS)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # With the in-run teacher cache on (the default): a resumed run recomputes outputs the
    # uninterrupted run had cached, in other batches (README, "Your own data").
    base = tiny_config(tmp_path, steps=(5, 5))
    straight_cfg, straight = _write_config(base, tmp_path, "straight")
    killed_cfg, killed = _write_config(base, tmp_path, "killed")
    reference = _train(straight_cfg)
    out = _finish(reference)
    assert reference.returncode == 0, out[-3000:]

    # 1. killed inside its second checkpoint write (step-0000004): weights written, the rest not
    first = _train(killed_cfg, KILL_IN_CHECKPOINT="2")
    _finish(first)
    assert first.returncode == -signal.SIGKILL
    assert [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")], "no half-written folder"
    assert ckpt.latest_checkpoint(killed).name == "step-0000002"
    # 2, 3. killed at random moments (mid-step, or while writing a checkpoint), resumed each time
    kills, outputs = [], []
    for low, high in ((4, 6), (7, 9)):
        step, delay = rng.randint(low, high), rng.uniform(0.0, 0.3)
        proc = _train(killed_cfg, "--resume", str(killed))
        if _kill_after(proc, killed, step, delay):
            kills.append((step, round(delay, 3)))
        outputs.append(_finish(proc))
        assert proc.returncode in (0, -signal.SIGKILL), outputs[-1][-3000:]
    assert "passing over" in outputs[0] and "half-written" in outputs[0]
    assert kills, f"seed {seed}: no run was killed"
    last = _train(killed_cfg, "--resume", str(killed))
    out = _finish(last)
    assert last.returncode == 0, out[-3000:]

    context = f"seed {seed}, kills after (step, delay) {kills}"
    assert _losses(killed) == _losses(straight), context
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs ({context})"
    bundle = sorted(p.name for p in (killed / "final").iterdir())
    assert bundle == sorted(p.name for p in (straight / "final").iterdir())
    for name in bundle:
        if name.endswith(".safetensors"):
            sa, sb = ckpt.load_weights(straight / "final" / name), ckpt.load_weights(killed / "final" / name)
            assert all(torch.equal(sa[k], sb[k]) for k in sa), name


# ------------------------------------------------------------------------------------------ in process
def test_sigterm_writes_a_checkpoint_at_the_step_boundary_and_resume_matches(tmp_path, capsys):
    import threading

    from movekd.cli import main
    from movekd.train.config import load_config
    from movekd.train.loop import train

    base = tiny_config(tmp_path, steps=(3, 3))
    straight = train(load_config({**base, "output_dir": str(tmp_path / "straight")}), show_progress=False)
    config_path, run = _write_config({**base, "save_every": 0}, tmp_path, "stopped")
    config_path.write_text(yaml.safe_dump({**yaml.safe_load(config_path.read_text()), "save_every": 0}))

    def preempt():  # like a cluster scheduler: SIGTERM once training is under way
        while _logged_steps(run) < 2:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    code = main(["train", str(config_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM
    assert "Traceback" not in err and "stopped by SIGTERM" in err and f"--resume {run}" in err
    stopped_at = ckpt.latest_checkpoint(run)
    step = json.loads((stopped_at / ckpt.STATE).read_text())["global_step"]
    assert 2 <= step < 6 and stopped_at.name == f"step-{step:07d}"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert main(["train", str(config_path), "--no-progress", "--resume", str(run)]) == 0
    resumed = _weights(run)
    expected = straight.system.checkpoint_weights()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert _losses(run) == _losses(tmp_path / "straight")


def test_resume_in_an_earlier_stage_restores_its_rng_there_only(tmp_path):
    """A run resumed in stage 1 must not restore the checkpoint's RNG states again at stage 2 (it did:
    stage 2 then drew the dropout masks of stage 1's step 2 and diverged)."""
    from movekd.train.config import load_config
    from movekd.train.loop import train

    base = tiny_config(tmp_path, steps=(3, 3))
    straight = train(load_config({**base, "output_dir": str(tmp_path / "straight")}), show_progress=False)
    config = load_config({**base, "output_dir": str(tmp_path / "resumed")})
    train(config, show_progress=False, stop_after_steps=2)
    resumed = train(config, resume=config.run_dir, show_progress=False)
    a, b = straight.system.checkpoint_weights(), resumed.system.checkpoint_weights()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")


def test_half_written_checkpoints_are_passed_over(tmp_path, caplog):
    weights = {"w": torch.ones(3)}
    good = ckpt.save_checkpoint(tmp_path / "checkpoints" / "step-0000002", weights=weights,
                                trainer_state={"global_step": 2}, config={})
    assert (good / ckpt.COMPLETE).is_file()
    # a newer folder without the marker and files (copied half-way), and a temporary folder of a killed write
    torn = tmp_path / "checkpoints" / "step-0000004"
    torn.mkdir()
    (torn / ckpt.STATE).write_text(json.dumps({"global_step": 4}))
    building = tmp_path / "checkpoints" / ".step-0000006.building.x"
    building.mkdir()
    (building / ckpt.STATE).write_text(json.dumps({"global_step": 6}))
    (building / ckpt.WEIGHTS).write_bytes(b"")
    with caplog.at_level("WARNING"):
        assert ckpt.latest_checkpoint(tmp_path) == good
    assert "passing over" in caplog.text and "step-0000004" in caplog.text
    ckpt.prune_checkpoints(tmp_path, keep=5)
    assert not building.exists() and good.exists()  # a later save removes the killed write's leftovers


def test_non_finite_weights_are_never_written(tmp_path):
    folder = tmp_path / "checkpoints" / "step-1"
    with pytest.raises(ckpt.NonFiniteWeightsError, match=r"step-1.*2 weight tensor\(s\) hold NaN or inf.*a, b"):
        ckpt.save_checkpoint(folder, weights={"a": torch.tensor([1.0, float("nan")]), "b": torch.tensor([float("inf")]),
                                              "ok": torch.ones(2), "ids": torch.tensor([1, 2])},
                             trainer_state={"global_step": 1}, config={})
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_resume_truncates_metrics_logged_after_the_checkpoint(tmp_path):
    from movekd.train.metrics_log import read_metrics, truncate_metrics

    lines = [json.dumps({"global_step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"global_step": 5, "lo')  # cut by a kill
    truncate_metrics(tmp_path, 2)
    assert [r["global_step"] for r in read_metrics(tmp_path)] == [1, 2]
