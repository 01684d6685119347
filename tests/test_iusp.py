"""IUSP (fastkd.functional.iusp_loss, IUSPLoss, the op fastkd::iusp_loss): against a float64 derivation written
here entry by entry, against SP where the two coincide, padding and masks, gradcheck, every CPU backend against
the contract, and the input errors."""
import math

import pytest
import torch

import fastkd
from fastkd import functional as fk
from fastkd.ops import iusp as ops

from _helpers import rand
from _tolerances import TOL, rel


def derived(f_s, f_t, lengths):
    """(1/B) Σ_b Σ_{i,j<L_b} (G^s_ij/‖G^s_i‖ − G^t_ij/‖G^t_i‖)² / L_b², entry by entry in Python floats."""
    total = 0.0
    for b in range(f_s.shape[0]):
        n = int(lengths[b])
        per = 0.0
        for i in range(n):
            rows = []
            for f in (f_s[b], f_t[b]):
                g = [sum(float(f[i, c]) * float(f[j, c]) for c in range(f.shape[1])) for j in range(n)]
                norm = max(math.sqrt(sum(v * v for v in g)), 1e-12)
                rows.append([v / norm for v in g])
            per += sum((a - c) ** 2 for a, c in zip(*rows))
        total += per / (n * n)
    return total / f_s.shape[0]


def frames(b=3, t=6, c_s=5, c_t=4, seed=0, dtype=torch.float64):
    return rand(b, t, c_s, seed=seed, dtype=dtype), rand(b, t, c_t, seed=seed + 1, dtype=dtype)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_matches_the_derivation(backend):
    if backend not in fastkd.backends():
        pytest.skip("the native extension fastkd._C was not built")
    f_s, f_t = frames()
    lengths = torch.tensor([6, 2, 4])
    with fastkd.use_backend(backend):
        assert fk.iusp_loss(f_s, f_t).item() == pytest.approx(derived(f_s, f_t, [6, 6, 6]), rel=1e-12)
        assert fk.iusp_loss(f_s, f_t, lengths).item() == pytest.approx(derived(f_s, f_t, lengths), rel=1e-12)
        assert fastkd.IUSPLoss()(f_s, f_t, lengths).item() == pytest.approx(derived(f_s, f_t, lengths), rel=1e-12)


