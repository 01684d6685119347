"""The Triton CRD kernels against the torch references of fastkd.ops.crd and fastkd.ops.philox.

The unmarked tests are small: without a GPU they run through Triton's interpreter on CPU tensors
(conftest.py sets TRITON_INTERPRET=1), fp32/fp16 only; with one, compiled on CUDA tensors. The ``cuda``
tests repeat the checks at a larger size with fp32, fp16 and bf16 banks and capture the op in a CUDA graph.
The oracle is the reference run in float64: at large K the fp32 reference itself is ~1e-4 off in the loss
(it subtracts the rounded constant log(K/N) K times per anchor), the kernels are not.
"""
import math

import pytest
import torch
import triton
import triton.language as tl

from fastkd.backends import dispatch, implementations, use_backend
from fastkd.kernels import crd as kernels
from fastkd.ops import crd, crd_triton, philox

from _tolerances import TOL, rel

T = 0.07
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def unit(*shape, gen, dtype=torch.float32, device="cpu"):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=1) \
        .to(device=device, dtype=dtype)


def log_of(z):
    """log Z as the op takes it: −∞ (estimate Z) for a negative Z."""
    return math.log(z) if z > 0 else float("-inf")


def make(B, K, N, D, bank_dtype=torch.float32, anchor_dtype=torch.float32, seed=0, device=DEVICE, z=(-1.0, -1.0)):
    gen = torch.Generator().manual_seed(seed)
    case = dict(
        v_s=unit(B, D, gen=gen, dtype=anchor_dtype, device=device),
        v_t=unit(B, D, gen=gen, dtype=anchor_dtype, device=device),
        memory_s=unit(N, D, gen=gen, dtype=bank_dtype, device=device),
        memory_t=unit(N, D, gen=gen, dtype=bank_dtype, device=device),
        idx=torch.randint(0, N, (B,), generator=gen).to(device),
        contrast_idx=None,
        log_z_s=torch.tensor(log_of(z[0]), device=device),
        log_z_t=torch.tensor(log_of(z[1]), device=device),
        rng_state=torch.tensor([0x1234_5678_9ABC_DEF1, (7 << 32) + 99], dtype=torch.int64, device=device),
        num_negatives=K, temperature=T, z_momentum=0.0, shared_negatives=False)
    # every other anchor close to its positive row, as in training: P of the positive then exceeds K/N
    for b in range(0, B, 2):
        row = case["idx"][b]
        for bank, anchor in (("memory_t", "v_s"), ("memory_s", "v_t")):
            near = case[anchor][b].double().cpu() + 0.3 * unit(1, D, gen=gen)[0].double()
            case[bank][row] = (near / near.norm()).to(device=device, dtype=bank_dtype)
    return case


def reference64(case):
    """nce_with_grad_reference in float64 (anchors and Z cast; bank rows are read exactly)."""
    c = dict(case)
    for name in ("v_s", "v_t", "log_z_s", "log_z_t"):
        c[name] = c[name].double()
    return crd.nce_with_grad_reference(**c)


def assert_matches(got, want, tol, case):
    loss, z_s, z_t, g_s, g_t = got
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert z_s.dtype == case["log_z_s"].dtype and z_t.dtype == case["log_z_t"].dtype
    assert g_s.dtype == case["v_s"].dtype and g_s.shape == case["v_s"].shape
    assert g_t.dtype == case["v_t"].dtype and g_t.shape == case["v_t"].shape
    for name, g, w in zip(("loss", "log_z_s", "log_z_t", "grad_s", "grad_t"), got, want):
        assert torch.isfinite(g).all(), name
        # log Z: its absolute error is Z's relative error
        err = (g.double().cpu() - w.double().cpu()).abs().item() if name.startswith("log_z") else rel(g, w)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# --- Philox: the kernel helper is the contract of fastkd/ops/philox.py, bit for bit ---------------------

