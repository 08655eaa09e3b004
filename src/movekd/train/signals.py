"""Graceful stop on SIGTERM / SIGINT (cluster preemption, Ctrl-C): checkpoint at the next step boundary.

A scheduler that preempts a job sends SIGTERM and waits a grace period before SIGKILL. The handler
only records the signal; the training loop checks :attr:`StopRequest.signum` after each optimiser
step, writes a checkpoint and raises :class:`~movekd.errors.TrainingInterrupted`, which says how to
resume. A second SIGINT (an impatient Ctrl-C) interrupts at once. DataLoader workers ignore both
signals (:func:`ignore_stop_signals` as ``worker_init_fn``): a terminal's Ctrl-C or a scheduler's
SIGTERM reaches the whole process group, and a worker that died of it would make the main process
fail on its next batch instead of reaching the step boundary.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set by the signal handler; read by the loop at step boundaries."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without a checkpoint
        self.signum = signum
        log.warning("%s received: writing a checkpoint at the end of this step, then stopping "
                    "(Ctrl-C again to stop at once)", signal.Signals(signum).name)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Install the handlers for the duration of the block (main thread only; elsewhere a no-op)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop._handle) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` for DataLoader workers: the main process decides when to stop."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