def test_the_contract_matches_the_derivation_and_the_eager_gradient():
    f_s, f_t = frames(seed=3)
    lengths = torch.tensor([1, 5, 6])
    loss, m_s, m_t = ops.iusp_with_grad_reference(f_s, f_t, lengths)
    assert loss.item() == pytest.approx(derived(f_s, f_t, lengths), rel=1e-12)
    x_s, x_t = f_s.clone().requires_grad_(), f_t.clone().requires_grad_()
    ops.iusp_reference(x_s, x_t, lengths).backward()
    torch.testing.assert_close(m_s @ f_s, x_s.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m_t @ f_t, x_t.grad, rtol=1e-10, atol=1e-12)
    pairs = ops.frame_pairs(lengths, 6)
    assert (m_s[~pairs] == 0).all() and (m_t[~pairs] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_one_sequence_is_sp_of_its_frames(backend):
    """B = 1: the frames are SP's batch, and IUSP's /L² is SP's /b²; B > 1: the mean of the per-sequence SPs."""
    if backend not in fastkd.backends():
        pytest.skip("the native extension fastkd._C was not built")
    f_s, f_t = frames(b=4, t=7, c_s=9, c_t=3, seed=5)
    with fastkd.use_backend(backend):
        one = fk.iusp_loss(f_s[:1], f_t[:1])
        torch.testing.assert_close(one, fk.sp_loss(f_s[0], f_t[0]), rtol=1e-12, atol=0)
        per = torch.stack([fk.sp_loss(s, t) for s, t in zip(f_s, f_t)])
        torch.testing.assert_close(fk.iusp_loss(f_s, f_t), per.mean(), rtol=1e-12, atol=0)
        lengths = torch.tensor([7, 3, 5, 1])
        per = torch.stack([fk.sp_loss(s[:n], t[:n]) for s, t, n in zip(f_s, f_t, lengths.tolist())])
        torch.testing.assert_close(fk.iusp_loss(f_s, f_t, lengths), per.mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_padding_changes_nothing_and_gets_no_gradient(backend):
    if backend not in fastkd.backends():
        pytest.skip("the native extension fastkd._C was not built")
    f_s, f_t = frames(seed=7)
    lengths = torch.tensor([4, 6, 2])
    noisy_s, noisy_t = f_s.clone(), f_t.clone()
    for b, n in enumerate(lengths.tolist()):
        noisy_s[b, n:] = 1e3 * rand(6 - n, 5, seed=b)
        noisy_t[b, n:] = float("nan") if n < 6 else 0.0  # never read
    with fastkd.use_backend(backend), fastkd.value_checks(False):
        x = noisy_s.clone().requires_grad_()
        loss = fk.iusp_loss(x, noisy_t, lengths)
        loss.backward()
        torch.testing.assert_close(loss, fk.iusp_loss(f_s, f_t, lengths), rtol=1e-12, atol=0)
    for b, n in enumerate(lengths.tolist()):
        assert (x.grad[b, n:] == 0).all()


def test_a_mask_anywhere_equals_its_lengths():
    f_s, f_t = frames(seed=9)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    x = f_s.clone().requires_grad_()
    got = fk.iusp_loss(x, f_t, mask=mask)
    got.backward()
    want = torch.stack([fk.sp_loss(s[m], t[m]) for s, t, m in zip(f_s, f_t, mask)]).mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert (x.grad[~mask] == 0).all() and (x.grad[:2][mask[:2]] != 0).all()  # (one frame: y = ±1, no gradient)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_gradcheck(backend):
    if backend not in fastkd.backends():
        pytest.skip("the native extension fastkd._C was not built")
    f_s, f_t = frames(b=2, t=4, c_s=3, c_t=5, seed=11)
    lengths = torch.tensor([4, 3])
    with fastkd.use_backend(backend):
        assert torch.autograd.gradcheck(lambda s, t: fk.iusp_loss(s, t, lengths),
                                        (f_s.requires_grad_(), f_t.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_values_and_gradients_match_the_contract(dtype):
    """The native op in fp32 / fp16 / bf16 against the float64 contract, within DESIGN.md's tolerances."""
    if "native" not in fastkd.backends():
        pytest.skip("the native extension fastkd._C was not built")
    f_s, f_t = frames(b=5, t=33, c_s=40, c_t=24, seed=13)
    lengths = torch.tensor([33, 1, 17, 32, 8])
    want = ops.iusp_with_grad_reference(f_s, f_t, lengths)
    got = torch.ops.fastkd.iusp_loss(f_s.to(dtype), f_t.to(dtype), lengths)
    assert got[0].dtype == torch.float32
    assert rel(got[0], want[0], floor=0.1) <= TOL[dtype]
    for m, w in zip(got[1:], want[1:]):
        assert m.shape == (5, 33, 33) and rel(m, w, floor=1e-8) <= TOL[dtype]


def test_errors_name_the_argument():
    f_s, f_t = frames()
    with pytest.raises(ValueError, match="f_s must have 3 dimensions"):
        fk.iusp_loss(f_s[0], f_t[0])
    with pytest.raises(ValueError, match="f_t has batch size 2"):
        fk.iusp_loss(f_s, f_t[:2])
    with pytest.raises(ValueError, match="f_t has 5 frames"):
        fk.iusp_loss(f_s, f_t[:, :5])
    with pytest.raises(ValueError, match="f_s has batch size 0"):
        fk.iusp_loss(f_s[:0], f_t[:0])
    with pytest.raises(ValueError, match="f_s has no frames"):
        fk.iusp_loss(f_s[:, :0], f_t[:, :0])
    with pytest.raises(ValueError, match=r"lengths holds 7, outside \[1, 6\]"):
        fk.iusp_loss(f_s, f_t, torch.tensor([6, 7, 1]))
    with pytest.raises(ValueError, match=r"lengths holds 0, outside \[1, 6\]"):
        fk.iusp_loss(f_s, f_t, torch.tensor([6, 0, 1]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(3,\)"):
        fk.iusp_loss(f_s, f_t, torch.tensor([6, 6]))
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        fk.iusp_loss(f_s, f_t, torch.tensor([6.0, 6.0, 6.0]))
    with pytest.raises(ValueError, match="give lengths or mask, not both"):
        fk.iusp_loss(f_s, f_t, torch.tensor([6, 6, 6]), torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask has a sequence without a real frame"):
        fk.iusp_loss(f_s, f_t, mask=torch.ones(3, 6, dtype=torch.bool).index_fill(0, torch.tensor([1]), False))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        fk.iusp_loss(f_s, f_t, mask=torch.ones(3, 6))
