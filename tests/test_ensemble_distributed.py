"""EnsembleCRDLoss under torch.distributed, step by step: 2 gloo processes (spawned here) against one process
holding the whole global batch, for each backend and option (Z moving average, shared negatives, dataset-side
contrast indices), with two teachers of different widths."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd

WORLD, PER_RANK, STEPS, N, K, S_DIM, T_DIMS, D = 2, 6, 3, 40, 12, 6, (10, 7), 8
LR = 0.5
CONFIGS = {
    "torch": dict(backend="torch"),
    "native": dict(backend="native"),
    "z_momentum": dict(backend="native", z_momentum=0.6),
    "shared": dict(backend="native", shared_negatives=True),
    "contrast_idx": dict(backend="native", given=True),
}


def _batches():
    """STEPS global batches: the student's and both teachers' features, indices (one repeated across the two
    ranks' halves, so the update order matters) and dataset-side contrast indices."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        size = PER_RANK * WORLD
        idx = torch.randperm(N, generator=g)[:size]
        idx[-1] = idx[0]
        cidx = torch.cat([idx[:, None], torch.randint(0, N, (size, K), generator=g)], dim=1)
        teachers = [torch.randn(size, t, generator=g) for t in T_DIMS]
        out.append((torch.randn(size, S_DIM, generator=g), teachers, idx, cidx))
    return out


def _run(options, rows=slice(None)):
    """(loss per step, the first student embed's weight after each SGD step, the module) on rows ``rows``."""
    torch.manual_seed(0)
    extra = {k: v for k, v in options.items() if k in ("z_momentum", "shared_negatives")}
    crd = fastkd.EnsembleCRDLoss(S_DIM, list(T_DIMS), N, feat_dim=D, num_negatives=K, seed=11, **extra)
    losses, weights = [], []
    with fastkd.use_backend(options["backend"]):
        for f_s, f_t, idx, cidx in _batches():
            loss = crd(f_s[rows], [f[rows] for f in f_t], idx[rows], cidx[rows] if options.get("given") else None)
            crd.zero_grad()
            loss.backward()
            if dist.is_initialized():
                for p in crd.parameters():
                    dist.all_reduce(p.grad)
                    p.grad.div_(WORLD)  # as DDP averages
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= WORLD
            with torch.no_grad():
                for p in crd.parameters():
                    p -= LR * p.grad
            losses.append(float(loss.detach()))
            weights.append(crd.embed_s[1].weight.detach().clone())
    return losses, weights, crd


def _worker(rank, store, output):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results = {}
    for name, options in CONFIGS.items():
        if options["backend"] not in fastkd.backends():
            continue
        losses, weights, crd = _run(options, slice(rank * PER_RANK, (rank + 1) * PER_RANK))
        results[name] = {"losses": losses, "weights": weights, "memory_s": crd.memory_s, "memory_t": crd.memory_t,
                         "log_z": (crd.log_z_s.clone(), crd.log_z_t.clone()), "rng": crd.rng_state.clone()}
    torch.save(results, os.path.join(output, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ensemble-crd-dist")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_step_like_one_process_on_the_global_batch(ranks, name):
    options = CONFIGS[name]
    if options["backend"] not in fastkd.backends():
        pytest.skip(f"backend {options['backend']} is not built here")
    losses, weights, crd = _run(options)
    for rank in ranks:
        got = rank[name]
        assert got["losses"] == pytest.approx(losses, rel=1e-5)
        for mine, ref in zip(got["weights"], weights):
            assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(got["log_z"][0], crd.log_z_s, rtol=1e-5)
        assert torch.allclose(got["log_z"][1], crd.log_z_t, rtol=1e-5)
        assert torch.equal(got["rng"], crd.rng_state)
        for key in ("memory_s", "memory_t"):
            assert torch.allclose(got[key], getattr(crd, key), rtol=1e-5, atol=1e-6)
    for key in ("memory_s", "memory_t"):  # replicated banks: bit-identical on both ranks
        assert torch.equal(ranks[0][name][key], ranks[1][name][key])
    assert len(set(losses)) == STEPS  # the steps did something
