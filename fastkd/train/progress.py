"""The progress display of a training epoch: a tqdm bar, or one plain line without tqdm.

Shown by rank 0 only (:func:`fastkd.train.distributed.is_main`), when stderr is a terminal;
``FASTKD_PROGRESS=1`` shows it anyway (a log file), ``FASTKD_PROGRESS=0`` never. With tqdm
installed the bar gives steps done, elapsed time and ETA, the running loss and images per second;
without it the line reads ``epoch 3 step 120/390 loss 1.234 5120 img/s``.

Both refresh at most once per :data:`REFRESH_S` seconds. The running loss is the mean over the
epoch so far of a loss sum that stays on the device (the engine adds each step's loss to it
without reading it); it is read only at a refresh, so a GPU run syncs with the host about once a
second, never per step (a CUDA-graph step keeps its stream full).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, SupportsFloat, TextIO

from fastkd.train import distributed

REFRESH_S = 1.0  # seconds between two refreshes (and two reads of the running loss)
ENV = "FASTKD_PROGRESS"


def wanted(stream: TextIO | None = None) -> bool:
    """Whether this process shows progress: rank 0 only; ``FASTKD_PROGRESS`` 1 / 0 forces it on / off,
    unset or empty it is shown when ``stream`` (stderr by default) is a terminal."""
    forced = os.environ.get(ENV, "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"{ENV} must be 1 (show progress), 0 (never) or unset (on a terminal), got {forced!r}")
    if not distributed.is_main():
        return False
    if forced:
        return forced == "1"
    return (stream or sys.stderr).isatty()


class EpochProgress:
    """One epoch's display; :meth:`update` after every step, :meth:`close` at the end (clears it).

    Args:
        epoch: the epoch, counted from 0 (shown from 1).
        steps: the epoch's step count, ``None`` when the data has no length (then no ETA).
        stream: where it is drawn (stderr by default).
        clock: seconds, for the refresh cadence and images/s (``time.perf_counter``).
    """

    def __init__(self, epoch: int, steps: int | None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.epoch, self.steps = epoch, steps
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = self.shown = clock()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}", unit="step", file=self.stream, leave=False,
                            dynamic_ncols=True, mininterval=0)

    def update(self, step: int, seen: int, loss_sum: SupportsFloat) -> None:
        """After ``step`` steps and ``seen`` images, whose summed loss (loss × batch size, added up) is
        ``loss_sum``: redraw if :data:`REFRESH_S` has passed since the last redraw (only then is
        ``loss_sum`` read)."""
        now = self.clock()
        if now - self.shown <= REFRESH_S:
            return
        self.shown = now
        loss = float(loss_sum) / max(seen, 1)
        rate = seen / (now - self.start) if now > self.start else 0.0
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4g}, {rate:.0f} img/s", refresh=False)
            self.bar.update(step - self.bar.n)
        else:
            print(f"\repoch {self.epoch + 1} step {step}/{self.steps or '?'} loss {loss:.4g} {rate:.0f} img/s\033[K",
                  end="", file=self.stream, flush=True)

    def close(self) -> None:
        """Remove the display from the terminal."""
        if self.bar is not None:
            self.bar.close()
        else:
            print("\r\033[K", end="", file=self.stream, flush=True)
