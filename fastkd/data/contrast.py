"""CRD's contrast indices, drawn for a whole batch at once.

For a batch of dataset indices ``index`` (labels ``y``) :class:`ContrastSampler` returns an int64
tensor ``[B, K + 1]``: column 0 holds the positive, columns 1..K the negatives, as RepDistiller's
``CIFAR100InstanceSample`` does one sample at a time:

- ``mode="exact"``: the positive is the sample itself (``index``);
- ``mode="relax"``: the positive is a uniformly random sample of the anchor's class (possibly
  the anchor itself);
- negatives are a uniformly random K-subset of the samples of *other* classes, drawn without
  replacement within a row, independently between rows; when a class's pool of other-class
  samples is smaller than K they are drawn with replacement (RepDistiller's ``replace`` rule).

How a row is drawn without a per-sample loop: with the dataset indices sorted by class and that
order written twice end to end, the pool of class ``c`` is the ``N - n_c`` entries that follow
c's block, so a row needs K distinct positions in ``[0, N - n_c)``. Positions are drawn
uniformly for all B·K slots at once; a slot is kept when no other slot of its row drew the same
position (counts in a ``[B, max pool]`` byte table, ``scatter_add``), and the slots that shared a
position, all of them, are drawn again against the table of those kept, round after round until
every row is distinct. The rule is symmetric in the positions, so each row is a uniform K-subset
of its pool. While ``K`` is at most half the pool this takes about ``log(BK)`` rounds, each about
a third the size of the one before; classes whose pool is smaller than ``2K`` rank random keys
over the whole pool instead, and so do all rows on a GPU while the ``[B, max pool]`` keys fit in
1 GB (no host synchronisation then, where each rejection round would need one).
RepDistiller's ``percent`` option (a fixed random part of each pool) is not supported.
"""
from __future__ import annotations

import numbers
import threading

import numpy as np
import torch

from fastkd import _checks

MODES = ("exact", "relax")


def _as_labels(labels, device) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        t = labels.detach()
    else:
        t = torch.as_tensor(np.asarray(labels))
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence of class ids, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"labels must hold integers, got dtype {t.dtype}")
    t = t.to(device=device if device is not None else t.device, dtype=torch.int64)
    if int(t.min()) < 0:
        raise ValueError(f"labels must be ≥ 0, got {int(t.min())}")
    return t


