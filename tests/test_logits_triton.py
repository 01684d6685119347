"""The Triton kernels of the logit losses against the torch contract of fastkd.ops.logits.

Unmarked tests are small: without a GPU they run through Triton's interpreter on CPU tensors (conftest.py
sets TRITON_INTERPRET=1), fp32/fp16, one launch configuration; a block smaller than the class count makes
the chunk loop run. The ``cuda`` tests repeat the checks on the GPU with bf16 and at 8192 × 32k.
"""
import pytest
import torch

import fastkd
from fastkd import functional as F
from fastkd.ops import logits as ops
from fastkd.ops import logits_triton

from _logits_cases import ALPHA, BETA, LOSSES, Contract, case, check_backend, forward, rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Chunked:
    """The Triton launchers with 16-column chunks, so rows of more than 16 classes loop."""

    @staticmethod
    def kd_loss(*args):
        return logits_triton.kd_loss(*args, block=16)

    @staticmethod
    def kd_loss_backward(*args):
        return logits_triton.kd_loss_backward(*args, block=16)

    @staticmethod
    def dkd_loss(*args):
        return logits_triton.dkd_loss(*args, block=16)

    @staticmethod
    def dkd_loss_backward(*args):
        return logits_triton.dkd_loss_backward(*args, block=16)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 16), (4, 37), (2, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_rows_match_contract(loss, shape, dtype):
    check_backend(loss, Chunked, *case(*shape, dtype=dtype, seed=shape[1], device=DEVICE))


def test_dkd_chunk_holding_only_the_target():
    """17 classes in chunks of 16 with targets 16 and 0: one chunk's only column is masked out of O."""
    s, t, _ = case(2, 17, seed=11, device=DEVICE)
    check_backend("dkd", Chunked, s, t, torch.tensor([16, 0], device=DEVICE))


@pytest.mark.parametrize("loss", LOSSES)
def test_default_block_and_fp16_overflow(loss):
    """One chunk per row (the default block); fp16 logits far beyond exp's range at T = 1."""
    s, t, y = case(3, 45, dtype=torch.float16, scale=8000.0, seed=3, device=DEVICE)
    check_backend(loss, logits_triton, s, t, y, temperature=1.0)


def test_float64_runs_the_contract():
    s, t, y = case(2, 9, dtype=torch.float64, seed=4, device=DEVICE)
    for loss in LOSSES:
        check_backend(loss, logits_triton, s, t, y, rtol=1e-12)


def test_errors():
    s, t, y = case(3, 5, seed=5, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        logits_triton.kd_loss(s, t[:, :4], 4.0)
    with pytest.raises(TypeError, match="dtype"):
        logits_triton.kd_loss(s, t.half(), 4.0)
    with pytest.raises(ValueError, match="target"):
        logits_triton.dkd_loss(s, t, y.int(), ALPHA, BETA, 4.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        logits_triton.dkd_loss(s[:, :1], t[:, :1], y * 0, ALPHA, BETA, 4.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_dtypes(loss, dtype):
    check_backend(loss, logits_triton, *case(64, 1000, dtype=dtype, seed=6, device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_large(loss):
    """8192 rows × 32k classes in bf16 (the GPU target size), and 8 × 128k classes in fp32."""
    s, t, y = case(8192, 32768, dtype=torch.bfloat16, seed=7, device="cuda")
    got, stats = forward(loss, logits_triton, s, t, y)
    want, _ = forward(loss, Contract, s.float(), t.float(), y)  # the fp32 torch contract on the rounded logits
    assert rel(got, want) <= 1e-4
    check_backend(loss, logits_triton, *case(8, 131072, seed=8, device="cuda"))


@pytest.mark.cuda
def test_cuda_functional_dispatch_and_graph_capture():
    s, t, y = case(32, 500, seed=9, device="cuda")
    s.requires_grad_(True)
    with fastkd.use_backend("triton"):
        got = F.dkd_loss(s, t, y) + F.kd_loss(s, t)
        got.backward()
    s64 = s.detach().double().requires_grad_(True)
    want = ops.dkd_reference(s64, t.double(), y, 1.0, 8.0, 4.0) + ops.kd_reference(s64, t.double(), 4.0)
    want.backward()
    assert rel(got, want) <= 1e-5 and rel(s.grad, s64.grad) <= 1e-5
    # no host sync: the op runs inside a CUDA graph capture
    with fastkd.use_backend("triton"), fastkd.value_checks(False):
        torch.ops.fastkd.kd_loss(s.detach(), t, 4.0)  # compile the kernels before capturing
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, _ = torch.ops.fastkd.kd_loss(s.detach(), t, 4.0)
        graph.replay()
    assert rel(loss, ops.kd_reference(s.detach().double(), t.double(), 4.0)) <= 1e-5
