"""Every op fastkd defines, on every backend and device it is registered for, in every kernel dtype: opcheck
(schema, fake, autograd registration, AOT dispatch) and its outputs against its contract run in float64.

The cases come from the registry (:data:`fastkd.ops._library.DEFINITIONS`, which also fills the backend
table), not from a list kept here: a public op runs on CPU tensors (the native C++ kernel where fastkd._C
registered one, else the reference), a backend's op on its device. Without that device here a Triton op runs
on CPU tensors through the interpreter (conftest sets TRITON_INTERPRET=1), and a CUDA C++ op is skipped (it
runs in gpu-check). An op without sample inputs below fails, so a newly registered op cannot go untested.
"""
import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import _native
from fastkd.backends import _impls, load
from fastkd.ops import _library
from fastkd.ops import logits as logit_ops

from _tolerances import TOL, rel

GPU = torch.cuda.is_available()
for _backend in fastkd.backends():
    load(_backend)  # every backend module that can run here, so that its ops are in the registry
DTYPES = (torch.float32, torch.float16)  # what the fused kernels load; bf16 is wrong under Triton's interpreter


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _unit(*shape, dtype, seed):
    return F.normalize(torch.randn(*shape, generator=_gen(seed), dtype=torch.float64), dim=-1).to(dtype)


def _logits(dtype):
    """Student and teacher logits [4, 11] and targets, the teacher sure of the target in every other row."""
    g = _gen(1)
    s, t = 3 * torch.randn(4, 11, generator=g), 3 * torch.randn(4, 11, generator=g)
    y = torch.randint(0, 11, (4,), generator=g)
    t[::2].scatter_add_(1, y[::2, None], torch.full((2, 1), 6.0))
    return s.to(dtype), t.to(dtype), y


def _crd_nce(dtype):
    log_z = torch.tensor(float("-inf"))
    idx = torch.randint(0, 40, (3,), generator=_gen(2))
    return ((_unit(3, 16, dtype=dtype, seed=3), _unit(3, 16, dtype=dtype, seed=4), _unit(40, 16, dtype=dtype, seed=5),
             _unit(40, 16, dtype=dtype, seed=6), idx, None, log_z, log_z.clone(), torch.tensor([11, 3]), 9, 0.07, 0.0,
             False), (0, 1))


def _crd_nce_multi(dtype):
    """Three pairs sharing one Philox draw; their Z's not estimated yet."""
    log_z = torch.full((3,), float("-inf"))
    idx = torch.randint(0, 40, (3,), generator=_gen(20))
    return ((_unit(3, 3, 16, dtype=dtype, seed=21), _unit(3, 3, 16, dtype=dtype, seed=22),
             _unit(40, 3, 16, dtype=dtype, seed=23), _unit(40, 3, 16, dtype=dtype, seed=24), idx, None, log_z,
             log_z.clone(), torch.tensor([11, 3]), 9, 0.07, 0.0, False), (0, 1))


def _crd_nce_shard(dtype):
    """One process: rows [10, 30) of 40 as this rank's shard (plus its spare row); a third of the entries outside."""
    cidx = torch.randint(0, 40, (3, 6), generator=_gen(16))
    local = cidx - 10
    inside = (local >= 0) & (local < 20)
    shard = _unit(21, 8, dtype=dtype, seed=17)
    log_z = torch.tensor(float("-inf"))
    return ((torch.cat([_unit(3, 8, dtype=dtype, seed=18), _unit(3, 8, dtype=dtype, seed=19)], dim=1), shard,
             shard.flip(0), torch.where(inside, local, 0), inside, log_z, log_z.clone(), 0.2, 40, 0.0, False), (0,))


def _bank_update(dtype):
    return (_unit(40, 16, dtype=dtype, seed=7), torch.tensor([3, 17, 3, 39, 0]), _unit(5, 16, dtype=dtype, seed=8),
            0.5), ()


def _kd_backward(dtype):
    s, t, _ = _logits(dtype)
    _, stats = logit_ops.kd_forward_reference(s.float(), t.float(), 3.0)
    return (torch.tensor(0.5), s, t, stats, 3.0, True), ()


def _dkd_backward(dtype):
    s, t, y = _logits(dtype)
    _, stats = logit_ops.dkd_forward_reference(s.float(), t.float(), y, 1.0, 8.0, 3.0)
    return (torch.tensor(0.5), s, t, y, stats, 1.0, 8.0, 3.0, True), ()


def _pair(dtype, *extra):
    g = _gen(9)
    return (torch.randn(5, 12, generator=g).to(dtype), torch.randn(5, 9, generator=g).to(dtype), *extra), (0, 1)


