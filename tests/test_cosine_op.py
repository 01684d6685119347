"""fastkd::cosine_matrix (SSKD's batch similarity): contract, gradients, the Triton kernel, the functional."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastkd import functional as fk
from fastkd.ops import cosine, cosine_triton

from _tolerances import TOL

EPS = 1e-8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(n, m, d, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(device, dtype), torch.randn(m, d, generator=g).to(device, dtype)


def test_reference_against_a_numpy_derivation_with_a_clamped_row():
    a, b = inputs(5, 4, 7)
    a[2] = 0.0  # its norm is clamped at eps: a zero row of cosines
    na, nb = a.numpy(), b.numpy()
    want = np.array([[na[i] @ nb[j] / (max(np.linalg.norm(na[i]), EPS) * max(np.linalg.norm(nb[j]), EPS))
                      for j in range(4)] for i in range(5)])
    c, inv_a, inv_b = cosine.cosine_matrix_reference(a, b, EPS)
    assert np.allclose(c.numpy(), want, rtol=1e-12, atol=0)
    assert inv_a[2].item() == pytest.approx(1 / EPS) and (c[2] == 0).all()
    assert torch.allclose(inv_b, 1 / b.norm(dim=1))


@pytest.mark.parametrize("eps", [EPS, 0.5])  # 0.5: some rows are clamped, the other branch of the backward
def test_op_gradients_match_autograd_of_normalize_and_gradcheck(eps):
    a, b = inputs(6, 5, 3, seed=1)
    a[1] *= 0.05  # norm well under 0.5
    a.requires_grad_(), b.requires_grad_()
    grad = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 1.7
    c = torch.ops.fastkd.cosine_matrix(a, b, eps)[0]
    got = torch.autograd.grad(c, (a, b), grad)
    want_c = F.normalize(a, dim=1, eps=eps) @ F.normalize(b, dim=1, eps=eps).T
    want = torch.autograd.grad(want_c, (a, b), grad)
    assert torch.allclose(c, want_c, rtol=1e-12, atol=1e-14)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, y: torch.ops.fastkd.cosine_matrix(x, y, eps)[0], (a, b))


def test_opcheck_and_half_inputs_accumulate_in_fp32():
    a, b = inputs(9, 4, 16, dtype=torch.float32, seed=3)
    torch.library.opcheck(torch.ops.fastkd.cosine_matrix.default, (a.requires_grad_(), b, EPS))
    c, inv_a, inv_b = torch.ops.fastkd.cosine_matrix(a.detach().half(), b.half(), EPS)
    assert c.dtype == inv_a.dtype == torch.float32 and c.shape == (9, 4) and inv_b.shape == (4,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,m,d", [(1, 1, 5), (7, 5, 33), (96, 32, 40)])
def test_triton_kernel_against_the_reference(dtype, n, m, d):
    a, b = inputs(n, m, d, dtype=dtype, seed=n, device=DEVICE)
    c, inv_a, inv_b = cosine_triton.cosine_matrix(a, b, EPS)
    want = cosine.cosine_matrix_reference(a.double(), b.double(), EPS)
    for got, w in zip((c, inv_a, inv_b), want):
        assert got.dtype == torch.float32
        assert ((got.double().cpu() - w.cpu()).abs().max() / w.abs().max()).item() <= TOL[dtype]


def test_functional_runs_the_op_off_the_torch_backend(monkeypatch):
    a, b = inputs(8, 3, 6, seed=4)
    a.requires_grad_()
    eager = fk.cosine_similarity_matrix(a, b)
    calls = []
    op = torch.ops.fastkd.cosine_matrix.default

    def counted(*args):
        calls.append(args[2])
        return op(*args)

    monkeypatch.setattr(cosine, "kernel_for", lambda name, x: counted)  # a backend with this op chosen for CPU
    fused = fk.cosine_similarity_matrix(a, b)
    assert calls == [EPS]
    assert torch.allclose(fused, eager, rtol=1e-12, atol=1e-14)
    assert torch.allclose(torch.autograd.grad(fused.sum(), a)[0], torch.autograd.grad(eager.sum(), a)[0], rtol=1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_functional_on_cuda_uses_the_fused_product(dtype):
    a, b = inputs(192, 64, 128, dtype=dtype, seed=5, device="cuda")
    a.requires_grad_()
    got = fk.cosine_similarity_matrix(a, b)
    want = cosine.cosine_matrix_reference(a.double(), b.double(), EPS)[0]
    assert ((got.double() - want).abs().max()).item() <= TOL[dtype]
    grad = torch.autograd.grad(got.sum(), a)[0]
    want_grad = torch.autograd.grad((F.normalize(a.double(), dim=1, eps=EPS) @ F.normalize(b.double(), dim=1,
                                                                                          eps=EPS).T).sum(), a)[0]
    assert ((grad.double() - want_grad).abs().max() / want_grad.abs().max()).item() <= 10 * TOL[dtype]
