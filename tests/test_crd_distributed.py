"""CRDLoss and EnsembleCRDLoss under torch.distributed, step by step: 2 gloo processes (spawned here) against
one process holding the whole global batch, for each backend and option (replicated and sharded banks, Z moving
average, shared negatives, dataset-side contrast indices; an ensemble of two teachers of different widths)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd

WORLD, PER_RANK, STEPS, N, K, S_DIM, T_DIM, D = 2, 6, 3, 40, 12, 6, 10, 8
T2_DIM = 7  # the ensemble's second teacher
LR = 0.5
CONFIGS = {
    "torch": dict(backend="torch"),
    "native": dict(backend="native"),
    "z_momentum": dict(backend="native", z_momentum=0.6),
    "shared": dict(backend="native", shared_negatives=True),
    "contrast_idx": dict(backend="native", given=True),
    "sharded": dict(backend="torch", shard_banks=True),
    "sharded_all": dict(backend="native", shard_banks=True, z_momentum=0.6, given=True),
    "ensemble_torch": dict(backend="torch", ensemble=True),
    "ensemble_native": dict(backend="native", ensemble=True),
    "ensemble_z_momentum": dict(backend="native", ensemble=True, z_momentum=0.6),
    "ensemble_shared": dict(backend="native", ensemble=True, shared_negatives=True),
    "ensemble_contrast_idx": dict(backend="native", ensemble=True, given=True),
}


def _batches():
    """STEPS global batches: features, indices (one index repeated across the two ranks'
    halves, so the update order matters) and dataset-side contrast indices."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        size = PER_RANK * WORLD
        idx = torch.randperm(N, generator=g)[:size]
        idx[-1] = idx[0]
        cidx = torch.cat([idx[:, None], torch.randint(0, N, (size, K), generator=g)], dim=1)
        out.append((torch.randn(size, S_DIM, generator=g), torch.randn(size, T_DIM, generator=g), idx, cidx,
                    torch.randn(size, T2_DIM, generator=g)))
    return out


def _loss(options):
    torch.manual_seed(0)
    extra = {k: v for k, v in options.items() if k in ("z_momentum", "shared_negatives", "shard_banks")}
    if options.get("ensemble"):
        return fastkd.EnsembleCRDLoss(S_DIM, [T_DIM, T2_DIM], N, feat_dim=D, num_negatives=K, seed=11, **extra)
    return fastkd.CRDLoss(S_DIM, T_DIM, N, feat_dim=D, num_negatives=K, seed=11, **extra)


def _run(options, rows=slice(None)):
    """(loss per step, the (last) student embed's weight after each SGD step, the module) on rows ``rows`` of each
    batch."""
    crd = _loss(options)
    losses, weights = [], []
    with fastkd.use_backend(options["backend"]):
        for f_s, f_t, idx, cidx, f_t2 in _batches():
            teacher = [f_t[rows], f_t2[rows]] if options.get("ensemble") else f_t[rows]
            loss = crd(f_s[rows], teacher, idx[rows], cidx[rows] if options.get("given") else None)
            crd.zero_grad()
            loss.backward()
            grads = [p.grad for p in crd.parameters()]
            if dist.is_initialized():
                for grad in grads:
                    dist.all_reduce(grad)
                    grad.div_(WORLD)  # as DDP averages
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= WORLD
            with torch.no_grad():
                for p in crd.parameters():
                    p -= LR * p.grad
            losses.append(float(loss.detach()))
            embed = crd.embed_s[-1] if options.get("ensemble") else crd.embed_s
            weights.append(embed.weight.detach().clone())
    return losses, weights, crd


def _worker(rank, store, output):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results = {}
    for name, options in CONFIGS.items():
        losses, weights, crd = _run(options, slice(rank * PER_RANK, (rank + 1) * PER_RANK))
        results[name] = {"losses": losses, "weights": weights, "memory_s": crd.memory_s, "memory_t": crd.memory_t,
                         "log_z": (crd.log_z_s.clone(), crd.log_z_t.clone()), "rng": crd.rng_state.clone(),
                         "shard": (getattr(crd, "shard_start", 0), getattr(crd, "shard_rows", N))}
    torch.save(results, os.path.join(output, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crd-dist")
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
        assert torch.allclose(got["log_z"][0], crd.log_z_s, rtol=0, atol=1e-5)  # Z to 1e-5 relative
        assert torch.allclose(got["log_z"][1], crd.log_z_t, rtol=0, atol=1e-5)
        assert torch.equal(got["rng"], crd.rng_state)
        start, rows = got["shard"]
        for key in ("memory_s", "memory_t"):
            assert torch.allclose(got[key][:rows], getattr(crd, key)[start:start + rows], rtol=1e-5, atol=1e-6)
    if options.get("shard_banks"):
        assert [r[name]["shard"] for r in ranks] == [(0, N // 2), (N // 2, N // 2)]
    else:  # replicated banks: bit-identical on both ranks
        for key in ("memory_s", "memory_t"):
            assert torch.equal(ranks[0][name][key], ranks[1][name][key])
    # the losses changed along the trajectory (the steps did something)
    assert len(set(losses)) == STEPS