# public op -> dtype -> (arguments, the positions of the inputs that require a gradient)
SAMPLES = {
    "crd_nce": _crd_nce,
    "crd_nce_multi": _crd_nce_multi,
    "crd_bank_update_": _bank_update,
    "crd_nce_shard": _crd_nce_shard,
    "kd_loss": lambda dtype: ((*_logits(dtype)[:2], 3.0), (0, 1)),
    "kd_loss_with_grad": lambda dtype: ((*_logits(dtype)[:2], 3.0), (0,)),
    "kd_loss_backward": _kd_backward,
    "dkd_loss": lambda dtype: ((*_logits(dtype), 1.0, 8.0, 3.0), (0, 1)),
    "dkd_loss_backward": _dkd_backward,
    "sp_loss": _pair,
    "iusp_loss": lambda dtype: ((torch.randn(3, 6, 5, generator=_gen(20)).to(dtype),
                                 torch.randn(3, 6, 4, generator=_gen(21)).to(dtype), torch.tensor([6, 2, 5])), (0, 1)),
    "cckd_loss": lambda dtype: _pair(dtype, 0.4, 2),
    "pkt_loss": lambda dtype: _pair(dtype, 1e-7),
    "rkd_distance_loss": _pair,
    "rkd_angle_loss": _pair,
    "relation_grad": lambda dtype: ((torch.randn(5, 12, generator=_gen(10)).to(dtype),
                                     (lambda m: m + m.T)(torch.randn(5, 5, generator=_gen(11))), torch.tensor(1.3)),
                                    ()),
    "nst_loss": lambda dtype: ((torch.randn(3, 5, 8, generator=_gen(12)).to(dtype),
                                torch.randn(3, 4, 8, generator=_gen(13)).to(dtype)), (0, 1)),
    "cosine_matrix": lambda dtype: ((torch.randn(6, 10, generator=_gen(14)).to(dtype),
                                     torch.randn(4, 10, generator=_gen(15)).to(dtype), 1e-8), (0, 1)),
}


def _where(spec: _library.Definition) -> tuple[str, str]:
    """(backend, device) an op is tested on here; a public op on CPU runs the native kernel when one is registered."""
    if spec.backend == "torch":
        return ("native" if _native.has_kernel(spec.op._opname, "CPU") else "torch"), "cpu"
    return spec.backend, spec.device


CASES = [(name, *_where(spec), dtype) for name, spec in sorted(_library.DEFINITIONS.items()) for dtype in DTYPES]


def _device_for(backend, device):
    """The device the case's tensors go to here, or None where it cannot run."""
    if device == "cpu" or GPU:
        return device
    return "cpu" if backend == "triton" else None  # Triton's interpreter runs on CPU tensors


def _to(args, device, grads):
    return tuple(a.to(device).requires_grad_(i in grads and a.is_floating_point())
                 if isinstance(a, torch.Tensor) else a for i, a in enumerate(args))


def _float64(args):
    return tuple(a.detach().cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a.cpu() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("name,backend,device,dtype", CASES, ids=[f"{n}-{b}-{d}-{str(t)[6:]}" for n, b, d, t in CASES])
def test_registered_op(name, backend, device, dtype):
    spec = _library.DEFINITIONS[name]
    sample = SAMPLES.get(spec.public._opname)
    assert sample is not None, f"fastkd::{spec.public._opname} has no sample inputs: add them to SAMPLES here"
    where = _device_for(backend, device)
    if where is None:
        pytest.skip(f"fastkd::{name} runs on {device} tensors, which this machine does not have")
    if backend == "native" and device == "cuda" and not _native.has_kernel(name, "CUDA"):
        pytest.skip(f"fastkd._C was built without CUDA kernels: no fastkd::{name} here")
    args, grads = sample(dtype)
    args = _to(args, where, grads)
    interpreted = backend == "triton" and where == "cpu"
    # the interpreter cannot run a kernel on the fake tensors that AOT dispatch traces the Triton op's launcher with
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if interpreted else None
    mutated = [a for a in args if isinstance(a, torch.Tensor)][:1] if spec.op._schema.is_mutable else []
    before = [m.clone() for m in mutated]
    torch.library.opcheck(spec.op, args, **({"test_utils": utils} if utils else {}))
    for m, b in zip(mutated, before):
        m.copy_(b)  # opcheck ran the in-place op: start again from the same bank
    want_args = _float64(args)
    got, want = spec.op(*args), spec.reference(*want_args)
    if spec.op._schema.is_mutable:
        got, want = mutated, [want_args[0]]
    for i, (g, w) in enumerate(zip(got, want)):
        err = rel(g, w, floor=1.0 if g.dim() == 0 else 1e-6)  # 0-dim: log Z, losses (absolute below 1)
        assert err <= TOL[dtype], f"output {i}: error {err:.2e} > {TOL[dtype]:.0e}"


def test_the_table_holds_only_defined_ops():
    """Every op the backend table can select was defined through fastkd.ops._library (so it has a case above)."""
    defined = {spec.op for spec in _library.DEFINITIONS.values()}
    for op, per_backend in _impls.items():
        for backend, per_device in per_backend.items():
            for device, (impl, _) in per_device.items():
                if backend != "torch" and op != "test_only_reference":
                    assert impl in defined, (op, backend, device, impl)
