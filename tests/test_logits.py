"""KDLoss / DKDLoss and fastkd.functional.kd_loss / dkd_loss against independent float64 derivations."""
import math

import numpy as np
import pytest
import torch

import fastkd
from fastkd import functional as F

SHAPES = [(1, 2), (1, 7), (2, 5), (5, 3), (9, 11), (16, 100)]


def logits(shape, dtype=torch.float64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def targets(batch, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randint(0, num_classes, (batch,), generator=g)


def py_lse(row):
    """log Σ exp of a list of floats, with explicit loops."""
    top = max(row)
    return top + math.log(sum(math.exp(v - top) for v in row))


def py_log_softmax(row):
    lse = py_lse(row)
    return [v - lse for v in row]


def ref_kd(s, t, T):
    """T² Σ_b Σ_c p_t (log p_t − log p_s) / B, sample by sample, class by class."""
    s, t = s.double().tolist(), t.double().tolist()
    total = 0.0
    for row_s, row_t in zip(s, t):
        log_ps = py_log_softmax([v / T for v in row_s])
        log_pt = py_log_softmax([v / T for v in row_t])
        total += sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_ps, log_pt))
    return T * T * total / len(s)


def ref_dkd(s, t, y, alpha, beta, T):
    """mdistiller's DKD in numpy: binary [p_gt, 1 − p_gt] KL and the KL of the non-target softmax."""
    s, t, y = s.double().numpy() / T, t.double().numpy() / T, y.numpy()
    tckd = nckd = 0.0
    for b in range(s.shape[0]):
        p_s = np.exp(s[b] - s[b].max()) / np.exp(s[b] - s[b].max()).sum()
        p_t = np.exp(t[b] - t[b].max()) / np.exp(t[b] - t[b].max()).sum()
        b_s = np.array([p_s[y[b]], 1.0 - p_s[y[b]]])
        b_t = np.array([p_t[y[b]], 1.0 - p_t[y[b]]])
        tckd += float((b_t * np.log(b_t / b_s)).sum())
        other = [c for c in range(s.shape[1]) if c != y[b]]
        q_s = p_s[other] / p_s[other].sum()
        q_t = p_t[other] / p_t[other].sum()
        nckd += float((q_t * np.log(q_t / q_s)).sum())
    return (alpha * tckd + beta * nckd) * T * T / s.shape[0]


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_matches_float64_derivation(shape, T):
    s, t = logits(shape, seed=1), logits(shape, seed=2)
    got = F.kd_loss(s, t, temperature=T)
    assert got.shape == () and got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_kd(s, t, T), rel=1e-10, abs=1e-12)


def test_kd_fp32_and_identical_logits():
    s, t = logits((7, 13), torch.float32, seed=3), logits((7, 13), torch.float32, seed=4)
    assert F.kd_loss(s, t).item() == pytest.approx(ref_kd(s, t, 4.0), rel=1e-5)
    assert F.kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert F.kd_loss(s, t).item() > 0.1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 3.0)])
def test_dkd_matches_mdistiller_formula(shape, alpha, beta, T):
    s, t = logits(shape, seed=5), logits(shape, seed=6)
    y = targets(shape[0], shape[1])
    got = F.dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=T)
    assert got.shape == () and got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_dkd(s, t, y, alpha, beta, T), rel=1e-9, abs=1e-12)


def test_dkd_fp32():
    s, t = logits((6, 9), torch.float32, seed=7), logits((6, 9), torch.float32, seed=8)
    y = targets(6, 9)
    assert F.dkd_loss(s, t, y).item() == pytest.approx(ref_dkd(s, t, y, 1.0, 8.0, 4.0), rel=1e-5)


def test_dkd_confident_student_stays_finite():
    """p_gt rounds to 1 in fp32 (log(1 − p) = −inf in mdistiller); log-sum-exp keeps it exact."""
    s = logits((3, 5), torch.float32, scale=1.0, seed=9)
    t = logits((3, 5), torch.float32, scale=1.0, seed=10)
    y = torch.tensor([0, 2, 4])
    s[torch.arange(3), y] += 400.0
    s.requires_grad_(True)
    loss = F.dkd_loss(s, t, y, temperature=4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # reference: log(1 − p_gt) = lse(others) − lse(all), in float64 with loops
    zs, zt = s.detach().double() / 4.0, t.double() / 4.0
    tckd = nckd = 0.0
    for b in range(3):
        others = [c for c in range(5) if c != y[b]]
        log_b_s = [zs[b, y[b]].item() - py_lse(zs[b].tolist()), py_lse(zs[b, others].tolist()) - py_lse(zs[b].tolist())]
        log_b_t = [zt[b, y[b]].item() - py_lse(zt[b].tolist()), py_lse(zt[b, others].tolist()) - py_lse(zt[b].tolist())]
        tckd += sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_b_s, log_b_t))
        q_s, q_t = py_log_softmax(zs[b, others].tolist()), py_log_softmax(zt[b, others].tolist())
        nckd += sum(math.exp(lt) * (lt - ls) for ls, lt in zip(q_s, q_t))
    assert tckd > 50  # the confident student is far from the teacher
    assert loss.item() == pytest.approx((tckd + 8.0 * nckd) * 16 / 3, rel=1e-5)


# ---------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_logits(dtype, rel):
    s = logits((8, 37), dtype, seed=11).requires_grad_(True)
    t = logits((8, 37), dtype, seed=12)
    y = targets(8, 37)
    kd, dkd = F.kd_loss(s, t), F.dkd_loss(s, t, y)
    assert kd.dtype == torch.float32 and dkd.dtype == torch.float32
    assert kd.item() == pytest.approx(ref_kd(s.detach(), t, 4.0), rel=rel)
    assert dkd.item() == pytest.approx(ref_dkd(s.detach(), t, y, 1.0, 8.0, 4.0), rel=rel)
    (kd + dkd).backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


