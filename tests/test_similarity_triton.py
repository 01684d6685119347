"""The Triton kernels of the batch-relation ops against their torch contracts (fastkd.ops.similarity).

Unmarked tests are small: without a GPU they run through Triton's interpreter on CPU tensors (conftest.py
sets TRITON_INTERPRET=1), fp32 / fp16 only. The ``cuda`` tests repeat the checks at b = 256 with bf16 too,
and through the public functionals.
"""
import pytest
import torch

import fastkd
from fastkd import functional as fk
from fastkd.ops import nst, nst_triton, similarity, similarity_triton

from _tolerances import TOL, rel

EXTRA = {"sp_loss": (), "cckd_loss": (0.4, 3), "pkt_loss": (1e-7,), "rkd_distance_loss": (), "rkd_angle_loss": ()}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pair(b, d_s, d_t, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d_s, generator=g).to(device, dtype), torch.randn(b, d_t, generator=g).to(device, dtype)


def check(name, b, d_s, d_t, dtype, seed=0):
    f_s, f_t = pair(b, d_s, d_t, dtype, seed)
    want = similarity.REFERENCES[name](f_s.double(), f_t.double(), *EXTRA[name])
    got = getattr(similarity_triton, name)(f_s, f_t, *EXTRA[name])
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert rel(got[0], want[0], floor=0.1) <= TOL[dtype]
    for m, w in zip(got[1:], want[1:]):
        assert m.shape == (b, b) and rel(m, w, floor=1e-8) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b", [1, 3, 17])
@pytest.mark.parametrize("name", EXTRA)
def test_matches_contract(name, b, dtype):
    check(name, max(b, 2) if name == "rkd_distance_loss" else b, 40, 33, dtype, seed=b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b", [2, 5])
def test_rkd_angle_odd_sizes_and_duplicated_rows(b, dtype):
    """B = 2 and odd B, widths 1 and 7; then exact duplicates (zero differences: the contract's zero angles)."""
    check("rkd_angle_loss", b, 1, 7, dtype, seed=11)
    f_s, f_t = pair(7, 9, 5, dtype, seed=12)
    f_s[5], f_s[6], f_t[6] = f_s[0], f_s[3], f_t[2]
    want = similarity.rkd_angle_with_grad_reference(f_s.double(), f_t.double())
    got = similarity_triton.rkd_angle_loss(f_s, f_t)
    assert torch.isfinite(got[1]).all()
    assert rel(got[0], want[0], floor=0.1) <= TOL[dtype] and rel(got[1], want[1], floor=1e-8) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,c_s,c_t,hw", [(1, 12, 7, 9), (3, 3, 5, 16), (2, 20, 24, 4)])  # spatial, channel, spatial
def test_nst_matches_contract(b, c_s, c_t, hw, dtype):
    g = torch.Generator().manual_seed(c_s)
    f_s = torch.randn(b, c_s, hw, generator=g).to(DEVICE, dtype)
    f_t = torch.randn(b, c_t, hw, generator=g).to(DEVICE, dtype)
    want = nst.nst_with_grad_reference(f_s.double(), f_t.double())
    got = nst_triton.nst_loss(f_s, f_t)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    assert rel(got[0], want[0], floor=1e-3) <= TOL[dtype]
    assert rel(got[1], want[1], floor=1e-8) <= TOL[dtype] and rel(got[2], want[2], floor=1e-8) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_product(dtype):
    x = pair(17, 70, 1, dtype, seed=4)[0]
    m = torch.randn(17, 17, generator=torch.Generator().manual_seed(5)).to(x.device)
    scale = torch.tensor(-2.5, device=x.device)
    got = similarity_triton.relation_grad(x, m, scale)
    assert got.dtype == dtype
    assert rel(got, similarity.relation_grad_reference(x.double(), m.double(), scale.double())) <= TOL[dtype]


def test_float64_runs_the_reference_and_errors_name_the_input():
    f_s, f_t = pair(3, 4, 5, torch.float64, seed=6)
    got = similarity_triton.sp_loss(f_s, f_t)
    torch.testing.assert_close(got[0], similarity.sp_with_grad_reference(f_s, f_t)[0])
    with pytest.raises(ValueError, match="batch size"):
        similarity_triton.pkt_loss(f_s, f_t[:2], 1e-7)
    with pytest.raises(ValueError, match="teacher"):
        similarity_triton.cckd_loss(f_s, f_t[0], 0.4, 2)
    with pytest.raises(TypeError, match="student"):
        similarity_triton.rkd_distance_loss(f_s.long(), f_t)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", EXTRA)
def test_gpu_sizes(name, dtype):
    check(name, 256, 16384, 1000, dtype, seed=7)


@pytest.mark.cuda
@pytest.mark.parametrize("fn,shape", [(fk.sp_loss, (64, 32, 8, 8)), (fk.nst_loss, (64, 256, 8, 8)),
                                      (fk.cckd_loss, (64, 128)), (fk.pkt_loss, (64, 128)), (fk.rkd_loss, (64, 128))])
def test_gpu_functionals_and_gradients(fn, shape):
    g = torch.Generator().manual_seed(8)
    f_s, f_t = torch.randn(shape, generator=g).cuda(), torch.randn(shape, generator=g).cuda()
    results = []
    for backend in ("torch", "triton"):
        s = f_s.clone().requires_grad_()
        with fastkd.use_backend(backend):
            loss = fn(s, f_t)
        (loss * 1.5).backward()
        results.append((loss.detach(), s.grad))
    assert rel(results[1][0], results[0][0]) <= 1e-5 and rel(results[1][1], results[0][1]) <= 1e-4
