"""CRD's state stays sound: Z is kept as log Z in fp32 whatever dtype the module is cast to, never
inf or NaN; the loss is finite at small temperatures on every backend and equals a float64
evaluation of the published formula exp(s/T)/Z wherever that is finite; a feature of the wrong
width is refused by name; checkpoints round-trip, and old ones (Z itself, ``z_s`` / ``z_t``) load.
"""
import copy
import math

import numpy as np
import pytest
import torch

import fastkd
from fastkd.ops import crd, crd_triton

EPS = 1e-7


def np_embed(f, linear):
    """rownorm(f W^T + b) in float64 numpy."""
    w, b = linear.weight.detach().double().numpy(), linear.bias.detach().double().numpy()
    e = f.reshape(f.shape[0], -1).detach().double().numpy() @ w.T + b
    return e / np.sqrt((e * e).sum(1, keepdims=True))


def published(v, bank, cidx, z, temperature, num_data):
    """One NCE side as RepDistiller writes it, in float64: x = exp(s/T), Z = mean(x)·N when ``z`` is None,
    P = x/Z; (loss, Z). inf / NaN where float64 overflows (s/T > 709)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        x = np.exp(np.einsum("bkd,bd->bk", bank[cidx], v) / temperature)
        z = x.mean() * num_data if z is None else z
        p = x / z
        noise = (cidx.shape[1] - 1) / num_data
        total = np.log(p[:, 0] / (p[:, 0] + noise + EPS)).sum() + np.log(noise / (p[:, 1:] + noise + EPS)).sum()
    return -total / len(v), z


def state_of(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(module, before):
    after = module.state_dict()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


# --- log Z in fp32 under half-precision casts -----------------------------------------------------------

@pytest.mark.parametrize("backend", fastkd.backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_module_keeps_log_z_in_fp32_and_finite(dtype, backend):
    torch.manual_seed(0)
    full = fastkd.CRDLoss(24, 20, 50_000, feat_dim=32, num_negatives=256, seed=1)
    half = copy.deepcopy(full).to(dtype)  # Z ≈ 9e5 here: beyond fp16's 65504
    assert half.embed_s.weight.dtype == half.memory_s.dtype == dtype
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        f_s, f_t = torch.randn(16, 24, generator=g), torch.randn(16, 20, generator=g)
        idx = torch.randint(0, 50_000, (16,), generator=g)
        with fastkd.use_backend(backend):
            want, got = full(f_s, f_t, idx), half(f_s.to(dtype), f_t.to(dtype), idx)
        assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-3)
        for name in ("z_s", "z_t"):
            z = getattr(half, name)
            assert torch.isfinite(z) and z.item() > 65504 and z.item() == pytest.approx(getattr(full, name).item(),
                                                                                          rel=1e-2)
    assert half.log_z_s.dtype == half.log_z_t.dtype == torch.float32
    assert half.half().log_z_s.dtype == torch.float32
    assert half.double().log_z_s.dtype == torch.float64  # never narrower than fp32, wider when asked


def test_casts_keep_log_z_unrounded_and_move_it():
    loss_fn = fastkd.CRDLoss(8, 8, 100, feat_dim=8, num_negatives=8, seed=0)
    loss_fn(torch.randn(4, 8), torch.randn(4, 8), torch.arange(4))
    exact = loss_fn.log_z_s.clone()
    assert torch.equal(loss_fn.to(torch.bfloat16).to(torch.float16).float().log_z_s, exact)
    assert loss_fn.to("meta").log_z_s.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_state_dict_round_trips(dtype):
    a = fastkd.CRDLoss(8, 8, 100, feat_dim=8, num_negatives=8, seed=0).to(dtype)
    a(torch.randn(4, 8).to(dtype), torch.randn(4, 8).to(dtype), torch.arange(4))
    state = copy.deepcopy(a.state_dict())
    assert state["log_z_s"].dtype == torch.float32 and "z_s" not in state
    b = fastkd.CRDLoss(8, 8, 100, feat_dim=8, num_negatives=8, seed=5).to(dtype)
    b.load_state_dict(state)
    assert_same_state(b, state)
    step = torch.randn(4, 8).to(dtype), torch.randn(4, 8).to(dtype), torch.arange(4, 8)
    assert torch.equal(a(*step), b(*step))


def test_a_checkpoint_with_z_itself_loads_as_log_z():
    reference = fastkd.CRDLoss(8, 8, 100, feat_dim=8, num_negatives=8, seed=0)
    state = dict(reference.state_dict())
    del state["log_z_s"], state["log_z_t"]
    state["z_s"], state["z_t"] = torch.tensor(2.4e5), torch.tensor(-1.0)  # the former buffers (fp32)
    loaded = fastkd.CRDLoss(8, 8, 100, feat_dim=8, num_negatives=8, seed=3)
    loaded.load_state_dict(state)
    assert loaded.log_z_s.dtype == torch.float32
    assert loaded.log_z_s.item() == pytest.approx(math.log(2.4e5), rel=1e-7)
    assert loaded.log_z_t.item() == float("-inf") and loaded.z_t.item() == -1.0  # not estimated yet
    assert loaded.z_s.item() == pytest.approx(2.4e5, rel=1e-6)
    state["z_s"] = torch.tensor(3.0e4, dtype=torch.float16)  # from a module cast with .half()
    loaded.load_state_dict(state)
    assert loaded.z_s.item() == pytest.approx(3.0e4, rel=1e-3)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_checkpoint_with_an_overflowed_z_is_refused_before_loading(bad):
    loss_fn = fastkd.CRDLoss(8, 8, 100, feat_dim=8, num_negatives=8, seed=0)
    before = state_of(loss_fn)
    state = dict(loss_fn.state_dict())
    del state["log_z_s"]
    state["z_s"] = torch.tensor(bad, dtype=torch.float16)
    with pytest.raises(ValueError, match="^z_s in the checkpoint is .*set it to -1"):
        loss_fn.load_state_dict(state)
    state = dict(loss_fn.state_dict(), log_z_t=torch.tensor(bad))
    with pytest.raises(ValueError, match="^log_z_t in the checkpoint is"):
        loss_fn.load_state_dict(state)
    assert_same_state(loss_fn, before)


# --- small temperatures ----------------------------------------------------------------------------------

def run_steps(backend, temperature, dtype, steps=4, N=300, K=64, B=8, D=32):
    """CRD steps on one batch (as an epoch revisits a sample: positives' scores grow towards 1, so the
    published x = exp(s/T) overflows float64 at T = 1e-3); each step's loss against the float64 formula."""
    torch.manual_seed(0)
    loss_fn = fastkd.CRDLoss(24, 20, N, feat_dim=D, num_negatives=K, temperature=temperature, seed=1).to(dtype)
    g = torch.Generator().manual_seed(2)
    f_s, f_t = torch.randn(B, 24, generator=g).to(dtype), torch.randn(B, 20, generator=g).to(dtype)
    idx = torch.randperm(N, generator=g)[:B]
    z = [None, None]
    results = []
    for _ in range(steps):
        cidx = torch.randint(0, N, (B, K + 1), generator=g)
        cidx[:, 0] = idx
        mem_s, mem_t = loss_fn.memory_s.double().numpy().copy(), loss_fn.memory_t.double().numpy().copy()
        a, z[0] = published(np_embed(f_s, loss_fn.embed_s), mem_t, cidx.numpy(), z[0], temperature, N)
        b, z[1] = published(np_embed(f_t, loss_fn.embed_t), mem_s, cidx.numpy(), z[1], temperature, N)
        with fastkd.use_backend(backend):
            got = loss_fn(f_s, f_t, idx, cidx)
        results.append((got.item(), a + b))
    return results, loss_fn


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("backend", fastkd.backends())
@pytest.mark.parametrize("temperature", [1e-3, 3e-3, 1e-2])
def test_small_temperatures_are_finite_and_match_the_published_formula(temperature, backend, dtype, rtol):
    results, loss_fn = run_steps(backend, temperature, dtype)
    assert all(math.isfinite(got) for got, _ in results), results
    compared = [(got, want) for got, want in results if math.isfinite(want)]
    for got, want in compared:
        assert got == pytest.approx(want, rel=rtol)
    assert len(compared) >= 2  # the comparison is not vacuous
    if temperature == 1e-3:  # here the published form overflows float64 on some steps; ours stays finite
        assert len(compared) < len(results)
    for log_z in (loss_fn.log_z_s, loss_fn.log_z_t):
        assert log_z.dtype == dtype and torch.isfinite(log_z)