@triton.jit
def _philox_probe(seed_ptr, counter_ptr, word_ptr, index_ptr, n, num_data, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    counter = tl.load(counter_ptr + offs, mask=mask, other=0)
    word = kernels.philox_word0(tl.load(seed_ptr), tl.load(seed_ptr + 1), counter)
    tl.store(word_ptr + offs, word.to(tl.int64), mask=mask)
    tl.store(index_ptr + offs, kernels.uniform_index(word, num_data), mask=mask)


@pytest.mark.parametrize("seed, offset", [(0, 0), (0x1234_5678_9ABC_DEF1, (7 << 32) + 99), (-5, 2**40 + 3),
                                          (2**63 - 1, 2**62)])
def test_philox_words_and_indices_match_the_contract(seed, offset):
    counter = torch.tensor([0, 1, 2, 31, 1000, 2**31 + 5, 2**32 - 1, 2**32, 3 * 2**32 + 17, 2**50 + 12345],
                           dtype=torch.int64, device=DEVICE)
    state = torch.tensor([seed, offset], dtype=torch.int64, device=DEVICE)
    word, index = torch.empty_like(counter), torch.empty_like(counter)
    num_data = 1_281_167
    _philox_probe[(1,)](state, counter, word, index, counter.numel(), num_data, BLOCK=16)
    want = philox.philox_word0(state[0], state[1], counter)
    assert torch.equal(word, want)
    assert torch.equal(index, (want * num_data) >> 32)
    assert len(set(word.tolist())) == counter.numel()  # not a constant


def test_in_kernel_negatives_equal_explicit_philox_contrast_idx():
    """Scoring with contrast_idx=None is bit-identical to passing philox.contrast_indices explicitly."""
    case = make(B=3, K=21, N=57, D=64, seed=1)
    drawn = crd_triton.nce(**case, block_k=16)
    explicit = dict(case, contrast_idx=philox.contrast_indices(case["idx"], case["rng_state"], 21, 57))
    given = crd_triton.nce(**explicit, block_k=16)
    for a, b in zip(drawn, given):
        assert torch.equal(a, b)
    assert_matches(drawn, reference64(case), 1e-5, case)


def test_same_rng_state_repeats_and_another_offset_differs():
    case = make(B=2, K=30, N=80, D=64, seed=2)
    first = crd_triton.nce(**case)
    again = crd_triton.nce(**case)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    moved = dict(case, rng_state=case["rng_state"] + torch.tensor([0, 1], device=DEVICE))
    other = crd_triton.nce(**moved)
    assert rel(other[0], first[0]) > 1e-4
    assert_matches(other, reference64(moved), 1e-5, moved)


# --- crd_nce against the reference -------------------------------------------------------------------

CASES = {
    # name: (B, K, N, D, bank dtype, overrides); K+1 is never a multiple of the block
    "philox-z-unknown-blocks": (4, 37, 100, 64, torch.float32, dict(block_k=16, splits=2)),
    "philox-z-known-D128": (3, 40, 150, 128, torch.float32, dict(z=(2.0e4, 3.0e4), block_k=16, splits=1)),
    "philox-momentum-D256-B1": (1, 20, 60, 256, torch.float32, dict(z=(2.0e4, -1.0), z_momentum=0.5)),
    "explicit-duplicates-D100": (5, 33, 40, 100, torch.float32, dict(explicit=True, block_k=16, splits=2)),
    "explicit-fp16-banks": (4, 25, 90, 64, torch.float16, dict(explicit=True, z=(1.5e4, -1.0))),
    "philox-fp16-anchors-and-banks": (3, 18, 70, 128, torch.float16, dict(anchor_dtype=torch.float16)),
    "shared-z-unknown": (5, 40, 200, 64, torch.float32, dict(shared=True, block_k=16, splits=2)),
    "shared-momentum-D100": (3, 24, 50, 100, torch.float32, dict(shared=True, z=(-1.0, 9.0e3), z_momentum=0.9)),
    "shared-B1-fp16": (1, 17, 64, 128, torch.float16, dict(shared=True, z=(1.0e4, 1.2e4))),
    "shared-two-anchor-blocks": (20, 15, 80, 64, torch.float32, dict(shared=True, splits=1)),
}


def build(B, K, N, D, bank_dtype, opts, device=DEVICE, seed=3):
    opts = dict(opts)
    case = make(B, K, N, D, bank_dtype, opts.pop("anchor_dtype", torch.float32), seed=seed, device=device,
                z=opts.pop("z", (-1.0, -1.0)))
    case["z_momentum"] = opts.pop("z_momentum", 0.0)
    case["shared_negatives"] = opts.pop("shared", False)
    if opts.pop("explicit", False):
        gen = torch.Generator().manual_seed(seed + 1)
        cidx = torch.randint(0, N, (B, K + 1), generator=gen)
        cidx[:, 0] = case["idx"].cpu()
        cidx[0, 1:4] = cidx[0, 0]  # the positive again among the negatives
        cidx[-1, 5] = cidx[-1, 6]  # a repeated negative
        case["contrast_idx"] = cidx.to(device)
        case["idx"][-1] = case["idx"][0]  # a repeated anchor row
        case["contrast_idx"][-1, 0] = case["idx"][0]
    return case, opts


@pytest.mark.parametrize("name", list(CASES))
def test_nce_matches_float64_reference(name):
    B, K, N, D, bank_dtype, opts = CASES[name]
    case, launch = build(B, K, N, D, bank_dtype, opts)
    got = crd_triton.nce(**case, **launch)
    want = reference64(case)
    assert_matches(got, want, TOL[bank_dtype] if case["v_s"].dtype == torch.float32 else 1e-3, case)
    z_s, z_t = case["log_z_s"].item(), case["log_z_t"].item()
    if case["z_momentum"] == 0:  # a known Z is passed through untouched
        for old, new in ((z_s, got[1]), (z_t, got[2])):
            if old > float("-inf"):
                assert new.item() == old


def test_shared_negatives_score_the_same_rows_as_explicit_indices():
    case = make(B=4, K=29, N=90, D=64, seed=4)
    case["shared_negatives"] = True
    shared = crd_triton.nce(**case, block_k=16)
    cidx = philox.contrast_indices(case["idx"], case["rng_state"], 29, 90, shared=True)
    assert torch.equal(cidx[0, 1:], cidx[-1, 1:])
    given = crd_triton.nce(**dict(case, contrast_idx=cidx), block_k=16)
    for a, b in zip(shared, given):
        assert rel(a, b) <= 1e-6


def test_strided_anchors_and_different_feature_sizes():
    """v_s / memory_t and v_t / memory_s may differ in D; anchors may be non-contiguous views."""
    gen = torch.Generator().manual_seed(9)
    case = make(B=3, K=22, N=50, D=64, seed=9)
    part = unit(3, 160, gen=gen, device=DEVICE)[:, 30:130]
    case["v_t"] = (part / part.norm(dim=1, keepdim=True)).t().contiguous().t()  # D_t = 100, strides (1, 3)
    case["memory_s"] = unit(50, 100, gen=gen, device=DEVICE)
    case["v_s"] = unit(6, 64, gen=gen, device=DEVICE)[::2]  # row stride 128
    got = crd_triton.nce(**case, block_k=16)
    assert got[4].shape == (3, 100) and got[3].shape == (3, 64)
    assert_matches(got, reference64(case), 1e-5, case)


def test_z_is_estimated_only_where_unknown():
    case = make(B=3, K=19, N=70, D=64, seed=5, z=(-1.0, 5.0e3))
    loss, z_s, z_t, _, _ = crd_triton.nce(**case)
    _, want_z_s, _, _, _ = reference64(case)
    assert z_t.item() == case["log_z_t"].item()
    assert abs(z_s.item() - want_z_s.item()) <= 1e-5
    # the estimate is log(mean(exp(s/T))·N) over this batch's scores
    cidx = philox.contrast_indices(case["idx"], case["rng_state"], 19, 70)
    scores = crd.logits_reference(case["v_s"].double(), case["memory_t"], cidx, T).exp()
    assert abs(z_s.item() - math.log(scores.mean().item() * 70)) <= 1e-5


def test_bad_shapes_are_refused():
    case = make(B=2, K=5, N=20, D=64)
    with pytest.raises(ValueError, match="memory_t"):
        crd_triton.nce(**dict(case, memory_t=case["memory_t"][:10]))
    with pytest.raises(ValueError, match="contrast_idx"):
        crd_triton.nce(**dict(case, contrast_idx=torch.zeros(3, 6, dtype=torch.int64)))
    with pytest.raises(ValueError, match="rng_state"):
        crd_triton.nce(**dict(case, rng_state=torch.zeros(3, dtype=torch.int64)))


# --- bank update ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, D", [(torch.float32, 64), (torch.float32, 100), (torch.float16, 128)])
def test_bank_update_matches_reference_with_repeated_rows(dtype, D):
    gen = torch.Generator().manual_seed(6)
    bank = unit(40, D, gen=gen, dtype=dtype, device=DEVICE)
    value = unit(7, D, gen=gen, device=DEVICE)
    index = torch.tensor([3, 17, 3, 39, 0, 17, 3], device=DEVICE)
    want = bank.double() if dtype == torch.float32 else bank.clone()
    crd.bank_update_reference(want, index, value.to(want.dtype) if dtype == torch.float32 else value, 0.5)
    got = bank.clone()
    crd_triton.bank_update_(got, index, value, 0.5)
    assert rel(got, want) <= TOL[dtype]
    untouched = torch.ones(40, dtype=torch.bool, device=DEVICE)
    untouched[index] = False
    assert torch.equal(got[untouched], bank[untouched])
    # row 3 takes value[6] (its last occurrence), mixed with the row before the call
    mixed = 0.5 * bank[3].double() + 0.5 * value[6].double()
    assert rel(got[3], mixed / mixed.norm()) <= TOL[dtype]


def test_registered_as_the_triton_backend():
    assert "triton" in implementations("crd_nce", "cuda")
    assert "triton" in implementations("crd_bank_update", "cuda")
    assert "triton" not in implementations("crd_nce", "cpu")
    with use_backend("triton"):
        assert dispatch("crd_nce", "cuda") is crd_triton.NCE  # the op fastkd::crd_nce_triton, running crd_triton.nce
        assert dispatch("crd_bank_update", "cuda") is crd_triton.BANK_UPDATE


# --- on a GPU -------------------------------------------------------------------------------------------

GPU_CASES = {
    "philox": dict(),
    "philox-momentum": dict(z=(2.0e4, -1.0), z_momentum=0.5),
    "explicit": dict(explicit=True, z=(1.0e4, 1.0e4)),
    "shared": dict(shared=True),
    "shared-momentum": dict(shared=True, z=(-1.0, 2.0e4), z_momentum=0.5),
}


@pytest.mark.cuda
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(GPU_CASES))
@pytest.mark.parametrize("B, K, N, D", [(64, 4096, 50_000, 128), (1, 1000, 3000, 100), (37, 999, 5000, 256)])
def test_cuda_nce_matches_float64_reference(name, bank_dtype, B, K, N, D):
    case, launch = build(B, K, N, D, bank_dtype, GPU_CASES[name], device="cuda")
    got = crd_triton.nce(**case, **launch)
    assert_matches(got, reference64(case), TOL[bank_dtype], case)


