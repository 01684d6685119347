"""CRDLoss and fastkd.functional.crd_loss against an independent float64 derivation."""
import copy
import math

import numpy as np
import pytest
import torch

import fastkd
from fastkd import functional as F

N, D, K = 40, 6, 7


def np_embed(f, linear):
    """rownorm(f W^T + b) in float64 numpy."""
    w = linear.weight.detach().double().numpy()
    b = linear.bias.detach().double().numpy()
    e = f.reshape(f.shape[0], -1).detach().double().numpy() @ w.T + b
    return e / np.sqrt((e * e).sum(1, keepdims=True))


def np_side(anchor, bank, cidx, z, T, n_data):
    """One NCE side with explicit loops: returns (loss, Z used)."""
    B, cols = cidx.shape
    x = np.empty((B, cols))
    for b in range(B):
        for k in range(cols):
            x[b, k] = math.exp(sum(bank[cidx[b, k], d] * anchor[b, d] for d in range(anchor.shape[1])) / T)
    if z is None or z < 0:
        z = x.mean() * n_data
    p = x / z
    noise = (cols - 1) / n_data
    total = 0.0
    for b in range(B):
        total += math.log(p[b, 0] / (p[b, 0] + noise + 1e-7))
        for k in range(1, cols):
            total += math.log(noise / (p[b, k] + noise + 1e-7))
    return -total / B, z


def np_update(bank, idx, v, m):
    """Row by row, from the bank before the update; a repeated index keeps its last row."""
    new = bank.copy()
    for i, row in enumerate(idx):
        mixed = m * bank[row] + (1 - m) * v[i]
        new[row] = mixed / math.sqrt((mixed * mixed).sum())
    return new


def make_step(B=5, s_dim=9, t_dim=11, seed=0, n=N, k=K, d=D):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(B, s_dim, generator=g, dtype=torch.float64)
    f_t = torch.randn(B, t_dim, generator=g, dtype=torch.float64)
    idx = torch.randint(0, n, (B,), generator=g)
    cidx = torch.randint(0, n, (B, k + 1), generator=g)
    cidx[:, 0] = idx
    return f_s, f_t, idx, cidx


