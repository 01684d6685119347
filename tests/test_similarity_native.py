"""The native CPU kernels of the batch-relation ops against their torch contracts (fastkd.ops.similarity,
fastkd.ops.nst), run in float64: values, both M matrices / gradients, odd batch sizes, every dtype; RKD's
angle term with duplicated rows and any thread count."""
import pytest
import torch

from fastkd.ops import nst, similarity

from _tolerances import TOL, rel

pytestmark = pytest.mark.native

EXTRA = {"sp_loss": (), "cckd_loss": (0.4, 2), "pkt_loss": (1e-7,), "rkd_distance_loss": (), "rkd_angle_loss": ()}


def pair(b, d_s, d_t, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d_s, generator=g).to(dtype), torch.randn(b, d_t, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("b", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("name", EXTRA)
def test_matches_contract(name, b, dtype):
    if name == "rkd_distance_loss" and b == 1:
        b = 2
    f_s, f_t = pair(b, 40, 33, dtype, seed=b)
    want = similarity.REFERENCES[name](f_s.double(), f_t.double(), *EXTRA[name])
    got = getattr(torch.ops.fastkd, name)(f_s, f_t, *EXTRA[name])
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # the loss relative to max(|loss|, 0.1): PKT's and SP's losses at b = 1 are sums of cancelling terms near 0
    assert rel(got[0], want[0], floor=0.1) <= TOL[dtype]
    for m, w in zip(got[1:], want[1:]):
        assert m.shape == (b, b)
        assert rel(m, w, floor=1e-8) <= TOL[dtype]


@pytest.mark.parametrize("name", ["cckd_loss", "pkt_loss", "sp_loss"])
def test_zero_rows(name):
    """A zero sample: the clamped / ε-shifted norms, no NaN, the contract's M."""
    f_s, f_t = pair(5, 8, 6, torch.float64, seed=1)
    f_s[2] = 0
    want = similarity.REFERENCES[name](f_s, f_t, *EXTRA[name])
    got = getattr(torch.ops.fastkd, name)(f_s, f_t, *EXTRA[name])
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_pkt_log_ratios_over_many_decades(eps):
    """PKT's vectorised fp32 log over ratios (P_t + eps) / (P_s + eps) from ~1 to ~1/eps: antipodal student
    rows (one-hot rows and their negatives) make S_s = (c + 1) / 2 vanish to within rounding. Where S_s is
    that small the fp32 result depends on how the norms round (the ε in ‖x‖ + ε moves it by ~1e-7), so the
    oracle is the torch contract evaluated in fp32 too, whose logs are torch's."""
    basis = torch.eye(6)
    student = [basis[k] for k in range(6)] + [-basis[k] for k in range(5)] + [3 * basis[0] + 4 * basis[1]]
    f_s = torch.stack(student)  # 12 rows: a partial last pack
    f_t = torch.randint(0, 4, (12, 9), generator=torch.Generator().manual_seed(0)).float()  # cosines ≥ 0
    want = similarity.pkt_with_grad_reference(f_s, f_t, eps)
    got = torch.ops.fastkd.pkt_loss(f_s, f_t, eps)
    assert rel(got[0], want[0]) <= 1e-5
    for m, w in zip(got[1:], want[1:]):
        assert rel(m, w, floor=1e-8) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rkd_angle_duplicated_rows(dtype):
    """Exact duplicates (student rows 5, 6 = rows 0, 3; teacher row 6 = row 2) and a zero row: the contract's zero
    differences, no NaN."""
    f_s, f_t = pair(7, 9, 5, dtype, seed=3)
    f_s[5], f_s[6], f_t[6] = f_s[0], f_s[3], f_t[2]
    f_s[1] = 0
    want = similarity.rkd_angle_with_grad_reference(f_s.double(), f_t.double())
    got = torch.ops.fastkd.rkd_angle_loss(f_s, f_t)
    assert all(torch.isfinite(g).all() for g in got)
    assert rel(got[0], want[0]) <= TOL[dtype] and rel(got[1], want[1]) <= TOL[dtype]


def test_rkd_angle_does_not_depend_on_the_thread_count():
    """Integer-valued inputs, so that the Grams are exact whatever BLAS's blocking (its sums may depend on the
    thread count): the epilogue's sums run in a fixed order."""
    f_s, f_t = (x.round().clamp(-4, 4) for x in pair(37, 20, 12, torch.float32, seed=4))
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.fastkd.rkd_angle_loss(f_s, f_t))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert torch.equal(out[0], outs[0][0]) and torch.equal(out[1], outs[0][1])


def test_cckd_orders():
    f_s, f_t = pair(9, 12, 7, torch.float32, seed=2)
    for order in (0, 1, 4):
        want = similarity.cckd_with_grad_reference(f_s.double(), f_t.double(), 1.1, order)
        got = torch.ops.fastkd.cckd_loss(f_s, f_t, 1.1, order)
        assert all(rel(g, w, floor=1e-3) <= 1e-5 for g, w in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("c_s,c_t,hw", [(12, 7, 9), (40, 50, 9), (3, 5, 16), (1, 2, 4)])  # spatial and channel forms
@pytest.mark.parametrize("b", [1, 3])
def test_nst_matches_contract(b, c_s, c_t, hw, dtype):
    g = torch.Generator().manual_seed(c_s)
    f_s, f_t = torch.randn(b, c_s, hw, generator=g).to(dtype), torch.randn(b, c_t, hw, generator=g).to(dtype)
    want = nst.nst_with_grad_reference(f_s.double(), f_t.double())
    got = torch.ops.fastkd.nst_loss(f_s, f_t)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert rel(got[0], want[0], floor=1e-3) <= TOL[dtype]
    assert rel(got[1], want[1], floor=1e-8) <= TOL[dtype] and rel(got[2], want[2], floor=1e-8) <= TOL[dtype]


def test_errors():
    f = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="batch sizes differ"):
        torch.ops.fastkd.sp_loss(f, torch.randn(5, 3))
    with pytest.raises(RuntimeError, match=r"\[B, D\]"):
        torch.ops.fastkd.pkt_loss(f, torch.randn(4, 3, 1), 1e-7)
    with pytest.raises(RuntimeError, match="order"):
        torch.ops.fastkd.cckd_loss(f, f, 0.4, -1)
    with pytest.raises(RuntimeError, match="rkd_angle_loss: student and teacher dtypes differ"):
        torch.ops.fastkd.rkd_angle_loss(f, f.double())
    with pytest.raises(RuntimeError, match="HW"):
        torch.ops.fastkd.nst_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
