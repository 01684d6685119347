"""CRD's CUDA C++ kernels (csrc/cuda/crd.cu) against the torch references of fastkd/ops/crd.py.

``torch.ops.fastkd.crd_nce_cuda`` must equal ``nce_with_grad_reference`` and
``torch.ops.fastkd.crd_bank_update_cuda_`` must equal ``bank_update_reference``. The references
run in float64 (anchors upcast, bank rows upcast exactly), so the tolerances below bound the
kernels' own error. Every test but the compile check needs a GPU and a CUDA build of fastkd._C.
"""
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastkd.ops import crd as crd_ops
from fastkd.ops import philox

from _tolerances import TOL, rel

ROOT = Path(__file__).resolve().parents[1]
T = 0.07
TILE = 512  # kNceTile in csrc/cuda/crd.cuh: columns per block


def _has_cuda_kernel(name):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastkd::{name}", "CUDA")
    except RuntimeError:  # the schema is not defined
        return False


@pytest.fixture
def kernels():
    """Skips where fastkd._C legitimately has no CUDA kernels (no toolkit); fails where it should."""
    if not (_has_cuda_kernel("crd_nce_cuda") and _has_cuda_kernel("crd_bank_update_cuda_")):
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None or torch.version.cuda is None:
            pytest.skip("fastkd._C was built without CUDA kernels (no CUDA toolkit or CPU torch)")
        pytest.fail("a CUDA toolkit and a CUDA torch are here but fastkd._C has no CUDA CRD kernels")


def on_gpu(test):
    """Marks a test that runs the kernels: needs a GPU and fastkd._C (conftest skips otherwise)."""
    for mark in (pytest.mark.cuda, pytest.mark.native, pytest.mark.usefixtures("kernels")):
        test = mark(test)
    return test


def unit_rows(n, d, gen):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def make_inputs(B, K, N, D, bank_dtype=torch.float32, v_dtype=torch.float32, seed=0):
    """Unit-norm anchors and banks, positives with a repeated index, an explicit contrast_idx."""
    g = torch.Generator().manual_seed(seed)
    v_s, v_t = unit_rows(B, D, g).to(v_dtype), unit_rows(B, D, g).to(v_dtype)
    mem_s, mem_t = unit_rows(N, D, g).to(bank_dtype), unit_rows(N, D, g).to(bank_dtype)
    idx = torch.randint(0, N, (B,), generator=g)
    if B > 2:
        idx[-1] = idx[0]
    cidx = torch.randint(0, N, (B, K + 1), generator=g)
    cidx[:, 0] = idx
    rng = torch.tensor([1234567890123 + seed, 17 + seed], dtype=torch.int64)
    return [t.cuda() for t in (v_s, v_t, mem_s, mem_t, idx, cidx, rng)]


def z_pair(mode, N):
    """(log Z_s, log Z_t, z_momentum): unknown (−∞: estimate it), known and fixed, known with an EMA."""
    if mode == "unknown":
        return torch.tensor(float("-inf")).cuda(), torch.tensor(float("-inf")).cuda(), 0.0
    z_s, z_t = torch.tensor(math.log(2.0 * N)).cuda(), torch.tensor(math.log(1.5 * N)).cuda()
    return z_s, z_t, (0.5 if mode == "ema" else 0.0)


def run_cuda(v_s, v_t, mem_s, mem_t, idx, cidx, z_s, z_t, rng, K, zm=0.0, shared=False):
    return torch.ops.fastkd.crd_nce_cuda(v_s, v_t, mem_s, mem_t, idx, cidx, z_s, z_t, rng, K, T, zm, shared)


def run_reference(v_s, v_t, mem_s, mem_t, idx, cidx, z_s, z_t, rng, K, zm=0.0, shared=False):
    return crd_ops.nce_with_grad_reference(v_s.double(), v_t.double(), mem_s, mem_t, idx, cidx, z_s, z_t, rng, K,
                                           T, zm, shared)


def check_nce(got, want, tol, v_s, v_t, z_s, z_t):
    loss, zs, zt, gs, gt = got
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert zs.shape == z_s.shape and zs.dtype == z_s.dtype and zt.shape == z_t.shape and zt.dtype == z_t.dtype
    assert gs.shape == v_s.shape and gs.dtype == v_s.dtype and gt.shape == v_t.shape and gt.dtype == v_t.dtype
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    errors = {}
    for name, a, b in zip(("loss", "log_z_s", "log_z_t", "grad_v_s", "grad_v_t"), got, want):
        # log Z: its absolute error is Z's relative error
        errors[name] = (a.double().cpu() - b.double().cpu()).abs().item() if name.startswith("log_z") else rel(a, b)
    assert max(errors.values()) <= tol, errors


