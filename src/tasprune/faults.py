"""Stopping a run on purpose or on a fault without losing finished work.

- `StopRequest`: while active, SIGINT and SIGTERM set a flag instead of killing
  the process. Loops check `requested` after every step, write a checkpoint of
  the step they reached and raise `Interrupted`; the CLI turns that into one
  line and exit status 130 (SIGINT) or 143 (SIGTERM). A second SIGINT while the
  checkpoint is being written raises KeyboardInterrupt as usual.
- `check_loss`: a NaN or infinite loss raises `NonFiniteLoss` naming the phase,
  epoch and step, before the optimiser applies it; the run's last checkpoint
  (written before the bad step) is what a resume starts from.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import torch

__all__ = ["Interrupted", "NonFiniteLoss", "StopRequest", "check_loss"]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops without writing a checkpoint."""

    def __init__(self, phase: str, epoch: int, step: int, value: float) -> None:
        self.phase, self.epoch, self.step, self.value = phase, epoch, step, value
        super().__init__(
            f"{phase}: the loss became {value} at epoch {epoch} step {step}; stopped without "
            "writing a checkpoint, so the last good one is kept. Lower the learning rate "
            "(or check the data for bad values) and resume")


class Interrupted(Exception):
    """The run was asked to stop (SIGINT/SIGTERM) and saved a checkpoint first."""

    def __init__(self, phase: str, signum: int, checkpoint: str, where: str) -> None:
        self.phase, self.signum, self.checkpoint = phase, signum, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{phase}: stopped by {name} at {where}; checkpoint saved to "
                         f"{checkpoint}; to continue, run the same command with --resume "
                         "(prune and demo continue without it)")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def check_loss(loss: torch.Tensor, phase: str, epoch: int, step: int) -> None:
    """Raise `NonFiniteLoss` when `loss` is NaN or infinite (epoch and step 1-based)."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteLoss(phase, epoch, step, float(loss.detach().float().sum()))


class StopRequest:
    """Context manager: SIGINT/SIGTERM set `signum` instead of ending the process.

    Only the main thread can install signal handlers; elsewhere (and when
    `enabled` is false) this is a no-op that never requests a stop.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
