"""The callback a method's learned state lives in, and that runs its hyper-steps.

`Trainer` saves an `ExportableState` callback's `state()` in `trainer_state.json` with every
checkpoint, and on resume builds a *new* instance from it (with
`restore_callback_states_from_checkpoint=True`, which every stateful method's arguments force):
a trainer never keeps a reference to an old instance, it binds whichever one is installed
(`FineTuningTrainer.install_method_callback`), and binding writes restored values into the
method's objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class MethodStateCallback(TrainerCallback, ExportableState):
    """Base of the methods' callbacks.

    Subclasses name their JSON state in `state_attributes` (the constructor's keyword arguments,
    restored by `Trainer` from a checkpoint), write restored values into what they are bound to
    in `restore(target)`, and return the current values in `current_state()`. Hyper-steps that
    run every few optimizer steps read their cadence from the arguments field `cadence_argument`
    (`is_due`) and count their wall time in the trainer's `hyper_seconds` (`timed`).
    """

    state_attributes: tuple[str, ...] = ()
    cadence_argument: str | None = None

    def __init__(self, **saved):
        unknown = set(saved) - set(self.state_attributes)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown state {sorted(unknown)}; it holds {self.state_attributes}"
            )
        for name in self.state_attributes:
            setattr(self, name, saved.get(name))
        self.target = None

    def bind(self, target) -> None:
        """Attach what the callback works on; values restored from a checkpoint are written into it."""
        self.target = target
        if any(self.saved_state().get(name) is not None for name in self.state_attributes):
            self.restore(target)

    def saved_state(self) -> dict:
        """The state as given to the constructor or last set (by `Trainer` on resume)."""
        return {name: getattr(self, name) for name in self.state_attributes}

    def restore(self, target) -> None:
        """Subclass hook: write the saved state into `target`."""

    def current_state(self) -> dict:
        """Subclass hook: the JSON state of the bound target."""
        return self.saved_state()

    def state(self) -> dict:
        attributes = self.current_state() if self.target is not None else self.saved_state()
        return {"args": {}, "attributes": attributes}

    def is_due(self, args, state) -> bool:
        """Whether the optimizer step about to finish (`global_step + 1`) is a hyper-step."""
        return (state.global_step + 1) % getattr(args, self.cadence_argument) == 0

    @staticmethod
    def timed(trainer, work: Callable[[], object]) -> None:
        """Run `work`, adding its wall time to `trainer.hyper_seconds` (logged and in the train metrics)."""
        start = time.perf_counter()
        work()
        trainer.hyper_seconds += time.perf_counter() - start
