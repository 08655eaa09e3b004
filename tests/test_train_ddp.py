"""Multi-process training on the standard engine: Accelerate over torch DDP, 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_fixtures import tiny_config


@pytest.mark.slow
def test_two_cpu_processes_train_in_sync(tmp_path):
    config = tiny_config(tmp_path, steps=(3, 3))
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).parent / "ddp_worker.py"), str(config_path), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and "MULTI_CPU" in r["type"] for r in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"] == [3, 3]
    # DDP averages gradients, so both ranks hold the same weights after every step.
    for key, value in ranks[0]["checksum"].items():
        assert value == pytest.approx(ranks[1]["checksum"][key], rel=1e-6, abs=1e-6), key
    assert (Path(config["output_dir"]) / "final" / "movekd_config.json").is_file()