@pytest.mark.native
@pytest.mark.parametrize("z_momentum", [0.0, 0.5])
def test_native_op_keeps_log_z_finite_at_small_temperature(z_momentum):
    gen = torch.Generator().manual_seed(4)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=gen, dtype=torch.float64), dim=1)  # noqa: E731
    v_s, v_t, mem_s, mem_t = unit(6, 16), unit(6, 16), unit(40, 16), unit(40, 16)
    mem_t[:6] = v_s  # positives at s = 1: exp(s/T) = e^1000 at T = 1e-3
    idx, rng = torch.arange(6), torch.tensor([3, 1])
    for log_z in (float("-inf"), 20.0):  # estimated from the batch (≈ 1000), or known and far below it
        z = torch.tensor(log_z)
        args = (v_s, v_t, mem_s, mem_t, idx, None, z, z.clone(), rng, 9, 1e-3, z_momentum, False)
        got = torch.ops.fastkd.crd_nce(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                         else a for a in args])
        want = crd.nce_with_grad_reference(*args)
        for g, w in zip(got, want):
            assert torch.isfinite(g).all()
        assert got[0].item() == pytest.approx(want[0].item(), rel=1e-5)
        assert got[1].item() == pytest.approx(want[1].item(), abs=1e-3)  # log Z ≈ 1000: Z to 1e-3
        assert got[1].dtype == torch.float32


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.float16])
def test_triton_launcher_at_small_temperature(bank_dtype):
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(5)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=gen, dtype=torch.float64), dim=1)  # noqa: E731
    v_s, v_t, mem_s, mem_t = unit(3, 16), unit(3, 16), unit(30, 16), unit(30, 16)
    mem_t[:3] = v_s
    args = dict(v_s=v_s, v_t=v_t, memory_s=mem_s, memory_t=mem_t, idx=torch.arange(3), contrast_idx=None,
                log_z_s=torch.tensor(float("-inf")), log_z_t=torch.tensor(30.0),
                rng_state=torch.tensor([7, 2]), num_negatives=13, temperature=1e-3, z_momentum=0.5,
                shared_negatives=False)
    want = crd.nce_with_grad_reference(**args)
    narrow = {k: (v.to(bank_dtype) if k.startswith("memory") else v.float())
              if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}
    got = crd_triton.nce(**narrow, block_k=16)
    for g in got:
        assert torch.isfinite(g).all()
    # fp16 banks: the rounded rows move s/T by up to ~5e-4·1000
    tol = 1e-5 if bank_dtype == torch.float32 else 0.3
    want = crd.nce_with_grad_reference(**dict(args, memory_s=mem_s.to(bank_dtype).double(),
                                              memory_t=mem_t.to(bank_dtype).double()))
    assert got[0].item() == pytest.approx(want[0].item(), rel=tol)
    assert got[1].item() == pytest.approx(want[1].item(), abs=1e-3)
    assert got[2].item() == pytest.approx(want[2].item(), abs=1e-3)


def test_temperature_whose_logits_overflow_fp32_is_refused():
    with pytest.raises(ValueError, match="^temperature"):
        fastkd.CRDLoss(4, 4, 10, temperature=1e-40)


# --- the feature width -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", fastkd.backends())
def test_a_feature_of_the_wrong_width_is_refused_by_name(backend):
    loss_fn = fastkd.CRDLoss(12, 10, 30, feat_dim=8, num_negatives=4, seed=3)
    before = state_of(loss_fn)
    idx = torch.arange(4)
    with fastkd.use_backend(backend):
        with pytest.raises(ValueError, match=r"^f_s has 11 features per sample \(shape \(4, 11\)\) but s_dim = 12"):
            loss_fn(torch.randn(4, 11), torch.randn(4, 10), idx)
        with pytest.raises(ValueError, match=r"^f_t has 20 features per sample \(shape \(4, 5, 2, 2\)\) but t_dim = 10"):
            loss_fn(torch.randn(4, 12), torch.randn(4, 5, 2, 2), idx)
        assert_same_state(loss_fn, before)
        assert torch.isfinite(loss_fn(torch.randn(4, 3, 2, 2), torch.randn(4, 10, 1, 1), idx))  # flattened: 12, 10
