"""SSKD (rotations, similarity transfer with selection) and STKD (mixup, a reconstruction) against float64
derivations written out here: SSKD's published selection as its argsort steps, KL row by row in numpy."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

import fastkd
from fastkd import functional as fk

from _helpers import arr, close, rand  # noqa: E402


def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def published_selection(scores, target, ratio):
    """SSKD's train_student.py steps: rank of the target in each row, argsort of the ranks, keep the
    correct rows and int(wrong · ratio) of the others, indices sorted."""
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.argmax(order == target[:, None], axis=1)
    index = np.argsort(rank, kind="stable")
    wrong = int(np.count_nonzero(rank))
    keep = len(rank) - wrong + int(wrong * ratio)
    return np.sort(index[:keep])


def cosine_rows(rotated, upright):
    out = np.zeros((len(rotated), len(upright)))
    for i, a in enumerate(rotated):
        for j, b in enumerate(upright):
            out[i, j] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return out


def views(e):
    """(upright [B, D], rotated [3B, D]) of a [4B, D] array in SSKD's interleaved order, by explicit loops."""
    batch = len(e) // 4
    return (np.stack([e[4 * b] for b in range(batch)]),
            np.stack([e[4 * b + r] for b in range(batch) for r in (1, 2, 3)]))


def test_rotations_interleave_the_four_views():
    x = rand(2, 3, 5, 5)
    out = fk.rotations(x)
    assert out.shape == (8, 3, 5, 5)
    for b in range(2):
        for r in range(4):
            assert torch.equal(out[4 * b + r], torch.rot90(x[b], r, dims=(1, 2)))
    with pytest.raises(ValueError, match="images"):
        fk.rotations(rand(2, 3, 4, 5))


def test_cosine_similarity_matrix_and_rotation_similarity():
    a, b = rand(7, 5), rand(4, 5, seed=1)
    expected = nnf.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=2)
    assert torch.allclose(fk.cosine_similarity_matrix(a, b), expected, rtol=1e-12)
    e = rand(12, 6, seed=2)
    upright, rotated = views(arr(e))
    assert np.allclose(arr(fk.rotation_similarity(e)), cosine_rows(rotated, upright), rtol=1e-12)
    with pytest.raises(ValueError, match="embeddings"):
        fk.rotation_similarity(rand(10, 6))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_rotation_contrast_loss_against_derivation(temperature):
    e = rand(16, 5, seed=3)
    upright, rotated = views(arr(e))
    s = cosine_rows(rotated, upright) / temperature
    source = np.repeat(np.arange(4), 3)
    expected = float(-log_softmax(s)[np.arange(12), source].mean())
    close(fk.rotation_contrast_loss(e, temperature), expected)
    loss = fastkd.RotationContrastLoss(5, temperature).double()
    close(loss(e), float(fk.rotation_contrast_loss(loss.head(e), temperature).detach()))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selected_rows_match_the_published_argsort_steps(ratio, seed):
    scores = rand(30, 6, seed=seed)
    target = torch.randint(0, 6, (30,), generator=torch.Generator().manual_seed(seed))
    target[:8] = scores[:8].argmax(dim=1)  # some rows the scorer gets right
    mask = fk.selected_rows(scores, target, ratio)
    assert np.array_equal(np.flatnonzero(mask.numpy()), published_selection(arr(scores), target.numpy(), ratio))


def kl_selected(z_t, z_s, keep, temperature):
    lp_t, lp_s = log_softmax(z_t / temperature), log_softmax(z_s / temperature)
    rows = [float((np.exp(lp_t[r]) * (lp_t[r] - lp_s[r])).sum()) for r in keep]
    return temperature**2 * sum(rows) / max(len(rows), 1)


@pytest.mark.parametrize("ratio", [0.75, 0.0])
def test_sskd_similarity_loss_against_derivation(ratio):
    e_s, e_t = rand(20, 4, seed=4), rand(20, 6, seed=5)
    up_s, rot_s = views(arr(e_s))
    up_t, rot_t = views(arr(e_t))
    s_s, s_t = cosine_rows(rot_s, up_s), cosine_rows(rot_t, up_t)
    keep = published_selection(s_t, np.repeat(np.arange(5), 3), ratio)
    assert 0 < len(keep) < 15 or ratio > 0
    close(fk.sskd_similarity_loss(e_s, e_t, 0.5, ratio), kl_selected(s_t, s_s, keep, 0.5))


