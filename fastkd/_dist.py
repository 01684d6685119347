"""Collectives the losses need under ``torch.distributed`` (a no-op world of one without it).

The losses sit below the training engine (data → models → losses → train), so the few
collectives :class:`~fastkd.CRDLoss` uses live here rather than in :mod:`fastkd.train`.
Everything works on any backend: NCCL's ``reduce_scatter_single`` where the backend has it, an
``all_reduce`` + slice on gloo (which has no reduce-scatter). :func:`all_gather_rows` and
:func:`reduce_scatter_rows` are differentiable, each the other's adjoint:
d/dx all_gather(x) = reduce_scatter(grad) and d/dx reduce_scatter(x) = all_gather(grad).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


_GROUPS: dict = {}


def group():
    """A process group of all ranks kept for the losses' collectives, apart from the default one
    that DDP's gradient buckets use, so the two never interleave (created once, on first use, by
    every rank at the same step)."""
    default = dist.group.WORLD
    if id(default) not in _GROUPS:
        _GROUPS.clear()
        _GROUPS[id(default)] = dist.new_group(backend=dist.get_backend())
    return _GROUPS[id(default)]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` ([B, ...], the same shape everywhere) stacked in rank order: [world·B, ...]."""
    if not active():
        return x
    x = x.contiguous()
    out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x, group=group())
    return out


def sum_scatter_rows(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of ``x`` ([world·B, ...]), of which this rank keeps its block of B rows."""
    if not active():
        return x
    world, me = world_size(), rank()
    if x.shape[0] % world:
        raise ValueError(f"x has {x.shape[0]} rows, not a multiple of the world size {world}")
    block = x.shape[0] // world
    x = x.contiguous()
    if dist.get_backend() == "nccl":
        out = x.new_empty((block, *x.shape[1:]))
        dist.reduce_scatter_single(out, x, group=group())
        return out
    total = x.clone()
    dist.all_reduce(total, group=group())
    return total[me * block:(me + 1) * block].contiguous()


def all_reduce_(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum (or ``"mean"``) of ``x`` over the ranks; returns ``x``."""
    if active():
        dist.all_reduce(x, group=group())
        if op == "mean":
            x.div_(world_size())
    return x


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return gather_rows(x)

    @staticmethod
    def backward(ctx, grad):
        return sum_scatter_rows(grad)


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return sum_scatter_rows(x)

    @staticmethod
    def backward(ctx, grad):
        return gather_rows(grad)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """:func:`gather_rows` with autograd (the gradient is reduce-scattered back)."""
    return _AllGather.apply(x) if active() else x


def reduce_scatter_rows(x: torch.Tensor) -> torch.Tensor:
    """:func:`sum_scatter_rows` with autograd (the gradient is all-gathered back)."""
    return _ReduceScatter.apply(x) if active() else x
