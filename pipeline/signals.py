"""Stop requests: SIGUSR1 (Slurm's warning before the time limit) and SIGTERM.

A handler only sets a flag, so a signal can never interrupt a step or a
checkpoint write half-way, and a second signal changes nothing. The ranks agree
on the flag at a step boundary with one small all-reduce on a CPU (gloo) group,
so every rank stops after the same step even if only one was signalled, and a
GPU run is not made to wait for its stream by the check.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Exit code of a run stopped by a signal after saving: "try again" (sysexits
# EX_TEMPFAIL). launch/slurm.sbatch requeues the job on it.
REQUEUE_EXIT_CODE = 75

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """The flag the signal handlers set, and the one collective that shares it."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._group: Any = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = _cpu_group()
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            # Logging from a signal handler can deadlock on the handler's lock
            # if the signal arrived inside a log call; the message waits for agreed()

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled; call at step boundaries."""
        local = self.signal_name is not None
        if self._group is None:
            stop = local
        else:
            flag = torch.tensor([int(local)], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            stop = bool(flag.item())
        if stop and self.signal_name is None:
            self.signal_name = "another rank's signal"
        return stop


def _cpu_group() -> Any:
    # The default group is gloo on the CPU already; a GPU run (NCCL) gets a gloo
    # group so that the check needs no device synchronisation
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def ignore_stop_signals() -> None:
    """After the stop's checkpoint: further stop signals change nothing until the exit.

    Ignored at the OS level, not by a Python handler: Python puts its handlers back
    to the default (which ends the process) while it shuts down, and a signal then
    would replace exit code 75 with death by that signal.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