def test_rotation_kd_loss_against_derivation():
    z_s, z_t = 3 * rand(16, 5, seed=6), 3 * rand(16, 5, seed=7)
    y = torch.tensor([0, 4, 2, 2])
    _, rot_s = views(arr(z_s))
    _, rot_t = views(arr(z_t))
    for ratio in (1.0, 0.5):
        keep = published_selection(rot_t, np.repeat(y.numpy(), 3), ratio)
        close(fk.rotation_kd_loss(z_s, z_t, y, 4.0, ratio), kl_selected(rot_t, rot_s, keep, 4.0))
    close(fastkd.RotationKDLoss()(z_s, z_t, y), kl_selected(rot_t, rot_s, range(12), 4.0))


def test_sskd_gradchecks():
    e_s, e_t = rand(8, 3, seed=8).requires_grad_(), rand(8, 4, seed=9)
    assert torch.autograd.gradcheck(lambda e: fk.sskd_similarity_loss(e, e_t, 0.5, 0.75), (e_s,))
    z_s, z_t = rand(8, 5, seed=10).requires_grad_(), rand(8, 5, seed=11)
    y = torch.tensor([1, 3])
    assert torch.autograd.gradcheck(lambda z: fk.rotation_kd_loss(z, z_t, y, 4.0, 0.5), (z_s,))
    e = rand(8, 3, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(lambda e: fk.rotation_contrast_loss(e, 0.5), (e,))


def test_sskd_loss_module_uses_the_frozen_teacher_head():
    torch.manual_seed(0)
    stage1 = fastkd.RotationContrastLoss(6).double()
    loss = fastkd.SSKDLoss(4, 6).double()
    loss.load_teacher_head(stage1.state_dict())
    for p, q in zip(loss.head_t.parameters(), stage1.head.parameters()):
        assert torch.equal(p, q) and not p.requires_grad
    f_s, f_t = rand(12, 4, seed=13), rand(12, 6, seed=14)
    value = loss(f_s, f_t)
    close(value, float(fk.sskd_similarity_loss(loss.head_s(f_s), stage1.head(f_t), 0.5, 0.75).detach()), rel=1e-12)
    value.backward()
    assert all(p.grad is not None for p in loss.head_s.parameters())
    assert all(p.grad is None for p in loss.head_t.parameters())
    loss.train()
    assert not loss.head_t.training


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_stkd_loss_against_derivation(lam):
    z_s, z_t = 2 * rand(6, 4, seed=15), 2 * rand(6, 4, seed=16)
    y_a, y_b = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 3, 0, 1, 2, 2])
    lp_s = log_softmax(arr(z_s))
    ce_a, ce_b = -lp_s[np.arange(6), y_a.numpy()].mean(), -lp_s[np.arange(6), y_b.numpy()].mean()
    expected = lam * ce_a + (1 - lam) * ce_b + 0.7 * kl_selected(arr(z_t), arr(z_s), range(6), 4.0)
    close(fk.stkd_loss(z_s, z_t, y_a, y_b, lam, beta=0.7, temperature=4.0), float(expected))
    close(fastkd.STKDLoss(beta=0.7)(z_s, z_t, y_a, y_b, lam), float(expected))
    z = z_s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: fk.stkd_loss(z, z_t, y_a, y_b, lam, 0.7), (z,))


def test_stkd_mix():
    torch.manual_seed(0)
    x, y = rand(8, 3, 4, 4), torch.arange(8)
    mixed, y_a, y_b, lam = fastkd.STKDLoss(alpha=0.4).mix(x, y)
    assert 0 <= lam <= 1 and torch.equal(y_a, y) and sorted(y_b.tolist()) == list(range(8))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[y_b])
    with pytest.raises(ValueError, match="lam"):
        fk.stkd_loss(rand(2, 3), rand(2, 3), torch.tensor([0, 1]), torch.tensor([1, 0]), 1.5)
    with pytest.raises(ValueError, match="alpha"):
        fastkd.STKDLoss(alpha=0.0)
    assert math.isfinite(float(fk.stkd_loss(rand(2, 3), rand(2, 3), torch.tensor([0, 1]), torch.tensor([1, 0]), 0.5)))
