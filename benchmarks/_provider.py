"""The provider a benchmark step runs on, selected once around the timed rounds."""
from __future__ import annotations

import contextlib
from typing import Iterator

import fastkd


@contextlib.contextmanager
def selected(provider: str) -> Iterator[None]:
    """``provider``'s backend with value checks off, entered once around warm-up and timing, as a training
    run enters its selection once: entering the two blocks inside every step would time them too (~10 µs,
    paid by every provider alike, which hides the difference between them at small sizes)."""
    with fastkd.use_backend(provider), fastkd.value_checks(False):
        yield
