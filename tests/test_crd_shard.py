"""The sharded CRD step's decomposition, in one process (no process group: W = 1).

Against :func:`fastkd.ops.crd.nce_reference` (the published computation, autograd gradients) in
float64: one shard holding every row gives the same loss, Z and gradients; two shards with a
known Z give losses and gradients that add up to the whole; gradcheck of its precomputed
gradients; the shard initialisation is the matching rows of the full bank's.
"""
import math

import pytest
import torch

from fastkd.losses.contrastive import _bank_rows
from fastkd.ops import crd, crd_shard

G, K, N, D, T = 6, 9, 30, 5, 0.2


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    v_s = torch.nn.functional.normalize(torch.randn(G, D, generator=g, dtype=torch.float64), dim=1)
    v_t = torch.nn.functional.normalize(torch.randn(G, D, generator=g, dtype=torch.float64), dim=1)
    memory_s = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    memory_t = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    idx = torch.randperm(N, generator=g)[:G]
    cidx = torch.cat([idx[:, None], torch.randint(0, N, (G, K), generator=g)], dim=1)
    return v_s.requires_grad_(), v_t.requires_grad_(), memory_s, memory_t, cidx


def _reference(z):
    v_s, v_t, memory_s, memory_t, cidx = _inputs()
    loss, z_s, z_t = crd.nce_reference(v_s, v_t, memory_s, memory_t, cidx, z.clone(), z.clone(), T, N)
    loss.backward()
    return loss.detach(), z_s, z_t, v_s.grad, v_t.grad


def _shard(start, rows, z, z_known):
    v_s, v_t, memory_s, memory_t, cidx = _inputs()
    spare = torch.zeros(1, D, dtype=torch.float64)
    shard_s = torch.cat([memory_s[start:start + rows], spare])
    shard_t = torch.cat([memory_t[start:start + rows], spare])
    loss, z_s, z_t = crd_shard.nce_sharded(v_s, v_t, shard_s, shard_t, cidx, start, rows, z.clone(), z.clone(), T, N,
                                           z_known=z_known)
    loss.backward()
    return loss.detach(), z_s, z_t, v_s.grad, v_t.grad


def test_one_shard_of_everything_is_the_published_step():
    unknown = torch.tensor(float("-inf"), dtype=torch.float64)  # log Z: not estimated
    ref, mine = _reference(unknown), _shard(0, N, unknown, z_known=False)
    assert float(mine[0]) == pytest.approx(float(ref[0]), rel=1e-12)
    for a, b in zip(mine[1:], ref[1:]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert math.isfinite(float(ref[1])) and float(ref[1]) != float(ref[2])


@pytest.mark.parametrize("cut", [1, 13, 29])
def test_two_shards_add_up_to_the_whole(cut):
    z = torch.tensor(2.5, dtype=torch.float64)  # log Z, known: each shard uses it as it is
    ref = _reference(z)
    low, high = _shard(0, cut, z, True), _shard(cut, N - cut, z, True)
    assert float(low[0] + high[0]) == pytest.approx(float(ref[0]), rel=1e-12)
    assert float(low[0]) != pytest.approx(float(ref[0]))  # each shard holds only part of it
    for i in (3, 4):
        assert torch.allclose(low[i] + high[i], ref[i], rtol=1e-12, atol=1e-14)
    assert float(low[1]) == float(z) and float(high[2]) == float(z)


def test_gradcheck_of_the_precomputed_gradients():
    v_s, v_t, memory_s, memory_t, cidx = _inputs(3)
    spare = torch.zeros(1, D, dtype=torch.float64)
    z = torch.tensor(1.7, dtype=torch.float64)

    def loss(a, b):
        return crd_shard.nce_sharded(a, b, torch.cat([memory_s[5:20], spare]), torch.cat([memory_t[5:20], spare]),
                                     cidx, 5, 15, z, z, T, N, z_known=True)[0]

    assert torch.autograd.gradcheck(loss, (v_s.detach().requires_grad_(), v_t.detach().requires_grad_()))


def test_shard_initialisation_is_the_full_banks_rows():
    torch.manual_seed(4)
    bound = 0.3
    full = torch.rand(N, D).mul_(2 * bound).add_(-bound)
    after_full = torch.rand(3)
    for start, rows in ((0, 16), (16, 16), (27, 5)):
        torch.manual_seed(4)
        part = _bank_rows(N, D, bound, start, rows)
        assert part.shape == (rows + 1, D)
        have = min(rows, N - start)
        assert torch.equal(part[:have], full[start:start + have])
        assert torch.equal(torch.rand(3), after_full)  # the generator advanced as for the full bank
