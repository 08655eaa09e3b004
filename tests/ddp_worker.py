"""Run by the multi-process tests under torchrun: train a tiny config on CPU processes (gloo) and
write this rank's trainable weights (safetensors) and a summary (JSON).

``MOVEKD_TEST_NONFINITE=RANK:CALL`` makes the model's CALL-th forward (1-based) on rank RANK return a
NaN loss, to check that every rank skips that step together.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from movekd.train.config import load_config  # noqa: E402
from movekd.train.kd_model import MoveKDModel  # noqa: E402
from movekd.train.loop import make_accelerator, train  # noqa: E402


def _inject_nonfinite(rank: int) -> None:
    fault = os.environ.get("MOVEKD_TEST_NONFINITE")
    if not fault:
        return
    bad_rank, bad_call = (int(v) for v in fault.split(":"))
    if rank != bad_rank:
        return
    original = MoveKDModel.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == bad_call:
            losses.total = losses.total * float("nan")
        return losses

    MoveKDModel.forward = forward


DRAWN = {"samples": 0}


def _count_drawn_samples() -> None:
    """Count the indices this rank's sampler hands out: ranks that skip together draw the same number."""
    from movekd.train.sampler import ResumableSampler

    original = ResumableSampler.__iter__

    def counted(self):
        for index in original(self):
            DRAWN["samples"] += 1
            yield index

    ResumableSampler.__iter__ = counted


def main(config_path: str, out: str, resume: str | None = None, stop_after: str | None = None) -> None:
    from safetensors.torch import save_file

    config = load_config(json.loads(Path(config_path).read_text()))
    accelerator = make_accelerator(config)
    _inject_nonfinite(accelerator.process_index)
    _count_drawn_samples()
    result = train(config, show_progress=False, accelerator=accelerator, resume=Path(resume) if resume else None,
                   stop_after_steps=int(stop_after) if stop_after else None)
    weights = result.system.checkpoint_weights()
    rank = accelerator.process_index
    from torch.distributed.tensor import DTensor

    if not any(isinstance(v, DTensor) for v in weights.values()):  # FSDP: only rank 0 holds full weights
        save_file({k: v.detach().float().contiguous().cpu() for k, v in weights.items()},
                  str(Path(out, f"rank{rank}.safetensors")))
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"world": accelerator.num_processes, "type": str(accelerator.distributed_type),
         "steps": [s.steps for s in result.stages], "bad_steps": [s.bad_steps for s in result.stages],
         "skipped": [s.skipped_samples for s in result.stages],
         "drawn": DRAWN["samples"]}))
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