class ContrastSampler:
    """Draws ``[B, K + 1]`` contrast indices for a batch (positive first); see the module doc.

    Args:
        labels: the class of every training sample (length ``N``; a tensor, array or list).
        num_negatives: ``K``, the negatives per row (RepDistiller's ``nce_k``, 16384 by default).
        mode: ``"exact"`` or ``"relax"``, the rule for the positive.
        seed: seeds :attr:`generator`, used when a call passes no generator of its own.
        device: where the labels, the draws and the result live (the labels' device by default).
    """

    def __init__(self, labels, num_negatives: int = 16384, mode: str = "exact", *, seed: int = 0,
                 device: str | torch.device | None = None):
        self.num_negatives = _checks.integer("num_negatives", num_negatives, 1)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.mode = mode
        self.labels = _as_labels(labels, device)
        self.device = self.labels.device
        counts = torch.bincount(self.labels).cpu()
        present = int((counts > 0).sum())
        if present < 2:
            raise ValueError(f"labels must hold at least two classes to draw other-class negatives, got {present}")
        self.num_data = self.labels.numel()
        self.num_classes = counts.numel()
        self.counts = counts.to(self.device)
        self.starts = (torch.cumsum(counts, 0) - counts).to(self.device)
        self.pool_sizes = (self.num_data - counts).to(self.device)
        self.order = torch.argsort(self.labels, stable=True)
        # how each class's rows are drawn: 0 sparse rejection, 1 dense keys, 2 with replacement
        k, pool = self.num_negatives, self.num_data - counts
        regime = torch.where(k > pool, 2, torch.where(2 * k > pool, 1, 0))
        regime[counts == 0] = 0
        self._regimes = sorted(set(regime[counts > 0].tolist()))
        self._regime = regime.to(self.device)
        sizes = pool[counts > 0]
        self._max_pool = int(sizes.max())
        self._pool = self._max_pool if bool((sizes == self._max_pool).all()) else None
        self._chunk_rows = max(1, (1 << 26) // self._max_pool)
        self.ends = (torch.cumsum(counts, 0) % self.num_data).to(self.device)
        self._order2 = torch.cat([self.order, self.order])
        self._table = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._pos = torch.empty(0, dtype=torch.int64, device=self.device)
        self._ones = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self._lock = threading.Lock()  # draws share the buffers above: one at a time (loaders draw in threads)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"ContrastSampler(num_data={self.num_data}, num_classes={self.num_classes}, "
                f"num_negatives={self.num_negatives}, mode={self.mode!r}, device={self.device})")

    def __call__(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Contrast indices ``[B, K + 1]`` (int64, positive in column 0) for dataset indices ``index``."""
        index = _checks.index("index", index, self.num_data, device=self.device)
        if index.dim() != 1:
            raise ValueError(f"index must be 1-D (one dataset index per sample), got shape {tuple(index.shape)}")
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"generator is on {generator.device} but the sampler draws on {self.device}")
        return self.draw(index, generator)

    def draw(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`__call__` without its input checks (no host sync), for callers whose indices are valid.
        Thread-safe: concurrent calls (loaders drawing ahead in worker threads) take turns."""
        with self._lock:
            return self._draw(index, generator)

    def _draw(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        g = self.generator if generator is None else generator
        y = self.labels[index]
        out = torch.empty(index.numel(), self.num_negatives + 1, dtype=torch.int64, device=self.device)
        if self.mode == "exact":
            out[:, 0] = index
        else:
            n = self.counts[y]
            u = torch.rand(index.numel(), dtype=torch.float64, device=self.device, generator=g)
            within = torch.minimum((u * n).long(), n - 1)
            out[:, 0] = self.order[self.starts[y] + within]
        if index.numel() == 0:
            return out
        if len(self._regimes) == 1:
            self._negatives(out[:, 1:], y, self._regimes[0], g)
        else:
            regime = self._regime[y]
            for r in self._regimes:
                rows = (regime == r).nonzero().squeeze(1)
                if rows.numel():
                    part = torch.empty(rows.numel(), self.num_negatives, dtype=torch.int64, device=self.device)
                    self._negatives(part, y[rows], r, g)
                    out[rows, 1:] = part
        return out

    # --- the draws ----------------------------------------------------------------------------
    def _uniform(self, bound: torch.Tensor, k: int | None, g: torch.Generator,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """Positions uniform in [0, bound[r]) for row r: [R, k], or [R] when ``k`` is None."""
        shape = (bound.numel(),) if k is None else (bound.numel(), k)
        if self._pool is not None:  # every class's pool has one size: draw integers directly
            out = torch.empty(shape, dtype=torch.int64, device=self.device) if out is None else out
            return out.random_(0, self._pool, generator=g)
        b = bound if k is None else bound[:, None]
        u = torch.rand(shape, dtype=torch.float64, device=self.device, generator=g)
        return torch.minimum(u.mul_(b).long(), b - 1, out=out)

    def _negatives(self, dest: torch.Tensor, y: torch.Tensor, regime: int, g: torch.Generator) -> None:
        """Fill ``dest`` [R, K] with dataset indices of other-class samples for rows of class ``y``."""
        if regime == 0 and dest.shape[0] > self._chunk_rows:  # keep the count table under 64 MB
            for s in range(0, dest.shape[0], self._chunk_rows):
                self._negatives(dest[s:s + self._chunk_rows], y[s:s + self._chunk_rows], regime, g)
            return
        if regime == 0 and self.device.type == "cuda" and dest.shape[0] * self._max_pool <= 1 << 27:
            regime = 1  # on a GPU, ranking keys is cheap and needs no host sync
        bound = self.pool_sizes[y]
        if regime == 0:
            pos = self._distinct_sparse(bound, g)
        elif regime == 1:
            pos = self._distinct_dense(bound, g)
        else:
            pos = self._uniform(bound, self.num_negatives, g)
        # class c's pool is order2[end_c : end_c + N - n_c], order2 being the class order twice
        pos += self.ends[y][:, None]
        dest.copy_(torch.index_select(self._order2, 0, pos.view(-1)).view(dest.shape))

    def _distinct_sparse(self, bound: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """[R, K] positions, row r a uniform K-subset of [0, bound[r]), by rounds of rejection.

        Works in buffers kept between calls (a fresh 8 MB tensor per call costs page faults), so
        one sampler must not be called from two threads at once.
        """
        rows, k, width = bound.numel(), self.num_negatives, self._max_pool
        if self._table.numel() < rows * width:
            self._table = torch.empty(rows * width, dtype=torch.uint8, device=self.device)
        if self._pos.numel() < rows * k:
            self._pos = torch.empty(rows * k, dtype=torch.int64, device=self.device)
            self._ones = torch.ones(rows * k, dtype=torch.uint8, device=self.device)
        table = self._table[: rows * width].zero_()
        flat = self._pos[: rows * k]
        pos = self._uniform(bound, k, g, out=flat.view(rows, k))
        # round one on the [R, width] table directly, later rounds on its flat view by key
        table.view(rows, width).scatter_add_(1, pos, self._ones[: rows * k].view(rows, k))
        slots = (table.view(rows, width).gather(1, pos) != 1).view(-1).nonzero().squeeze(1)
        row = torch.div(slots, k, rounding_mode="floor")
        key = row * width + flat[slots]
        while slots.numel():
            # take the rejected slots back out of the table (adding 255 mod 256 subtracts one) ...
            table.scatter_add_(0, key, self._ones[: key.numel()].mul(255))
            # ... draw them again, and keep those now alone in their row
            fresh = self._uniform(bound[row], None, g)
            flat[slots] = fresh
            key = row * width + fresh
            table.scatter_add_(0, key, self._ones[: key.numel()])
            again = (table.index_select(0, key) != 1).nonzero().squeeze(1)
            slots, row, key = slots[again], row[again], key[again]
        return pos

    def _distinct_dense(self, bound: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """[R, K] positions, row r a uniform K-subset of [0, bound[r]), by the K smallest random keys
        (float64, so that ties, which would favour one index, practically never occur)."""
        width = self._max_pool
        keys = torch.rand(bound.numel(), width, dtype=torch.float64, device=self.device, generator=g)
        keys.masked_fill_(torch.arange(width, device=self.device) >= bound[:, None], 2.0)
        return keys.topk(self.num_negatives, dim=1, largest=False, sorted=False).indices

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The generator's state (everything else follows from the constructor's arguments)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