@on_gpu
@pytest.mark.parametrize("z_mode", ["unknown", "known", "ema"])
@pytest.mark.parametrize("sampling", ["philox", "explicit", "shared"])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nce_matches_reference(bank_dtype, D, sampling, z_mode):
    B, K, N = 6, 700, 500  # K+1 = 701: a full tile and a partial one; N < K: rows repeat per anchor
    assert (K + 1) % TILE != 0
    v_s, v_t, mem_s, mem_t, idx, cidx, rng = make_inputs(B, K, N, D, bank_dtype)
    z_s, z_t, zm = z_pair(z_mode, N)
    args = (v_s, v_t, mem_s, mem_t, idx, cidx if sampling == "explicit" else None, z_s, z_t, rng, K, zm,
            sampling == "shared")
    check_nce(run_cuda(*args), run_reference(*args), TOL[bank_dtype], v_s, v_t, z_s, z_t)


@on_gpu
@pytest.mark.parametrize("K", [1, 30, 511, 512, 1023, 1500])
def test_nce_batch_of_one(K):
    """B = 1 with K+1 below, at, one past and a multiple of the tile."""
    v_s, v_t, mem_s, mem_t, idx, cidx, rng = make_inputs(1, K, 3000, 128, seed=K)
    for z_mode in ("unknown", "ema"):
        z_s, z_t, zm = z_pair(z_mode, 3000)
        for c in (None, cidx):
            args = (v_s, v_t, mem_s, mem_t, idx, c, z_s, z_t, rng, K, zm, False)
            check_nce(run_cuda(*args), run_reference(*args), TOL[torch.float32], v_s, v_t, z_s, z_t)


