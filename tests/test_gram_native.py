"""The CPU Gram kernel (csrc/cpu/gram.cpp: G = XXᵀ from its upper triangle) and the backward product
Y = M X (relation_product, same file) through the ops that use them.

SP's loss and input gradient, and the other batch-relation ops' outputs, against float64 references at
shapes on both sides of the kernels' thresholds: the Gram kernel runs for fp32 with 2 ≤ n ≤ 512 and
K ≥ 256, or n ≤ 32 at any K; n = 1, K < 256 with n > 32, fp64 and rows that are not contiguous go to
at::mm. The product kernel runs for fp32 with n ≤ 512 and K ≥ 1024 (row tiles of 6, column blocks of 256
in sub-blocks of 16: the shapes below leave partial ones). fp16 / bf16 inputs are upcast to fp32 first.
"""
import pytest
import torch

import fastkd
from fastkd import functional as fk
from fastkd.ops import similarity

from _tolerances import TOL, rel

pytestmark = pytest.mark.native

# (n, K): kernel shapes (odd n, K not a multiple of 8, the last row blocks partly outside n) and at::mm ones
KERNEL_SHAPES = [(2, 1), (3, 9), (7, 1000), (31, 5), (33, 256), (64, 257), (65, 16385), (130, 300)]
MM_SHAPES = [(1, 1), (1, 300), (33, 100), (64, 255)]
# the backward product's kernel (K >= 1024): one row, a partial row tile, partial column blocks and sub-blocks
PRODUCT_SHAPES = [(1, 1024), (5, 1031), (13, 4000), (130, 1100)]
EXTRA = {"cckd_loss": (0.4, 2), "pkt_loss": (1e-7,), "rkd_distance_loss": ()}


def sp_reference(f_s, f_t):
    """SP in float64, written out: ‖rownorm(G_t) − rownorm(G_s)‖²_F / b²."""
    def rownormed_gram(f):
        q = f.double().reshape(f.shape[0], -1)
        g = q @ q.T
        return g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)

    b = f_s.shape[0]
    return (rownormed_gram(f_t) - rownormed_gram(f_s)).pow(2).sum() / (b * b)


def pair(n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).to(dtype), torch.randn(n, k + 3, generator=g).to(dtype)


def check_sp(f_s, f_t, tol):
    """Native SP's loss and dL/df_s against the float64 reference."""
    ref_s = f_s.detach().double().requires_grad_()
    want = sp_reference(ref_s, f_t)
    want.backward()
    x = f_s.detach().requires_grad_()
    with fastkd.use_backend("native"):
        got = fk.sp_loss(x, f_t)
    got.backward()
    assert got.dtype == (torch.float64 if f_s.dtype == torch.float64 else torch.float32)
    assert rel(got, want, floor=0.1) <= tol
    assert x.grad.dtype == f_s.dtype
    # fp16 gradients of ~1e-6 are subnormal: allow one step of fp16's subnormal spacing besides tol
    finfo = torch.finfo(f_s.dtype)
    err = (x.grad.double() - ref_s.grad).abs().max().item()
    assert err <= tol * ref_s.grad.abs().max().item() + finfo.smallest_normal * finfo.eps


@pytest.mark.parametrize("n,k", KERNEL_SHAPES + MM_SHAPES + PRODUCT_SHAPES)
def test_sp_fp32(n, k):
    f_s, f_t = pair(n, k, torch.float32, seed=n * 7 + k)
    check_sp(f_s, f_t, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(7, 1000), (65, 300)])
def test_sp_other_dtypes(n, k, dtype):
    f_s, f_t = pair(n, k, dtype, seed=n + k)
    check_sp(f_s, f_t, TOL[dtype])


def test_sp_long_rows():
    """K = 100,000: the blocked lane sums stay within fp32's tolerance of the float64 Gram."""
    f_s, f_t = pair(16, 100_000, torch.float32, seed=5)
    check_sp(f_s, f_t, TOL[torch.float32])


@pytest.mark.parametrize("name", EXTRA)
@pytest.mark.parametrize("n,k", [(3, 9), (33, 256), (65, 16385), (64, 255)])
def test_relation_ops_fp32(name, n, k):
    """CCKD, PKT and RKD's distance term read G's entries themselves (RKD: G_ii + G_jj − 2G_ij)."""
    f_s, f_t = pair(n, k, torch.float32, seed=n + 3 * k)
    want = similarity.REFERENCES[name](f_s.double(), f_t.double(), *EXTRA[name])
    got = getattr(torch.ops.fastkd, name)(f_s, f_t, *EXTRA[name])
    assert rel(got[0], want[0], floor=0.1) <= TOL[torch.float32]
    for m, w in zip(got[1:], want[1:]):
        assert rel(m, w, floor=1e-8) <= TOL[torch.float32]


@pytest.mark.parametrize("layout", ["row_slice", "wide_row_slice", "transposed", "channels_last"])
def test_sp_non_contiguous(layout):
    """Rows with a stride other than K (read in place), rows that are not contiguous (copied first),
    and a 4-d map whose flattening copies."""
    g = torch.Generator().manual_seed(11)
    if layout == "row_slice":
        f_s = torch.randn(37, 700, generator=g)[:, 5:650]
    elif layout == "wide_row_slice":  # the backward product's kernel reads these rows in place too
        f_s = torch.randn(37, 1700, generator=g)[:, 5:1650]
    elif layout == "transposed":
        f_s = torch.randn(600, 37, generator=g).T
    else:
        f_s = torch.randn(37, 16, 6, 5, generator=g).to(memory_format=torch.channels_last)
    assert not f_s.is_contiguous()
    f_t = torch.randn(37, 300, generator=g)
    check_sp(f_s, f_t, TOL[torch.float32])
    want = torch.ops.fastkd.sp_loss(f_s.contiguous().reshape(37, -1), f_t)
    got = torch.ops.fastkd.sp_loss(f_s.reshape(37, -1), f_t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("n,k", [(65, 16385), (130, 300), (20, 999)])
def test_threads_agree(n, k):
    """Each entry of G is summed by one thread in a fixed order: 1 and 2 threads give the same forward
    outputs (bit for bit where the AVX2 kernel runs) and close gradients (the backward's GEMM may split K)."""
    f_s, f_t = pair(n, k, torch.float32, seed=n)
    threads = torch.get_num_threads()
    outs, grads = [], []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            x = f_s.clone().requires_grad_()
            out = torch.ops.fastkd.sp_loss(x, f_t)
            out[0].backward()
            outs.append([o.detach() for o in out])
            grads.append(x.grad)
    finally:
        torch.set_num_threads(threads)
    exact = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    for a, b in zip(*outs):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-9)
