"""Run by test_train_ddp under torchrun: train the tiny config on 2 CPU processes (gloo) and write a
checksum of this rank's trainable weights."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from movekd.train.config import load_config  # noqa: E402
from movekd.train.loop import make_accelerator, train  # noqa: E402


def main(config_path: str, out: str) -> None:
    config = load_config(json.loads(Path(config_path).read_text()))
    accelerator = make_accelerator(config)
    result = train(config, show_progress=False, accelerator=accelerator)
    weights = result.system.checkpoint_weights()
    checksum = {k: float(v.double().sum()) for k, v in weights.items()}
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(
        {"world": accelerator.num_processes, "type": str(accelerator.distributed_type), "checksum": checksum,
         "steps": [s.steps for s in result.stages]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