@on_gpu
@pytest.mark.parametrize("v_dtype,bank_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                (torch.float16, torch.float32), (torch.bfloat16, torch.float16)])
def test_nce_half_precision_anchors(v_dtype, bank_dtype):
    v_s, v_t, mem_s, mem_t, idx, cidx, rng = make_inputs(5, 900, 2000, 128, bank_dtype, v_dtype)
    z_s, z_t, zm = z_pair("unknown", 2000)
    args = (v_s, v_t, mem_s, mem_t, idx, None, z_s, z_t, rng, 900, zm, False)
    tol = max(TOL[v_dtype], TOL[bank_dtype])
    check_nce(run_cuda(*args), run_reference(*args), tol, v_s, v_t, z_s, z_t)


@on_gpu
@pytest.mark.parametrize("D,bank_dtype", [(5, torch.float32), (3, torch.float16), (33, torch.float32),
                                          (100, torch.float16), (100, torch.float32), (1000, torch.bfloat16),
                                          (1024, torch.float32), (1024, torch.float16)])
def test_nce_other_widths(D, bank_dtype):
    """Widths whose rows are not 16-byte multiples (scalar loads) and the widest accepted."""
    v_s, v_t, mem_s, mem_t, idx, cidx, rng = make_inputs(3, 600, 1000, D, bank_dtype)
    z_s, z_t, zm = z_pair("unknown", 1000)
    args = (v_s, v_t, mem_s, mem_t, idx, cidx, z_s, z_t, rng, 600, zm, False)
    check_nce(run_cuda(*args), run_reference(*args), TOL[bank_dtype], v_s, v_t, z_s, z_t)


@on_gpu
def test_nce_misaligned_bank():
    """A bank that starts 4 bytes past a 16-byte boundary takes the scalar path, same results."""
    v_s, v_t, mem_s, mem_t, idx, cidx, rng = make_inputs(4, 800, 1500, 128)
    shifted = torch.empty(mem_t.numel() + 1, device="cuda")[1:].view_as(mem_t)
    shifted.copy_(mem_t)
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    z_s, z_t, zm = z_pair("known", 1500)
    args = (v_s, v_t, mem_s, shifted, idx, None, z_s, z_t, rng, 800, zm, False)
    check_nce(run_cuda(*args), run_reference(*args), TOL[torch.float32], v_s, v_t, z_s, z_t)


@on_gpu
@pytest.mark.parametrize("shared", [False, True])
def test_philox_negatives_equal_the_explicit_contract(shared):
    """The kernel's negatives are philox.contrast_indices': bitwise the same outputs either way."""
    B, K, N = 8, 2000, 7777
    v_s, v_t, mem_s, mem_t, idx, _, rng = make_inputs(B, K, N, 128, torch.bfloat16)
    explicit = philox.contrast_indices(idx, rng, K, N, shared)
    for z_mode in ("unknown", "known"):
        z_s, z_t, zm = z_pair(z_mode, N)
        drawn = run_cuda(v_s, v_t, mem_s, mem_t, idx, None, z_s, z_t, rng, K, zm, shared)
        given = run_cuda(v_s, v_t, mem_s, mem_t, idx, explicit, z_s, z_t, rng, K, zm, False)
        for a, b in zip(drawn, given):
            assert torch.equal(a, b)
    other = rng.clone()
    other[1] += 1  # the next offset draws other negatives
    moved = run_cuda(v_s, v_t, mem_s, mem_t, idx, None, z_s, z_t, other, K, zm, shared)
    assert not torch.equal(moved[0], drawn[0])


@on_gpu
def test_nce_at_the_cpu_benchmark_size_and_deterministic():
    """B=64, K=16384, N=50,000, D=128: fp32 within 1e-5 of float64, and bitwise repeatable."""
    B, K, N = 64, 16384, 50_000
    v_s, v_t, mem_s, mem_t, idx, _, rng = make_inputs(B, K, N, 128)
    for z_mode in ("unknown", "ema"):
        z_s, z_t, zm = z_pair(z_mode, N)
        args = (v_s, v_t, mem_s, mem_t, idx, None, z_s, z_t, rng, K, zm, False)
        got = run_cuda(*args)
        check_nce(got, run_reference(*args), TOL[torch.float32], v_s, v_t, z_s, z_t)
        again = run_cuda(*args)
        for a, b in zip(got, again):
            assert torch.equal(a, b)


@on_gpu
def test_nce_out_of_range_explicit_indices_are_clamped():
    """Documented: the kernel never reads outside a bank; an index < 0 reads row 0, >= N row N-1."""
    B, K, N = 3, 40, 100
    v_s, v_t, mem_s, mem_t, idx, cidx, rng = make_inputs(B, K, N, 64)
    bad, clamped = cidx.clone(), cidx.clone()
    bad[:, 3], clamped[:, 3] = N + 5, N - 1
    bad[:, 4], clamped[:, 4] = -2, 0
    z_s, z_t, zm = z_pair("unknown", N)
    a = run_cuda(v_s, v_t, mem_s, mem_t, idx, bad, z_s, z_t, rng, K)
    b = run_cuda(v_s, v_t, mem_s, mem_t, idx, clamped, z_s, z_t, rng, K)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@on_gpu
def test_nce_and_bank_update_capture_in_a_cuda_graph():
    """No host synchronisation: a CUDA graph captures both ops and replays them exactly."""
    B, K, N = 16, 3000, 5000
    v_s, v_t, mem_s, mem_t, idx, _, rng = make_inputs(B, K, N, 128, torch.float16)
    z_s, z_t, zm = z_pair("unknown", N)
    bank = mem_s.clone()

    def step():
        out = run_cuda(v_s, v_t, mem_s, mem_t, idx, None, z_s, z_t, rng, K, zm, False)
        torch.ops.fastkd.crd_bank_update_cuda_(bank, idx, v_s, 0.5)
        return out

    want = step()
    want_bank = bank.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    bank.copy_(mem_s)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, want):
        assert torch.equal(a, b)
    assert torch.equal(bank, want_bank)


@on_gpu
def test_nce_rejects_bad_inputs():
    v_s, v_t, mem_s, mem_t, idx, cidx, rng = make_inputs(2, 10, 50, 64)
    z_s, z_t, _ = z_pair("unknown", 50)
    with pytest.raises(RuntimeError, match="memory_t must be float32, float16 or bfloat16"):
        run_cuda(v_s, v_t, mem_s, mem_t.double(), idx, cidx, z_s, z_t, rng, 10)
    with pytest.raises(RuntimeError, match="contrast_idx must be a CUDA tensor"):
        run_cuda(v_s, v_t, mem_s, mem_t, idx, cidx.cpu(), z_s, z_t, rng, 10)
    with pytest.raises(RuntimeError, match="memory_s and memory_t must be contiguous"):
        run_cuda(v_s, v_t, mem_s.t().contiguous().t(), mem_t, idx, cidx, z_s, z_t, rng, 10)
    with pytest.raises(RuntimeError, match="v_s is"):
        run_cuda(v_s[:, :32], v_t, mem_s, mem_t, idx, cidx, z_s, z_t, rng, 10)
    wide = torch.zeros(50, 1025, device="cuda")
    with pytest.raises(RuntimeError, match="embedding width"):
        run_cuda(torch.zeros(2, 1025, device="cuda"), torch.zeros(2, 1025, device="cuda"), wide, wide, idx, cidx,
                 z_s, z_t, rng, 10)


