"""Preemption as a normal event: SIGTERM (what Slurm, Kubernetes and spot instances send before they
stop a job) and SIGUSR1 (Slurm's `--signal`) make a training run finish its step, write a complete
checkpoint, release its output directory and stop with `TrainingPreempted`, which names the
checkpoint; resuming from it continues exactly. The command line exits with 128 + the signal's
number (143 for SIGTERM, 138 for SIGUSR1), the status a process stopped by that signal has.

While `train()` runs, a signal only sets a flag, read after each optimizer step (all processes of
a distributed run agree on the step: the flag is reduced across them). Outside `train()`, the
command line stops at once (`raising`), as Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import signal
import threading

PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class TrainingPreempted(Exception):
    """Training stopped on a preemption signal; `checkpoint` is the complete checkpoint written
    at the step it stopped after (None if it stopped before training)."""

    def __init__(self, message: str, signal_number: int, checkpoint: str | None = None):
        super().__init__(message)
        self.signal_number, self.checkpoint = signal_number, checkpoint

    @property
    def exit_status(self) -> int:
        return 128 + self.signal_number


def signal_name(number: int) -> str:
    return signal.Signals(number).name


def _install(handler) -> dict:
    """Install `handler` for the preemption signals (main thread only); the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.signal(number, handler) for number in PREEMPTION_SIGNALS}


def _restore(previous: dict) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)


class DeferredSignals:
    """While entered, a preemption signal is recorded (`received`), not acted on."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handler(self, number, frame):
        if self.received is None:
            self.received = number

    def __enter__(self):
        self.received = None
        self._previous = _install(self._handler)
        return self

    def __exit__(self, *exc):
        _restore(self._previous)
        return False


@contextlib.contextmanager
def raising():
    """A preemption signal raises `TrainingPreempted` where the program is (outside `train()`,
    which defers it to the end of a step)."""

    def handler(number, frame):
        raise TrainingPreempted(f"stopped by {signal_name(number)} before training started", number)

    previous = _install(handler)
    try:
        yield
    finally:
        _restore(previous)
