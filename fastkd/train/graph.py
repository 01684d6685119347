"""The whole training step — forward, backward, optimiser update — captured in one CUDA graph.

A distillation step launches hundreds of small kernels (two networks, several losses, the
optimiser); at CIFAR sizes the GPU waits on Python to launch them. :class:`GraphedStep` records
them once and replays the recording for every later batch of the same shapes:

* **static inputs**: each batch is copied into buffers allocated at capture (the graph reads
  those addresses); the outputs (total loss and each term) are static tensors refreshed by each
  replay, so the loop accumulates them without a host sync;
* **warm-up**: the first ``warmup`` steps run eagerly on a side stream (lazy state: optimiser
  buffers, CRD's Z, cuDNN's algorithm choice), then the next batch is captured and replayed;
  after a recapture key changes, one eager step comes first (the trainer's value checks run on
  the first step of each epoch, and they read the data on the host);
* **learning rate**: a device tensor (see :mod:`fastkd.train.optim`) refilled before each replay;
* **recapture**: a new key (the trainer passes the epoch, which DKD's warm-up weight reads as a
  Python number) or new shapes (a smaller last batch) capture again; the old graph is freed;
* **fallback**: where capture is impossible (no CUDA device) the same step runs eagerly, and a capture that fails (an op that syncs with the host) warns once and turns
  the graph off for the run.

The step function must not sync with the host; fastkd's losses skip their value checks while a
capture is under way, and autocast must run with ``cache_enabled=False`` inside a capture.
"""
from __future__ import annotations

import warnings
from typing import Callable, Hashable, Sequence

import torch

Batch = Sequence[torch.Tensor | None]
Outputs = tuple[torch.Tensor, dict[str, torch.Tensor]]


def _shapes(batch: Batch) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.stride()) for t in batch)


class GraphedStep:
    """``step(*batch) → (total, {name: term})`` run through a CUDA graph; see the module doc.

    Args:
        step: one training step on a batch (zeroes nothing: gradients are set to ``None`` before
            each eager step and captured as fresh allocations, so a replay overwrites them).
        optimizer: whose gradients are reset before eager steps and before capture.
        device: the training device; capture happens only on CUDA.
        warmup: eager steps before the first capture.
    """

    def __init__(self, step: Callable[..., Outputs], optimizer: torch.optim.Optimizer, device: torch.device,
                 warmup: int = 3):
        self.step, self.optimizer, self.device = step, optimizer, torch.device(device)
        self.warmup = warmup
        self.enabled = self.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[torch.Tensor | None] = []
        self.static_out: Outputs | None = None
        self.key: tuple | None = None
        self._pending: tuple | None = None  # the key eager steps are being run for, and how many so far
        self._pending_steps = 0
        self.eager_steps = 0
        self.captures = 0
        self.replays = 0

    def _eager(self, batch: Batch) -> Outputs:
        self.optimizer.zero_grad(set_to_none=True)
        if not self.enabled:
            return self.step(*batch)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self.step(*batch)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self, batch: Batch, key: tuple) -> None:
        self.graph = self.static_out = None  # free the previous graph's pool first
        self.static_in = [None if t is None else t.detach().clone() for t in batch]
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self.step(*self.static_in)
        except Exception as error:  # an op that cannot be captured: run eagerly from now on
            warnings.warn(f"capturing the training step in a CUDA graph failed ({type(error).__name__}: "
                          f"{error}); the run goes on with eager steps", RuntimeWarning, stacklevel=3)
            self.enabled, self.static_in = False, []
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.graph, self.static_out, self.key = graph, out, key
        self.captures += 1

    def __call__(self, batch: Batch, key: Hashable = None) -> Outputs:
        """One step on ``batch``; the outputs are only valid until the next call."""
        if not self.enabled:
            self.eager_steps += 1
            return self._eager(batch)
        full_key = (key, _shapes(batch))
        if self.graph is None or full_key != self.key:
            if full_key != self._pending:
                self._pending, self._pending_steps = full_key, 0
            if self._pending_steps < (self.warmup if self.captures == 0 else 1):
                self._pending_steps += 1
                self.eager_steps += 1
                return self._eager(batch)
            self._capture(batch, full_key)
            if self.graph is None:
                self.eager_steps += 1
                return self._eager(batch)
        for static, t in zip(self.static_in, batch):
            if static is not None:
                static.copy_(t, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.static_out
