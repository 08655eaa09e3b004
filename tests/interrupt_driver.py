"""Run by test_interrupt in a subprocess: ``movekd train CONFIG [--resume RUN]`` through the CLI.

With ``KILL_IN_CHECKPOINT=N`` the process SIGKILLs itself inside its N-th checkpoint write, after the
weights are in the temporary folder and before the rest (a real kill mid-write, at a known moment).
"""

import os
import signal
import sys

from movekd.cli import main
from movekd.train import checkpoint as ckpt

KILL_AT = int(os.environ.get("KILL_IN_CHECKPOINT", "0"))
writes = 0

if KILL_AT:
    save_weights = ckpt.save_weights

    def save_weights_then_die(path, state, metadata=None):
        global writes
        save_weights(path, state, metadata)
        writes += 1
        if writes == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt.save_weights = save_weights_then_die

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
