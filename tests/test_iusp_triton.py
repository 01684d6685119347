"""The Triton kernels of fastkd::iusp_loss against its float64 contract (fastkd.ops.iusp).

Unmarked tests are small: without a GPU they run through Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1), fp32 / fp16 only. The ``cuda`` test repeats the check at B = 64, T = 500 with bf16 too, and
through the public functional with its backward.
"""
import pytest
import torch

import fastkd
from fastkd import functional as fk
from fastkd.ops import iusp, iusp_triton

from _tolerances import TOL, rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def frames(b, t, c_s, c_t, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, c_s, generator=g).to(device, dtype), torch.randn(b, t, c_t, generator=g).to(device, dtype))


def check(f_s, f_t, lengths, dtype):
    want = iusp.iusp_with_grad_reference(f_s.double().cpu(), f_t.double().cpu(), lengths.cpu())
    got = iusp_triton.iusp_loss(f_s, f_t, lengths)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert rel(got[0], want[0], floor=0.1) <= TOL[dtype]
    for m, w in zip(got[1:], want[1:]):
        assert m.shape == w.shape and rel(m, w, floor=1e-8) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,t,lengths", [(1, 1, [1]), (3, 9, [9, 1, 5]), (2, 17, [17, 16])])
def test_matches_contract(b, t, lengths, dtype):
    f_s, f_t = frames(b, t, 40, 33, dtype, seed=t)
    check(f_s, f_t, torch.tensor(lengths, device=DEVICE), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_benchmark_shape_and_backward(dtype):
    f_s, f_t = frames(64, 500, 128, 512, dtype, seed=1)
    lengths = torch.randint(1, 501, (64,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    check(f_s, f_t, lengths, dtype)
    x = f_s.detach().requires_grad_()
    with fastkd.use_backend("triton"):
        fk.iusp_loss(x, f_t, lengths).backward()
    ref = f_s.detach().double().cpu().requires_grad_()
    iusp.iusp_reference(ref, f_t.double().cpu(), lengths.cpu()).backward()
    assert rel(x.grad, ref.grad, floor=1e-8) <= TOL[dtype]
