"""Training on many GPUs (or CPU processes) with ``torch.distributed``, launched by torchrun.

    torchrun --nproc_per_node=8 -m fastkd distill imagenet_r34_r18 data.root=/data/imagenet ...
    torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m fastkd ...

:func:`setup` joins the process group torchrun describes in the environment (``env://``
rendezvous: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL with
one GPU per process (``cuda:LOCAL_RANK``) when CUDA is there and the device is not ``cpu``, else
gloo on the CPU. Then, as the engine uses them:

- the data: each rank reads a disjoint slice of every global batch of the epoch's seeded order
  (:class:`~fastkd.data.device.DeviceLoader` and :class:`~fastkd.data.keyed.EpochBatchSampler` take ``rank`` and
  ``world_size``): ``data.batch_size`` is the per-rank batch, the global batch is W times it,
  and the W slices of a global batch together are the batch one process would draw;
- the learning rate: with ``optim.reference_batch`` set, ``optim.lr`` is the rate for that
  batch and the run uses lr × global batch / reference_batch (Goyal et al. 2017's linear rule;
  ImageNet recipes: 0.1 × batch/256) — :func:`scaled_recipe`;
- the model: :func:`wrap` puts the :class:`~fastkd.train.distiller.Distiller` in
  ``DistributedDataParallel``, so the student's gradients and those of the losses' trainable
  parameters (CRD's embeds, regressors, projectors) are averaged and stay identical on every
  rank; the frozen teacher takes no part. The student's buffers (BatchNorm statistics) are
  broadcast from rank 0 each step; the teacher's are not (frozen), nor the CRD losses' banks, Z
  and sampler state, which :class:`~fastkd.CRDLoss` keeps in sync itself; ``sync_bn: true`` turns the student's
  BatchNorms into SyncBatchNorm (statistics over the global batch);
- the output: metrics (loss sums, accuracy counts) are all-reduced; only rank 0 logs and writes
  metrics files and checkpoints (when a CRD loss shards its banks, the other ranks write their
  shards beside it first: :func:`save`, :func:`load`).

Every rank seeds torch with the recipe's seed, so their RNG streams are identical and the rank-0
checkpoint's RNG state is each rank's.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from fastkd._dist import active, rank, world_size
from fastkd.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["setup", "teardown", "active", "rank", "world_size", "is_main", "wrap", "reduce_sums", "scaled_recipe",
           "save", "load", "shard_path", "barrier", "average_gradients"]


def setup(device: str | torch.device | None = None) -> torch.device | None:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1; returns this rank's device.

    Without torchrun (no ``WORLD_SIZE``, or 1) it does nothing and returns ``device`` as given.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        if dist.is_initialized() and device is None and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return None if device is None else torch.device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = torch.device(device) if device is not None else None
    cuda = torch.cuda.is_available() and (want is None or want.type == "cuda")
    if cuda:
        torch.cuda.set_device(local)
        chosen = torch.device("cuda", local)
        dist.init_process_group("nccl", init_method="env://", device_id=chosen,
                                timeout=datetime.timedelta(minutes=30))
    else:
        chosen = torch.device("cpu")
        dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(minutes=30))
    return chosen


def teardown() -> None:
    """Leave the process group (after a barrier, so no rank exits while another still talks)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    """Rank 0 (or no distributed run): the process that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def _crd_losses(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from fastkd.losses.contrastive import CRDLoss

    return [(name, m) for name, m in module.named_modules() if isinstance(m, CRDLoss)]


def wrap(distiller: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """The module the training step calls: ``distiller`` itself in a world of one, else
    ``DistributedDataParallel(distiller)`` (see the module doc)."""
    if not active():
        return distiller
    if sync_bn and device.type != "cuda":
        raise ValueError("sync_bn=true needs one GPU per process: SyncBatchNorm has no CPU kernel")
    if sync_bn:
        distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)
    ignored = []
    for name, crd in _crd_losses(distiller):
        if not crd.sharded:  # replicated banks start equal on every rank: rank 0's, once
            for buffer in crd.buffers():  # the banks, log Z and the RNG state
                dist.broadcast(buffer, 0)
        ignored += [f"{name}.{buffer}" for buffer, _ in crd.named_buffers()]
    if getattr(distiller, "teacher", None) is not None:  # frozen and equal everywhere: no per-step broadcast
        ignored += [f"teacher.{buffer}" for buffer, _ in distiller.teacher.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, ignored)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(distiller, device_ids=ids, forward_sync_buffers=True)


def average_gradients(params) -> None:
    """Average the gradients of ``params`` over the ranks (for steps outside DDP, such as the
    initialisation stage of FT / AB / FSP); nothing in a world of one."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size()
        torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])