def make_loss(s_dim=9, t_dim=11, n=N, d=D, k=K, **kw):
    torch.manual_seed(1)
    return fastkd.CRDLoss(s_dim, t_dim, n, feat_dim=d, num_negatives=k, **kw).double()


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("B", [1, 2, 5])
def test_step_matches_float64_derivation(backend, B):  # auto: the fused op (native on CPU)
    loss_fn = make_loss()
    f_s, f_t, idx, cidx = make_step(B)
    idx[-1] = idx[0]  # a repeated index inside the batch
    mem_s = loss_fn.memory_s.numpy().copy()
    mem_t = loss_fn.memory_t.numpy().copy()
    v_s, v_t = np_embed(f_s, loss_fn.embed_s), np_embed(f_t, loss_fn.embed_t)
    c = cidx.numpy()
    want_s, z_s = np_side(v_s, mem_t, c, None, 0.07, N)
    want_t, z_t = np_side(v_t, mem_s, c, None, 0.07, N)
    with fastkd.use_backend(backend):
        got = loss_fn(f_s, f_t, idx, cidx)
    assert got.dim() == 0
    assert got.item() == pytest.approx(want_s + want_t, rel=1e-10)
    assert loss_fn.z_s.item() == pytest.approx(z_s, rel=1e-10)
    assert loss_fn.z_t.item() == pytest.approx(z_t, rel=1e-10)
    np.testing.assert_allclose(loss_fn.memory_s.numpy(), np_update(mem_s, idx.numpy(), v_s, 0.5), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(loss_fn.memory_t.numpy(), np_update(mem_t, idx.numpy(), v_t, 0.5), rtol=1e-10, atol=1e-12)


def test_z_is_fixed_after_the_first_batch_and_backward_sees_old_banks():
    loss_fn = make_loss()
    loss_fn(*make_step(4, seed=1))
    z_s, z_t = loss_fn.z_s.clone(), loss_fn.z_t.clone()
    f_s, f_t, idx, cidx = make_step(4, seed=2)
    f_s.requires_grad_(True)
    mem_t = loss_fn.memory_t.numpy().copy()
    out = loss_fn(f_s, f_t, idx, cidx)
    assert torch.equal(loss_fn.z_s, z_s) and torch.equal(loss_fn.z_t, z_t)
    want, _ = np_side(np_embed(f_s, loss_fn.embed_s), mem_t, cidx.numpy(), z_s.item(), 0.07, N)
    # gradient of the student side against the pre-update teacher bank, by central differences
    out.backward()
    eps = 1e-6
    for j in (0, 3):
        bumped = f_s.detach().clone()
        bumped[1, j] += eps
        up, _ = np_side(np_embed(bumped, loss_fn.embed_s), mem_t, cidx.numpy(), z_s.item(), 0.07, N)
        bumped[1, j] -= 2 * eps
        down, _ = np_side(np_embed(bumped, loss_fn.embed_s), mem_t, cidx.numpy(), z_s.item(), 0.07, N)
        assert f_s.grad[1, j].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
    assert want > 0


def test_functional_matches_derivation_and_leaves_banks_alone():
    g = torch.Generator().manual_seed(3)
    v_s = F.l2_normalize(torch.randn(3, D, generator=g, dtype=torch.float64))
    v_t = F.l2_normalize(torch.randn(3, D, generator=g, dtype=torch.float64))
    mem_s = F.l2_normalize(torch.randn(N, D, generator=g, dtype=torch.float64))
    mem_t = F.l2_normalize(torch.randn(N, D, generator=g, dtype=torch.float64))
    cidx = torch.randint(0, N, (3, 5), generator=g)
    before = mem_s.clone(), mem_t.clone()
    z = torch.tensor(17.0, dtype=torch.float64)
    got = F.crd_loss(v_s, v_t, mem_s, mem_t, cidx, z, z, temperature=0.2)
    a, _ = np_side(v_s.numpy(), mem_t.numpy(), cidx.numpy(), 17.0, 0.2, N)
    b, _ = np_side(v_t.numpy(), mem_s.numpy(), cidx.numpy(), 17.0, 0.2, N)
    assert got.item() == pytest.approx(a + b, rel=1e-10)
    assert torch.equal(mem_s, before[0]) and torch.equal(mem_t, before[1])
    estimated = F.crd_loss(v_s, v_t, mem_s, mem_t, cidx)
    a, _ = np_side(v_s.numpy(), mem_t.numpy(), cidx.numpy(), None, 0.07, N)
    b, _ = np_side(v_t.numpy(), mem_s.numpy(), cidx.numpy(), None, 0.07, N)
    assert estimated.item() == pytest.approx(a + b, rel=1e-10)


def test_gradcheck_functional_and_module():
    g = torch.Generator().manual_seed(4)
    v_s = torch.randn(3, D, generator=g, dtype=torch.float64, requires_grad=True)
    v_t = torch.randn(3, D, generator=g, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(N, D, generator=g, dtype=torch.float64) * 0.3
    cidx = torch.randint(0, N, (3, 4), generator=g)
    z = torch.tensor(30.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: F.crd_loss(a, b, mem, mem.flip(0), cidx, z, z), (v_s, v_t))

    loss_fn = make_loss()
    loss_fn(*make_step(3, seed=9))  # Z is estimated (without gradient) on the first step: fix it first
    f_s, f_t, idx, cidx = make_step(3)
    f_s.requires_grad_(True)
    f_t.requires_grad_(True)
    # every call starts from the same state (a fresh copy), so the function is pure
    assert torch.autograd.gradcheck(lambda a, b: copy.deepcopy(loss_fn)(a, b, idx, cidx), (f_s, f_t))


def test_embed_parameters_get_gradients_and_4d_features_are_flattened():
    loss_fn = make_loss(s_dim=12, t_dim=8)
    f_s, f_t, idx, cidx = make_step(4, s_dim=12, t_dim=8)
    flat = copy.deepcopy(loss_fn)(f_s, f_t, idx, cidx)
    out = loss_fn(f_s.view(4, 3, 2, 2), f_t.view(4, 8, 1, 1), idx, cidx)
    assert out.item() == pytest.approx(flat.item(), rel=1e-12)
    out.backward()
    for p in (loss_fn.embed_s.weight, loss_fn.embed_t.weight, loss_fn.embed_t.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_given_contrast_idx_makes_a_step_deterministic():
    a, b = make_loss(), make_loss()
    step = make_step(6)
    out_a, out_b = a(*step), b(*step)
    assert torch.equal(out_a, out_b)
    for name in ("memory_s", "memory_t", "z_s", "z_t"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_sampled_negatives_follow_the_seed_and_put_the_positive_first():
    a, b = make_loss(seed=11), make_loss(seed=11)
    idx = torch.tensor([3, 0, 39])
    ca, cb = a.sample_contrast_idx(idx), b.sample_contrast_idx(idx)
    assert torch.equal(ca, cb) and ca.shape == (3, K + 1)
    assert torch.equal(ca[:, 0], idx)
    assert int(ca.min()) >= 0 and int(ca.max()) < N
    assert not torch.equal(make_loss(seed=12).sample_contrast_idx(idx), ca)
    big = fastkd.CRDLoss(4, 4, 1000, feat_dim=4, num_negatives=4000, seed=2).sample_contrast_idx(torch.zeros(8, dtype=torch.long))
    counts = torch.bincount(big[:, 1:].reshape(-1), minlength=1000).double()
    assert counts.mean().item() == pytest.approx(32.0)
    assert counts.std().item() < 8.0  # uniform: Poisson-like spread sqrt(32) ≈ 5.7


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("shared", [False, True])
def test_a_sampled_step_uses_the_announced_negatives_then_advances(backend, shared):
    sampled, given = make_loss(seed=3, shared_negatives=shared), make_loss(seed=3, shared_negatives=shared)
    f_s, f_t, idx, _ = make_step(5)
    cidx = sampled.sample_contrast_idx(idx)
    if shared:
        assert torch.equal(cidx[1:, 1:], cidx[:1, 1:].expand(4, K))
    with fastkd.use_backend(backend):
        out = sampled(f_s, f_t, idx)
        want = given(f_s, f_t, idx, cidx)
    assert out.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.equal(sampled.memory_s, given.memory_s)
    assert sampled.rng_state.tolist() == [3, 1] and given.rng_state.tolist() == [3, 0]
    assert not torch.equal(sampled.sample_contrast_idx(idx), cidx)


def test_state_dict_round_trip_continues_identically():
    a = make_loss(seed=5)
    for s in range(2):
        f_s, f_t, idx, _ = make_step(4, seed=10 + s)
        a(f_s, f_t, idx)
    state = copy.deepcopy(a.state_dict())
    assert {"memory_s", "memory_t", "log_z_s", "log_z_t", "rng_state"} <= set(state)
    b = make_loss(seed=99)
    b.load_state_dict(state)
    for s in range(2, 4):
        f_s, f_t, idx, _ = make_step(4, seed=10 + s)
        assert torch.equal(a(f_s, f_t, idx), b(f_s, f_t, idx))
    for name in ("memory_s", "memory_t", "z_s", "z_t"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_published_initialisation_order_and_bounds():
    torch.manual_seed(7)
    loss_fn = fastkd.CRDLoss(10, 12, 300, feat_dim=128, num_negatives=16)
    torch.manual_seed(7)
    torch.nn.Linear(10, 128), torch.nn.Linear(12, 128)
    bound = 1.0 / math.sqrt(128 / 3)
    mem_v1 = torch.rand(300, 128).mul_(2 * bound).add_(-bound)
    mem_v2 = torch.rand(300, 128).mul_(2 * bound).add_(-bound)
    assert torch.equal(loss_fn.memory_s, mem_v1) and torch.equal(loss_fn.memory_t, mem_v2)
    assert loss_fn.memory_s.abs().max().item() <= bound
    assert loss_fn.z_s.item() < 0 and loss_fn.z_t.item() < 0


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("bad", ["idx_high", "idx_negative", "contrast_high", "contrast_negative"])
def test_bad_index_raises_before_any_bank_row_is_written(backend, bad):
    loss_fn = make_loss()
    f_s, f_t, idx, cidx = make_step(4)
    if bad == "idx_high":
        idx[2] = N
    elif bad == "idx_negative":
        idx[0] = -1
    elif bad == "contrast_high":
        cidx[1, 3] = N + 5
    else:
        cidx[3, 0] = -2
    before = copy.deepcopy(loss_fn.state_dict())
    name = "contrast_idx" if bad.startswith("contrast") else "idx"
    with fastkd.use_backend(backend), pytest.raises(ValueError, match=f"^{name} holds index"):
        loss_fn(f_s, f_t, idx, cidx)
    after = loss_fn.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.native
def test_native_kernel_refuses_bad_index_without_writing_even_unchecked():
    bank = torch.randn(N, D)
    before = bank.clone()
    with fastkd.value_checks(False), pytest.raises(RuntimeError, match="outside"):
        torch.ops.fastkd.crd_bank_update_(bank, torch.tensor([1, 2, N]), torch.randn(3, D), 0.5)
    assert torch.equal(bank, before)


def test_bad_inputs_name_the_argument():
    loss_fn = make_loss()
    f_s, f_t, idx, cidx = make_step(4)
    with pytest.raises(TypeError, match="idx"):
        loss_fn(f_s, f_t, idx.int(), cidx)
    with pytest.raises(ValueError, match="idx"):
        loss_fn(f_s, f_t, idx[:3], cidx)
    with pytest.raises(ValueError, match="contrast_idx"):
        loss_fn(f_s, f_t, idx, cidx[:, :4])
    with pytest.raises(ValueError, match="f_t"):
        loss_fn(f_s, f_t[:3], idx, cidx)
    with pytest.raises(TypeError, match="f_t"):
        loss_fn(f_s, f_t.float(), idx, cidx)
    with pytest.raises(TypeError, match="f_s"):
        loss_fn(f_s.numpy(), f_t, idx, cidx)
    nan = f_s.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="f_s contains NaN"):
        loss_fn(nan, f_t, idx, cidx)
    with pytest.raises(ValueError, match="num_data"):
        fastkd.CRDLoss(4, 4, 0)
    with pytest.raises(ValueError, match="temperature"):
        fastkd.CRDLoss(4, 4, 10, temperature=0.0)
    with pytest.raises(ValueError, match="momentum"):
        fastkd.CRDLoss(4, 4, 10, momentum=1.5)
    with pytest.raises(ValueError, match="num_data must be below 2\\*\\*31"):
        fastkd.CRDLoss(4, 4, 2**31)  # refused before any bank is allocated


def test_nan_embedding_is_refused_before_the_banks_change():
    loss_fn = make_loss()
    with torch.no_grad():
        loss_fn.embed_s.weight.zero_()
        loss_fn.embed_s.bias.zero_()  # every student embedding is 0 / 0
    before = copy.deepcopy(loss_fn.state_dict())
    with pytest.raises(ValueError, match="f_s \\(embedded\\) contains NaN"):
        loss_fn(*make_step(4))
    for key in ("memory_s", "memory_t", "log_z_s", "log_z_t"):
        assert torch.equal(loss_fn.state_dict()[key], before[key])


def test_initial_loss_is_near_the_published_start_value():
    torch.manual_seed(0)
    loss_fn = fastkd.CRDLoss(32, 32, 50000, num_negatives=4096)
    out = loss_fn(torch.randn(16, 32), torch.randn(16, 32), torch.arange(16))
    k = 4096
    # with Z from this batch, P ≈ 1/N for every entry, so each side ≈ log(K+1)+... as published
    start = 2 * ((k / (k + 1)) * 0 + math.log(1 + k) + k * math.log((k + 1) / k))
    assert out.item() == pytest.approx(start, rel=0.05)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_z_moving_average(backend):
    loss_fn = make_loss(z_momentum=0.75)
    loss_fn(*make_step(4, seed=1))
    z0 = loss_fn.z_s.item()
    f_s, f_t, idx, cidx = make_step(4, seed=2)
    v_s = np_embed(f_s, loss_fn.embed_s)
    mem_t = loss_fn.memory_t.numpy().copy()
    with fastkd.use_backend(backend):
        out = loss_fn(f_s, f_t, idx, cidx)
    want, _ = np_side(v_s, mem_t, cidx.numpy(), z0, 0.07, N)  # scored with Z before its update
    _, estimate = np_side(v_s, mem_t, cidx.numpy(), None, 0.07, N)
    assert loss_fn.z_s.item() == pytest.approx(0.75 * z0 + 0.25 * estimate, rel=1e-10)
    assert out.item() > want  # the teacher side adds a positive term


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_banks_track_the_fp32_step(bank_dtype):
    torch.manual_seed(0)
    full = fastkd.CRDLoss(24, 24, 300, feat_dim=64, num_negatives=50, seed=1)
    half = fastkd.CRDLoss(24, 24, 300, feat_dim=64, num_negatives=50, seed=1, bank_dtype=bank_dtype)
    half.load_state_dict({k: v.to(half.state_dict()[k].dtype) for k, v in full.state_dict().items()})
    assert half.memory_s.dtype == bank_dtype
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        f_s, f_t = torch.randn(8, 24, generator=g), torch.randn(8, 24, generator=g)
        idx = torch.randint(0, 300, (8,), generator=g)
        torch.testing.assert_close(half(f_s, f_t, idx), full(f_s, f_t, idx), rtol=1e-2, atol=0)
    torch.testing.assert_close(half.memory_s.float(), full.memory_s, rtol=1e-2, atol=1e-2)


def test_compiles_without_graph_breaks():
    loss_fn = fastkd.CRDLoss(16, 16, 200, feat_dim=8, num_negatives=20, seed=0)
    twin = copy.deepcopy(loss_fn)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    f_s = torch.randn(4, 16, requires_grad=True)
    f_t, idx = torch.randn(4, 16), torch.arange(4)
    with fastkd.value_checks(False):
        out = compiled(f_s, f_t, idx)
        want = twin(f_s, f_t, idx)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=0)
    out.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    torch.testing.assert_close(loss_fn.memory_s, twin.memory_s)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "native"])
def test_whole_step_captures_in_a_cuda_graph(backend):
    if backend not in fastkd.backends() and backend != "auto":
        pytest.skip(f"{backend} is not available")
    torch.manual_seed(0)
    eager = fastkd.CRDLoss(32, 32, 5000, num_negatives=512, seed=3).cuda()
    graphed = copy.deepcopy(eager)
    f_s = torch.randn(16, 32, device="cuda", requires_grad=True)
    f_t = torch.randn(16, 32, device="cuda")
    idx = torch.randint(0, 5000, (16,), device="cuda")
    with fastkd.use_backend(backend):
        eager(f_s, f_t, idx).backward()  # the first step estimates Z outside the graph
        graphed(f_s, f_t, idx).backward()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                graphed(f_s, f_t, idx).backward()
                eager(f_s, f_t, idx).backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = graphed(f_s, f_t, idx)
            out.backward()
        for _ in range(3):
            graph.replay()
            want = eager(f_s, f_t, idx)
            want.backward()
            torch.testing.assert_close(out, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(graphed.memory_s, eager.memory_s, rtol=1e-5, atol=1e-6)
    assert torch.equal(graphed.rng_state, eager.rng_state)  # the offset advanced on the device
