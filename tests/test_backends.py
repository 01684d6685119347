"""Backend selection and the native extension's ops against the torch reference."""
import os
import subprocess
import sys

import pytest
import torch

import fastkd
from fastkd.backends import choose, choose_for, current, implementations
from fastkd.ops import crd


def test_torch_backend_is_always_listed_and_selection_nests():
    assert fastkd.backends()[0] == "torch"
    assert current() == "auto"
    with fastkd.use_backend("torch"):
        assert current() == "torch"
        assert choose("crd_bank_update", "cpu") == "torch"
        with fastkd.use_backend("auto"):
            assert current() == "auto"
        assert current() == "torch"
    assert current() == "auto"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'.*torch, native, triton, auto"):
        with fastkd.use_backend("cudnn"):
            pass


def test_environment_variable_sets_the_default():
    code = "from fastkd.backends import choose, current; print(current(), choose('crd_bank_update', 'cpu'))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTKD_BACKEND": "torch"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "torch"]
    bad = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTKD_BACKEND": "gpu"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "FASTKD_BACKEND: unknown backend 'gpu'" in bad.stderr


def test_unavailable_backend_is_refused():
    if "triton" in fastkd.backends():
        pytest.skip("triton is available here")
    with pytest.raises(ValueError, match="not available"):
        with fastkd.use_backend("triton"):
            pass


def test_op_a_backend_lacks_falls_back_to_the_reference():
    from fastkd.backends import register

    register("test_only_reference", "torch", lambda x: x)
    assert implementations("test_only_reference") == ["torch"]
    for name in fastkd.backends():
        with fastkd.use_backend(name):
            assert choose("test_only_reference", "cpu") == "torch"
    if "native" in fastkd.backends() and not torch.cuda.is_available():
        # this build has CPU kernels only: native is not an implementation for CUDA tensors
        assert "native" in implementations("crd_nce", "cpu")
        assert "native" not in implementations("crd_nce", "cuda")
        with fastkd.use_backend("native"):
            assert choose("crd_nce", "cuda") == "torch"


@pytest.mark.native
def test_auto_picks_native_on_cpu():
    assert choose("crd_bank_update", "cpu") == "native"
    with fastkd.use_backend("native"):
        assert choose("crd_bank_update", "cpu") == "native"


def test_choose_for_takes_the_tensors_device_type():
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    for name in fastkd.backends():
        with fastkd.use_backend(name):
            assert choose_for("crd_nce", cpu) == choose("crd_nce", "cpu")
            assert choose_for("crd_nce", meta) == choose("crd_nce", "meta") == "torch"  # nothing registered for meta


def bank_case(n, d, b, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    idx = torch.randint(0, n, (b,), generator=g)
    if b > 2:
        idx[1] = idx[b - 1]  # duplicates: the last occurrence wins
    value = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    return bank, idx, value


@pytest.mark.native
@pytest.mark.parametrize("d", [64, 128, 257])
@pytest.mark.parametrize("b", [1, 7, 64])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_native_bank_update_matches_reference_fp32(d, b, momentum):
    bank, idx, value = bank_case(300, d, b, torch.float32, seed=d + b)
    want, got = bank.clone(), bank.clone()
    crd.bank_update_reference(want, idx, value, momentum)
    torch.ops.fastkd.crd_bank_update_(got, idx, value, momentum)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    untouched = torch.ones(300, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(got[untouched], bank[untouched])
    # a repeated index ends with the row computed from its last occurrence
    last = max(i for i in range(b) if idx[i] == idx[b - 1])
    mixed = momentum * bank[idx[last]].double() + (1 - momentum) * value[last].double()
    torch.testing.assert_close(got[idx[last]].double(), mixed / mixed.norm(), rtol=1e-5, atol=1e-6)


@pytest.mark.native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_native_bank_update_half_and_double_banks(dtype):
    bank, idx, value = bank_case(200, 128, 16, dtype, seed=1)
    want, got = bank.clone(), bank.clone()
    crd.bank_update_reference(want, idx, value, 0.5)
    torch.ops.fastkd.crd_bank_update_(got, idx, value, 0.5)
    tol = {torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def test_bank_update_reference_against_row_loop():
    bank, idx, value = bank_case(50, 9, 6, torch.float64, seed=2)
    got = bank.clone()
    crd.bank_update_reference(got, idx, value, 0.3)
    want = bank.clone()
    for i in range(6):
        mixed = 0.3 * bank[idx[i]] + 0.7 * value[i].double()
        want[idx[i]] = mixed / mixed.norm()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bank_update_op_passes_opcheck():
    bank, idx, value = bank_case(40, 16, 5, torch.float32, seed=3)
    torch.library.opcheck(torch.ops.fastkd.crd_bank_update_.default, (bank, idx, value, 0.5))


@pytest.mark.native
def test_crd_loss_native_and_torch_backends_agree():
    torch.manual_seed(0)
    loss_a = fastkd.CRDLoss(32, 48, 500, num_negatives=64)
    loss_b = fastkd.CRDLoss(32, 48, 500, num_negatives=64)
    loss_b.load_state_dict(loss_a.state_dict())
    for step in range(3):
        f_s, f_t = torch.randn(16, 32), torch.randn(16, 48)
        idx = torch.randint(0, 500, (16,))
        with fastkd.use_backend("torch"):
            out_a = loss_a(f_s, f_t, idx)
        with fastkd.use_backend("native"):
            out_b = loss_b(f_s, f_t, idx)
        torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss_b.memory_s, loss_a.memory_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_b.memory_t, loss_a.memory_t, rtol=1e-5, atol=1e-6)


def test_bank_update_on_meta_tensors_traces():
    bank = torch.empty(100, 8, device="meta")
    torch.ops.fastkd.crd_bank_update_(bank, torch.empty(4, dtype=torch.long, device="meta"),
                                      torch.empty(4, 8, device="meta"), 0.5)


def test_native_extension_built_when_required():
    if os.environ.get("FASTKD_REQUIRE_NATIVE") != "1":
        pytest.skip("FASTKD_REQUIRE_NATIVE is not set")
    from fastkd import _native

    assert "native" in fastkd.backends(), f"fastkd._C did not load: {_native.error()}"