# ---------------------------------------------------------------------------------------------
# Bank update


def update_case(B, N, D, bank_dtype, value_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = unit_rows(N, D, g).to(bank_dtype).cuda()
    value = unit_rows(B, D, g).to(value_dtype).cuda()
    index = torch.randint(0, N, (B,), generator=g)
    if B >= 5:  # one index three times, another twice
        index[2] = index[4] = index[0]
        index[3] = index[1]
    return bank, index.cuda(), value


@on_gpu
@pytest.mark.parametrize("B", [1, 9])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bank_update_matches_reference(bank_dtype, value_dtype, D, B):
    bank, index, value = update_case(B, 300, D, bank_dtype, value_dtype, seed=D + B)
    want = bank.clone()
    crd_ops.bank_update_reference(want, index, value, 0.5)
    got = bank.clone()
    torch.ops.fastkd.crd_bank_update_cuda_(got, index, value, 0.5)
    touched = torch.zeros(bank.shape[0], dtype=torch.bool, device="cuda")
    touched[index] = True
    assert torch.equal(got[~touched], bank[~touched])
    assert rel(got[touched], want[touched]) <= TOL[bank_dtype]
    if B >= 5:  # the repeated index holds its last occurrence's row, not an earlier one's
        alone = bank.clone()
        crd_ops.bank_update_reference(alone, index[4:5], value[4:5], 0.5)
        assert rel(got[index[0]], alone[index[0]]) <= TOL[bank_dtype]


@on_gpu
def test_bank_update_skips_out_of_range_indices():
    """Documented: an index outside [0, N) writes nothing; the others update as usual."""
    bank, _, value = update_case(3, 50, 64, torch.float32, torch.float32)
    index = torch.tensor([50, -1, 7], device="cuda")
    want = bank.clone()
    crd_ops.bank_update_reference(want, index[2:], value[2:], 0.3)
    got = bank.clone()
    torch.ops.fastkd.crd_bank_update_cuda_(got, index, value, 0.3)
    assert rel(got, want) <= TOL[torch.float32]
    assert torch.equal(torch.cat([got[:7], got[8:]]), torch.cat([bank[:7], bank[8:]]))


@on_gpu
def test_bank_update_rejects_bad_inputs():
    bank, index, value = update_case(4, 50, 64, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="bank must be a contiguous"):
        torch.ops.fastkd.crd_bank_update_cuda_(bank.t(), index, value, 0.5)
    with pytest.raises(RuntimeError, match="index must be int64"):
        torch.ops.fastkd.crd_bank_update_cuda_(bank, index.int(), value, 0.5)
    with pytest.raises(RuntimeError, match="value must be"):
        torch.ops.fastkd.crd_bank_update_cuda_(bank, index, value[:, :10], 0.5)
    with pytest.raises(RuntimeError, match="value must be a CUDA tensor"):
        torch.ops.fastkd.crd_bank_update_cuda_(bank, index, value.cpu(), 0.5)


# ---------------------------------------------------------------------------------------------
# Runs everywhere nvcc is: the kernels compile for sm_90 and sm_80.


def test_nvcc_check_compiles_the_kernels():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    done = subprocess.run(["bash", str(ROOT / ".ci" / "nvcc-check")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nvcc-check: ok" in done.stdout


@on_gpu
def test_float64_crd_steps_on_the_native_backend():
    """The CUDA C++ kernels refuse float64; a float64 CRDLoss on the native backend takes the references (both the
    NCE and the bank update) and equals the same loss on the CPU."""
    import copy

    import fastkd

    torch.manual_seed(0)
    cpu = fastkd.CRDLoss(9, 11, num_data=40, feat_dim=8, num_negatives=7, seed=1).double()
    gpu = copy.deepcopy(cpu).cuda()
    g = torch.Generator().manual_seed(2)
    f_s, f_t = torch.randn(5, 9, generator=g, dtype=torch.float64), torch.randn(5, 11, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 40, (5,), generator=g)
    with fastkd.use_backend("native"):
        got = gpu(f_s.cuda(), f_t.cuda(), idx.cuda())
    want = cpu(f_s, f_t, idx)
    assert rel(got, want) <= TOL[torch.float64] * 1e3
    assert torch.allclose(gpu.memory_s.cpu(), cpu.memory_s, atol=1e-12)
