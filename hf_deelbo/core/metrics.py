"""Named training metrics, averaged over each logging window.

Every trainer records a few values per training micro-batch (`nll`, `kl`, `penalty`, ...) and logs
their window means through its `log()` override (as trl's `RewardTrainer.log` does). The
sums stay on the device: recording never synchronises with the host, only `means()` does, when
Trainer logs.
"""

from __future__ import annotations

import torch

from .anchor import accumulation_dtype


class MetricsRecorder:
    """Sums of the named values over the current logging window, and their count.

    Args:
        names: the metrics, in the order `means()` returns them.
        device: where the sums live (the training device).
    """

    def __init__(self, names: tuple[str, ...], device: torch.device | str):
        self.names = tuple(names)
        self._window = torch.zeros(len(self.names) + 1, dtype=accumulation_dtype(device), device=device)

    @torch.no_grad()
    def record(self, **values) -> None:
        """Add one row (one training micro-batch): a tensor or number for every name."""
        device, dtype = self._window.device, self._window.dtype
        row = [torch.as_tensor(values[name], dtype=dtype).detach().to(device) for name in self.names]
        self._window += torch.stack([*row, torch.ones((), dtype=dtype, device=device)])

    def means(self, accelerator=None) -> dict[str, float]:
        """name -> mean over the window, summed over processes (`accelerator`); the window is
        cleared. Empty when nothing was recorded since the last call."""
        window = self._window
        if accelerator is not None and accelerator.num_processes > 1:
            window = accelerator.reduce(window.clone(), reduction="sum")
        count = float(window[-1])
        means = dict(zip(self.names, (window[:-1] / count).tolist(), strict=False)) if count > 0 else {}
        self._window.zero_()
        return means
