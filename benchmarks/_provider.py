"""The provider a benchmark step runs on, selected once around the timed rounds."""
from __future__ import annotations

import contextlib
from typing import Iterator

import fastkd


@contextlib.contextmanager
def selected(provider: str) -> Iterator[None]:
    """``provider``'s backend with value checks off, entered once around warm-up and timing, as a training
    run enters its selection once: entering the two blocks inside every step would time them too (~10 µs,
    paid by every provider alike, which hides the difference between them at small sizes). ``published`` (the
    eager RepDistiller-style computation a suite times beside the backends where the torch backend differs from
    it) runs on the torch backend."""
    with fastkd.use_backend("torch" if provider == "published" else provider), fastkd.value_checks(False):
        yield