# ---------------------------------------------------------------- gradients


def test_kd_gradcheck():
    s = logits((3, 5), seed=13).requires_grad_(True)
    t = logits((3, 5), seed=14).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: F.kd_loss(a, b, temperature=2.0), (s, t))


def test_dkd_gradcheck():
    s = logits((4, 5), seed=15).requires_grad_(True)
    t = logits((4, 5), seed=16).requires_grad_(True)
    y = torch.tensor([0, 4, 2, 2])
    assert torch.autograd.gradcheck(lambda a, b: F.dkd_loss(a, b, y, 1.0, 8.0, 2.0), (s, t))


def test_dkd_gradcheck_single_sample_two_classes():
    s = logits((1, 2), seed=17).requires_grad_(True)
    t = logits((1, 2), seed=18)
    y = torch.tensor([1])
    assert torch.autograd.gradcheck(lambda a: F.dkd_loss(a, t, y), (s,))


# ---------------------------------------------------------------- modules


def test_modules_equal_functional():
    s, t, y = logits((5, 7), seed=19), logits((5, 7), seed=20), targets(5, 7)
    assert fastkd.KDLoss(temperature=3.0)(s, t).item() == F.kd_loss(s, t, 3.0).item()
    assert fastkd.KDLoss()(s, t).item() == F.kd_loss(s, t).item() == pytest.approx(ref_kd(s, t, 4.0), rel=1e-10)
    dkd = fastkd.DKDLoss(alpha=0.5, beta=6.0, temperature=2.0)
    assert dkd(s, t, y).item() == F.dkd_loss(s, t, y, 0.5, 6.0, 2.0).item()
    default = fastkd.DKDLoss()
    assert default(s, t, y).item() == F.dkd_loss(s, t, y).item()
    assert (default.alpha, default.beta, default.temperature, default.warmup) == (1.0, 8.0, 4.0, 20.0)


@pytest.mark.parametrize("epoch,factor", [(0, 0.0), (1, 0.05), (5, 0.25), (20, 1.0), (240, 1.0)])
def test_dkd_warmup(epoch, factor):
    s, t, y = logits((4, 6), seed=21), logits((4, 6), seed=22), targets(4, 6)
    ref = ref_dkd(s, t, y, 1.0, 8.0, 4.0)
    assert fastkd.DKDLoss()(s, t, y, epoch=epoch).item() == pytest.approx(factor * ref, rel=1e-9, abs=1e-15)
    assert fastkd.DKDLoss(warmup=10)(s, t, y, epoch=5).item() == pytest.approx(0.5 * ref, rel=1e-9)


def test_losses_run_on_meta_without_reading_data():
    """No host sync in the math: with value checks off the losses run on data-less meta tensors."""
    s, t = torch.empty(4, 10, device="meta"), torch.empty(4, 10, device="meta")
    y = torch.empty(4, dtype=torch.int64, device="meta")
    with fastkd.value_checks(False):
        for loss in (F.kd_loss(s, t), F.dkd_loss(s, t, y), fastkd.DKDLoss()(s, t, y, epoch=3)):
            assert loss.shape == () and loss.device.type == "meta"


# ---------------------------------------------------------------- errors


def test_kd_errors():
    s, t = logits((3, 5)), logits((3, 5), seed=1)
    with pytest.raises(TypeError, match="logits_s"):
        F.kd_loss(s.tolist(), t)
    with pytest.raises(TypeError, match="logits_t"):
        F.kd_loss(s, t.long())
    with pytest.raises(TypeError, match="logits_t"):
        F.kd_loss(s, t.float())
    with pytest.raises(ValueError, match="logits_t"):
        F.kd_loss(s, t[:, :4])
    with pytest.raises(ValueError, match="logits_t"):
        F.kd_loss(s, t[:2])
    with pytest.raises(ValueError, match="logits_s"):
        F.kd_loss(s[0], t[0])
    bad = t.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="logits_t contains NaN"):
        F.kd_loss(s, bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="logits_t contains Inf"):
        fastkd.KDLoss()(s, bad)
    with pytest.raises(ValueError, match="temperature"):
        F.kd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fastkd.KDLoss(temperature=-1.0)
    with pytest.raises(TypeError, match="temperature"):
        F.kd_loss(s, t, temperature="4")


def test_dkd_errors():
    s, t, y = logits((3, 5)), logits((3, 5), seed=1), torch.tensor([0, 1, 4])
    with pytest.raises(ValueError, match="target"):
        F.dkd_loss(s, t, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="target"):
        F.dkd_loss(s, t, torch.tensor([0, -1, 2]))
    with pytest.raises(TypeError, match="target"):
        F.dkd_loss(s, t, y.int())
    with pytest.raises(TypeError, match="target"):
        F.dkd_loss(s, t, [0, 1, 4])
    with pytest.raises(ValueError, match="target"):
        F.dkd_loss(s, t, y[:2])
    with pytest.raises(ValueError, match="logits_t"):
        F.dkd_loss(s, t[:, :4], y)
    with pytest.raises(TypeError, match="logits_t"):
        F.dkd_loss(s, t.half(), y)
    bad = s.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits_s contains NaN"):
        fastkd.DKDLoss()(bad, t, y)
    with pytest.raises(ValueError, match="at least 2"):
        F.dkd_loss(s[:, :1], t[:, :1], torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="epoch"):
        fastkd.DKDLoss()(s, t, y, epoch=-1)
    with pytest.raises(ValueError, match="warmup"):
        fastkd.DKDLoss(warmup=0)
    with pytest.raises(TypeError, match="beta"):
        F.dkd_loss(s, t, y, beta=None)
