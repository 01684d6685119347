"""The progress display of a training epoch: a tqdm bar, or one plain line without tqdm.

Shown by rank 0 only (:func:`fastkd.train.distributed.is_main`). On a terminal (or with
``FASTKD_PROGRESS=1``) it is redrawn in place: with tqdm installed a bar with steps done, elapsed
time and ETA, the running loss and images per second; without it the line
``epoch 3 step 120/390 loss 1.234 5120 img/s``. When stderr is not a terminal (a log file, CI) that
plain line, with the epoch's ETA, is written as a line of its own every :data:`LOG_S` seconds.
``FASTKD_PROGRESS=0`` shows nothing.

The live display refreshes at most once per :data:`REFRESH_S` seconds. The running loss is the mean over the
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

REFRESH_S = 1.0  # seconds between two refreshes (and two reads of the running loss) of the live display
LOG_S = 30.0     # seconds between two lines when stderr is not a terminal
ENV = "FASTKD_PROGRESS"
LIVE, LOG = "live", "log"


def wanted(stream: TextIO | None = None) -> str | None:
    """How this process shows progress: :data:`LIVE` (redrawn in place) on a terminal or with
    ``FASTKD_PROGRESS=1``, :data:`LOG` (a line now and then) when ``stream`` (stderr by default) is not a
    terminal, ``None`` with ``FASTKD_PROGRESS=0`` or on a rank other than 0."""
    forced = os.environ.get(ENV, "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"{ENV} must be 1 (show progress), 0 (never) or unset (on a terminal), got {forced!r}")
    if not distributed.is_main() or forced == "0":
        return None
    return LIVE if forced == "1" or (stream or sys.stderr).isatty() else LOG


class EpochProgress:
    """One epoch's display; :meth:`update` after every step, :meth:`close` at the end (clears a live one).

    Args:
        epoch: the epoch, counted from 0 (shown from 1).
        steps: the epoch's step count, ``None`` when the data has no length (then no ETA).
        stream: where it is drawn (stderr by default).
        clock: seconds, for the refresh cadence and images/s (``time.perf_counter``).
        mode: :data:`LIVE` or :data:`LOG` (see the module doc).
    """

    def __init__(self, epoch: int, steps: int | None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter, mode: str = LIVE):
        self.epoch, self.steps, self.mode = epoch, steps, mode
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = self.shown = clock()
        try:
            if mode == LOG:
                raise ImportError  # a log gets whole lines, not a bar's redraws
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
        if now - self.shown <= (LOG_S if self.mode == LOG else REFRESH_S):
            return
        self.shown = now
        loss = float(loss_sum) / max(seen, 1)
        rate = seen / (now - self.start) if now > self.start else 0.0
        if self.mode == LOG:
            left = f" ETA {_duration((now - self.start) * (self.steps - step) / step)}" if self.steps else ""
            print(f"epoch {self.epoch + 1} step {step}/{self.steps or '?'} loss {loss:.4g} {rate:.0f} img/s{left}",
                  file=self.stream, flush=True)
        elif self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4g}, {rate:.0f} img/s", refresh=False)
            self.bar.update(step - self.bar.n)
        else:
            print(f"\repoch {self.epoch + 1} step {step}/{self.steps or '?'} loss {loss:.4g} {rate:.0f} img/s\033[K",
                  end="", file=self.stream, flush=True)

    def close(self) -> None:
        """Remove a live display from the terminal (a log's lines stay)."""
        if self.bar is not None:
            self.bar.close()
        elif self.mode == LIVE:
            print("\r\033[K", end="", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
