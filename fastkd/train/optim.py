"""Optimisers for the engine, and the learning rate as a device tensor for CUDA graphs.

A CUDA graph replays the kernels it captured with the arguments they had: a learning rate passed as
a Python float would be frozen into the graph, and one read from a tensor on the host would need a
sync. So the graphed step keeps the learning rate in a 0-dim tensor on the training device, which
the loop refills before each replay (``lr.fill_(value)``: a kernel launch, no sync), and uses
optimisers whose update reads it on the device:

* :class:`CapturableSGD`: ``torch.optim.SGD``'s update (momentum, dampening 0, Nesterov, weight
  decay) written with foreach ops that multiply by the learning-rate tensor; torch's own SGD turns
  a tensor learning rate into a Python number (``alpha=-lr``), which a capture cannot do.
* ``torch.optim.AdamW(capturable=True)``, which takes a tensor learning rate as it is.
"""
from __future__ import annotations

from typing import Iterable

import torch

from fastkd.train.recipe import Recipe


class CapturableSGD(torch.optim.SGD):
    """SGD whose step has no host sync and reads ``lr`` from a tensor, so a CUDA graph can capture it.

    The same update and ``state_dict`` layout (``momentum_buffer``) as ``torch.optim.SGD`` with
    ``dampening=0``: d = g + λp; b ← μb + d (b = d on the first step); d ← d + μb (Nesterov) or b;
    p ← p − lr·d. The first step creates the momentum buffers, so capture after one eager step.
    """

    def __init__(self, params, lr: torch.Tensor, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        if not isinstance(lr, torch.Tensor) or lr.numel() != 1:
            raise TypeError(f"lr must be a one-element tensor on the parameters' device, got {lr!r}")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("CapturableSGD takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            momentum = group["momentum"]
            if momentum:
                buffers = [self.state[p].get("momentum_buffer") for p in params]
                if any(b is None for b in buffers):
                    for p, g in zip(params, grads):
                        self.state[p]["momentum_buffer"] = g.detach().clone()
                    buffers = [self.state[p]["momentum_buffer"] for p in params]
                else:
                    torch._foreach_mul_(buffers, momentum)
                    torch._foreach_add_(buffers, grads)
                grads = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
            torch._foreach_add_(params, torch._foreach_mul(grads, -group["lr"]))
        return None


def make_optimizer(recipe: Recipe, params: Iterable[torch.nn.Parameter],
                   lr: torch.Tensor | None = None) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``params``; with ``lr`` (a device tensor) one a CUDA graph can capture."""
    optim = recipe.optim
    if optim.name == "sgd":
        if lr is not None:
            return CapturableSGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                                 nesterov=optim.nesterov)
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                               nesterov=optim.nesterov)
    if lr is not None:  # capturable on CUDA; elsewhere the single-tensor path takes a tensor lr too
        on_cuda = lr.device.type == "cuda"
        return torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay, capturable=on_cuda, foreach=on_cuda)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
