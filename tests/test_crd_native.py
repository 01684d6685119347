"""The native CPU kernel of fastkd::crd_nce against its contract, nce_with_grad_reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.ops import crd, philox

pytestmark = pytest.mark.native


def unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def make_args(B, K, N, D, *, z=-1.0, dtype=torch.float32, bank_dtype=None, shared=False, explicit=False,
              z_momentum=0.0, seed=0, duplicates=False):
    g = torch.Generator().manual_seed(seed)
    v_s, v_t, mem_s, mem_t = unit(B, D, generator=g), unit(B, D, generator=g), unit(N, D, generator=g), unit(N, D, generator=g)
    idx = torch.randint(0, N, (B,), generator=g)
    if duplicates and B > 1:
        idx[-1] = idx[0]
    rng = torch.tensor([1234567 + seed, 7 * seed], dtype=torch.int64)
    cidx = philox.contrast_indices(idx, rng, K, N, shared) if explicit else None
    if explicit and duplicates:
        cidx[:, -1] = cidx[:, 1]  # a row drawn twice by the same anchor
    zz = torch.tensor(math.log(z) if z > 0 else float("-inf"), dtype=torch.float64)  # the op takes log Z
    bank_dtype = bank_dtype or dtype
    return (v_s.to(dtype), v_t.to(dtype), mem_s.to(bank_dtype), mem_t.to(bank_dtype), idx, cidx, zz, zz.clone(), rng,
            K, 0.07, z_momentum, shared)


def as_float64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def assert_matches(args, rtol):
    want = crd.nce_with_grad_reference(*as_float64(args))
    got = torch.ops.fastkd.crd_nce(*args)
    names = ("loss", "log_z_s", "log_z_t", "grad_v_s", "grad_v_t")
    for name, g, w in zip(names, got, want):
        scale = 1.0 if name.startswith("log_z") else w.abs().max().item()  # log Z: absolute = Z's relative error
        err = (g.double() - w).abs().max().item() / scale
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"
    assert got[3].dtype == args[0].dtype and got[0].dim() == 0


@pytest.fixture(params=["dense", "gather"])
def algo(request, monkeypatch):
    monkeypatch.setenv("FASTKD_CRD_CPU_ALGO", request.param)
    return request.param


@pytest.mark.parametrize("D", [64, 128, 256, 100])
@pytest.mark.parametrize("B,K", [(1, 5), (6, 37), (16, 130)])
def test_fp32_matches_reference(algo, B, K, D):
    assert_matches(make_args(B, K, 300, D, duplicates=True), rtol=1e-5)


@pytest.mark.parametrize("z,z_momentum", [(-1.0, 0.0), (4000.0, 0.0), (4000.0, 0.9)])
@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_sampling_modes_and_z(algo, z, z_momentum, explicit, shared):
    assert_matches(make_args(5, 23, 120, 64, z=z, z_momentum=z_momentum, explicit=explicit, shared=shared,
                             duplicates=True), rtol=1e-5)


@pytest.mark.parametrize("bank_dtype,rtol", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_banks(algo, bank_dtype, rtol):
    args = make_args(8, 40, 200, 128, bank_dtype=bank_dtype)
    # the contract: the same loss on the rounded bank, math in fp32
    assert_matches(args, rtol=1e-5)
    exact = make_args(8, 40, 200, 128, dtype=torch.float64)
    got, want = torch.ops.fastkd.crd_nce(*args), crd.nce_with_grad_reference(*exact)
    assert got[0].item() == pytest.approx(want[0].item(), rel=rtol)


def test_float64_is_exact_and_gradchecks(algo):
    args = make_args(3, 6, 30, 8, z=25.0, dtype=torch.float64)
    assert_matches(args, rtol=1e-12)
    v_s, v_t = args[0].requires_grad_(True), args[1].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.fastkd.crd_nce(a, b, *args[2:])[0], (v_s, v_t))


def test_same_state_same_result_and_offset_changes_the_draw():
    args = make_args(4, 50, 500, 32)
    first, again = torch.ops.fastkd.crd_nce(*args), torch.ops.fastkd.crd_nce(*args)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    moved = list(args)
    moved[8] = args[8] + torch.tensor([0, 1])
    assert not torch.equal(torch.ops.fastkd.crd_nce(*moved)[0], first[0])


def test_philox_indices_match_the_contract_in_both_algorithms(algo):
    # an explicit table equal to the Philox draws gives bit-identical outputs to the sampled call
    sampled = make_args(5, 33, 90, 16, seed=3)
    explicit = make_args(5, 33, 90, 16, seed=3, explicit=True)
    for a, b in zip(torch.ops.fastkd.crd_nce(*sampled), torch.ops.fastkd.crd_nce(*explicit)):
        assert torch.equal(a, b)


def test_out_of_range_table_is_refused():
    args = list(make_args(3, 4, 20, 8, explicit=True))
    args[5][1, 2] = 20
    with pytest.raises(RuntimeError, match="contrast_idx holds index 20"):
        torch.ops.fastkd.crd_nce(*args)


def test_opcheck():
    torch.library.opcheck(torch.ops.fastkd.crd_nce.default, make_args(4, 9, 40, 16))
    torch.library.opcheck(torch.ops.fastkd.crd_nce.default, make_args(4, 9, 40, 16, explicit=True, z=30.0))


def test_philox_reference_known_answers():
    # Random123's published known-answer vectors for philox4x32-10 (first output word)
    t = lambda v: torch.tensor(v - (1 << 64) if v >= 1 << 63 else v, dtype=torch.int64)  # noqa: E731
    assert int(philox.philox_word0(t(0), t(0), t(0).reshape(1))) == 0x6627E8D5
    ones = (1 << 64) - 1
    assert int(philox.philox_word0(t(ones), t(ones), t(ones).reshape(1))) == 0x408F276D
    assert int(philox.philox_word0(t(0x299F31D0A4093822), t(0x0370734413198A2E),
                                   t(0x85A308D3243F6A88).reshape(1))) == 0xD16CFE09
