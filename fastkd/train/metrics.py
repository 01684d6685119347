"""A run's metrics on disk: JSONL and CSV per epoch, TensorBoard when installed, a PNG of the curves.

:class:`MetricsLog` appends one record per epoch to ``metrics.jsonl`` and rewrites ``metrics.csv``
(its columns grow when a new metric appears), writes TensorBoard scalars when the ``tensorboard``
package is installed, hands the record to the run's tracker (:mod:`fastkd.train.loggers`) when
there is one, and :func:`plot` draws accuracy and loss curves to ``curves.png`` when matplotlib
is installed (TensorBoard and matplotlib are optional: nothing breaks without them).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os

from fastkd.data._files import atomic_write
from fastkd.train.loggers import Logger


def _line(record: dict) -> str:
    """A record as one line of JSON; a number that is not finite becomes null (JSON has no NaN)."""
    finite = {key: None if isinstance(value, float) and not math.isfinite(value) else value
              for key, value in record.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


class MetricsLog:
    """Per-epoch records of a run in ``folder``; ``history`` seeds it when a run is resumed; ``logger``
    (a started tracker) gets each new record, and :meth:`close` finishes its run."""

    def __init__(self, folder: str, history: list[dict] | None = None, logger: Logger | None = None):
        self.folder, self.logger = folder, logger
        self.records: list[dict] = list(history or [])
        # the file starts as the history it continues: lines an interrupted process wrote after its last
        # checkpoint (an epoch the resumed run trains again) must not stay in it twice
        os.makedirs(folder, exist_ok=True)
        with atomic_write(os.path.join(folder, "metrics.jsonl")) as stream:
            stream.write("".join(_line(r) for r in self.records).encode())
        self._board = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(os.path.join(folder, "tensorboard"))

    def append(self, record: dict) -> None:
        self.records.append(record)
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, "metrics.jsonl"), "a") as stream:
            stream.write(_line(record))
        columns = list(dict.fromkeys(key for r in self.records for key in r))
        with open(os.path.join(self.folder, "metrics.csv"), "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.records)
        if self._board is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._board.add_scalar(key, value, record.get("epoch", len(self.records)))
            self._board.flush()
        if self.logger is not None:
            self.logger.log(record)

    def close(self) -> None:
        """Finish the tracker's run, if there is one."""
        if self.logger is not None:
            self.logger.finish()
            self.logger = None

    def plot(self) -> str | None:
        """``curves.png``: test accuracy and training losses by epoch; ``None`` without matplotlib."""
        if importlib.util.find_spec("matplotlib") is None or not self.records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.records]
        fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 4))
        for key in ("test_top1", "test_top5"):
            points = [(e, r[key]) for e, r in zip(epochs, self.records) if key in r]
            if points:
                acc.plot(*zip(*points), marker="o", label=key)
        acc.set(xlabel="epoch", ylabel="accuracy (%)", title="test accuracy")
        acc.legend()
        for key in sorted({k for r in self.records for k in r if k.startswith("train_")}):
            loss.plot(epochs, [r.get(key) for r in self.records], label=key)
        loss.set(xlabel="epoch", ylabel="loss", title="training losses", yscale="log")
        loss.legend()
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, "curves.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