def reduce_sums(values: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
    """Σ over ranks of each value (loss sums, sample and hit counts): one all-reduce."""
    names = list(values)
    if not names:
        return {}
    first = next((v for v in values.values() if isinstance(v, torch.Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
    stacked = torch.stack([torch.as_tensor(values[n], dtype=torch.float64, device=device).reshape(()).to(torch.float64)
                           for n in names])
    if active():
        if dist.get_backend() == "nccl" and stacked.device.type != "cuda":
            stacked = stacked.cuda()
        dist.all_reduce(stacked)
    return dict(zip(names, stacked.unbind(0)))


def scaled_recipe(recipe):
    """``recipe`` with ``optim.lr`` × global batch / ``optim.reference_batch`` when that is set."""
    reference = recipe.optim.reference_batch
    if reference is None:
        return recipe
    lr = recipe.optim.lr * recipe.data.batch_size * world_size() / reference
    return dataclasses.replace(recipe, optim=dataclasses.replace(recipe.optim, lr=lr, reference_batch=None))


def _sharded(module: nn.Module) -> bool:
    return active() and any(crd.sharded for _, crd in _crd_losses(module))


def shard_path(path: str, rank_: int, epoch: int) -> str:
    """Where rank ``rank_`` > 0 keeps its bank shards of the checkpoint ``path`` of ``epoch``."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.rank{rank_}.epoch{epoch}{ext}"


def save(path: str, state: Callable[[], dict], module: nn.Module, epoch: int) -> None:
    """Write the checkpoint ``state()`` to ``path`` from rank 0 (atomically).

    When a CRD loss shards its banks, each rank r > 0 first writes its losses' state to
    :func:`shard_path` (``last.rank<r>.epoch<E>.pt``), all ranks meet, and only then rank 0
    writes ``path``: ``path`` is the commit point, so whatever moment a rank dies at, the
    ``path`` on disk names an epoch whose shard files are all complete. After it, each rank
    removes its shard files of earlier epochs.
    """
    sharded = _sharded(module)
    if sharded and not is_main():
        save_checkpoint(shard_path(path, rank(), epoch), {"epoch": epoch, "losses": module.criteria.state_dict()})
    if sharded:
        dist.barrier()
    if is_main():
        save_checkpoint(path, state())
    if sharded:
        dist.barrier()
        if not is_main():
            keep = os.path.basename(shard_path(path, rank(), epoch))
            stem = os.path.basename(os.path.splitext(path)[0])
            folder = os.path.dirname(os.path.abspath(path))
            for name in os.listdir(folder):
                if name.startswith(f"{stem}.rank{rank()}.epoch") and name != keep:
                    os.unlink(os.path.join(folder, name))


def load(path: str, module: nn.Module, map_location=None) -> dict:
    """The checkpoint at ``path`` as this rank resumes it: with its own bank shards (from the
    shard file of the checkpoint's epoch) when a CRD loss shards its banks."""
    state = load_checkpoint(path, map_location=map_location)
    if _sharded(module) and not is_main():
        shard = load_checkpoint(shard_path(path, rank(), state["epoch"]), map_location=map_location)
        state["losses"] = shard["losses"]
    return state