@pytest.mark.cuda
@pytest.mark.parametrize("anchor_dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_anchors(anchor_dtype):
    case, _ = build(32, 2048, 10_000, 128, anchor_dtype, dict(anchor_dtype=anchor_dtype), device="cuda")
    assert_matches(crd_triton.nce(**case), reference64(case), TOL[anchor_dtype], case)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_bank_update_matches_reference(dtype):
    gen = torch.Generator().manual_seed(7)
    bank = unit(50_000, 128, gen=gen, dtype=dtype, device="cuda")
    value = unit(256, 128, gen=gen, device="cuda")
    index = torch.randint(0, 500, (256,), generator=gen).cuda()  # many repeats
    want = bank.clone()
    crd.bank_update_reference(want, index, value, 0.5)
    got = bank.clone()
    crd_triton.bank_update_(got, index, value, 0.5)
    assert rel(got, want) <= TOL[dtype]


@pytest.mark.cuda
def test_cuda_graph_captures_the_op_without_host_sync():
    case = make(B=16, K=512, N=4096, D=128, device="cuda", seed=8)
    eager = crd_triton.nce(**case)
    index, value = case["idx"], case["v_s"]
    bank = case["memory_s"].clone()
    crd_triton.bank_update_(bank.clone(), index, value, 0.5)  # compile outside the capture
    graph, update = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = crd_triton.nce(**case)
    with torch.cuda.graph(update):
        crd_triton.bank_update_(bank, index, value, 0.5)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
    case["rng_state"].add_(torch.tensor([0, 1], device="cuda"))  # read on the device at replay
    graph.replay()
    moved = crd_triton.nce(**case)
    torch.cuda.synchronize()
    assert not math.isclose(captured[0].item(), eager[0].item(), rel_tol=1e-6)
    for a, b in zip(moved, captured):
        assert torch.equal(a, b)
    update.replay()
    want = case["memory_s"].clone()
    crd.bank_update_reference(want, index, value, 0.5)
    assert rel(bank, want) <= 1e-5
