"""The ``fastkd`` namespace's one ``torch.library.Library``, and the one way its ops are defined.

An op family defines each public op once, with :func:`define`: its schema, its torch reference (the contract
every kernel implements, registered as the kernel of every device: ``CompositeExplicitAutograd``), its fake
(shapes and dtypes on meta / fake tensors, for torch.compile) and its autograd formula. The native library
``fastkd._C`` registers its C++ CPU kernels over the reference from C++ (``TORCH_LIBRARY_IMPL(fastkd, CPU)``,
csrc/fastkd.cpp), so the same op runs the C++ kernel on CPU tensors and the reference elsewhere.

A kernel that must be chosen at run time, because several serve one device (Triton and CUDA C++ on CUDA
tensors), is an op in its own right, defined by its backend module with :func:`variant`: the public op's
schema under the name ``<op>_<backend>``, its fake and, unless told otherwise, its autograd formula. Triton
variants are ``torch.library.triton_op``\\ s, whose launches go through :func:`traceable`, so torch.compile
sees the kernels themselves. triton_op and wrap_triton have these semantics in torch 2.11 and 2.13 alike (both
since 2.6); two differences of detail are handled here: wrap_triton refuses the interpreter's kernels before
2.13 (:func:`traceable` launches them as they are, which 2.13 does itself), and a triton_op's fake is its
launcher, which the interpreter cannot run on fake tensors (the public op's fake replaces it; the interpreter
cannot run torch.compile's decomposition of the op either: tests/test_registered_ops.py leaves that check to
a GPU).

Every op is entered in the backend table (:mod:`fastkd.backends`) as it is defined, under its name without
a trailing ``_`` (``crd_bank_update_`` → ``crd_bank_update``): the public op as the ``torch`` backend's
(its reference) and as the ``native`` backend's on CPU tensors (where ``fastkd._C`` registered a CPU kernel
for it), a variant as its backend's on its device. The table only says which op runs; the torch dispatcher
runs it.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch

from fastkd import _native
from fastkd.backends import register

LIB = torch.library.Library("fastkd", "FRAGMENT")

# a schema type -> the Python annotation torch.library.infer_schema reads back as that type
_ANNOTATIONS = {"Tensor": torch.Tensor, "Optional[Tensor]": Optional[torch.Tensor], "float": float, "int": int,
                "bool": bool}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# what the Triton kernels load (and upcast to fp32); their launchers run the reference on float64
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Autograd(NamedTuple):
    """An op's autograd formula, as torch.library.register_autograd takes it."""
    setup_context: Callable  # (ctx, inputs, output) -> None: what backward needs, saved on ctx
    backward: Callable       # (ctx, *grads of the outputs) -> a gradient (or None) per input


@dataclasses.dataclass(frozen=True)
class Definition:
    """What an op was defined with: the reference is its contract (and the tests' oracle), for variants too."""
    op: torch._ops.OpOverload
    reference: Callable
    fake: Callable
    autograd: Autograd | None
    backend: str  # "torch" for a public op, else the backend whose kernel this variant runs
    device: str | None  # the device the backend table selects a variant for (None: a public op)
    public: torch._ops.OpOverload


DEFINITIONS: dict[str, Definition] = {}  # by the op's name, without the namespace


def table_key(name: str) -> str:
    """The op's name in the backend table: without the in-place op's trailing ``_``."""
    return name.rstrip("_")


def definition(op: torch._ops.OpOverload) -> Definition:
    """How ``op`` (a public op or a variant) was defined."""
    return DEFINITIONS[op._opname]


def define(schema: str, reference: Callable, fake: Callable, autograd: Autograd | None = None) -> torch._ops.OpOverload:
    """``fastkd::<schema>`` with ``reference`` as the kernel of every device, ``fake`` and ``autograd``; its
    overload (``torch.ops.fastkd.<name>.default``). Enters it in the backend table (see the module doc)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastkd::{name}", fake, lib=LIB)
    if autograd is not None:
        torch.library.register_autograd(f"fastkd::{name}", autograd.backward, setup_context=autograd.setup_context,
                                        lib=LIB)
    op = getattr(torch.ops.fastkd, name).default
    DEFINITIONS[name] = Definition(op, reference, fake, autograd, "torch", None, op)
    register(table_key(name), "torch", reference)
    register(table_key(name), "native", op, devices=("cpu",), available=_native_kernel(name, "cpu"))
    return op


_SAME = object()  # a variant's autograd: the public op's


def variant(public: torch._ops.OpOverload, backend: str, device: str, kernel: Callable | None = None, *,
            name: str | None = None, autograd: Autograd | None | object = _SAME) -> torch._ops.OpOverload:
    """``public``'s twin for ``backend`` on ``device`` tensors: ``fastkd::<name>`` (default
    ``<public op>_<backend>``) with the public op's schema and fake, and ``autograd`` (default: the public op's
    formula; a formula whose backward calls other ops passes the variant's own). Its overload.

    ``kernel`` (Triton only) is the launcher, a function of the schema's arguments: the op is a
    ``torch.library.triton_op`` (every launch inside it through :func:`traceable`). Without ``kernel`` the
    kernels are the native library's, registered from C++ for ``device``'s dispatch key.
    """
    spec = definition(public)
    name = name or f"{table_key(public._opname)}_{backend}"
    schema = _renamed(public._schema, name)
    autograd = spec.autograd if autograd is _SAME else autograd
    if kernel is None:
        LIB.define(schema)
        torch.library.register_fake(f"fastkd::{name}", spec.fake, lib=LIB)
        if autograd is not None:
            torch.library.register_autograd(f"fastkd::{name}", autograd.backward,
                                            setup_context=autograd.setup_context, lib=LIB)
        available = _native_kernel(name, device)
    else:
        _triton_op(name, schema, kernel, spec.fake, autograd)
        available = None
    op = getattr(torch.ops.fastkd, name).default
    DEFINITIONS[name] = Definition(op, spec.reference, spec.fake, autograd, backend, device, public)
    register(table_key(public._opname), backend, op, devices=(device,), available=available)
    return op


def _native_kernel(name: str, device: str) -> Callable[[str | None], bool]:
    """Whether the native library registered a kernel of ``fastkd::<name>`` for ``device``'s tensors (a set
    lookup: the backend table asks inside torch.compile too)."""
    return lambda _: _native.has_kernel(name, _DISPATCH_KEYS[device])


def _renamed(schema: torch._C.FunctionSchema, name: str) -> str:
    return f"{name}{str(schema)[len(schema.name):]}"


def _triton_op(name: str, schema: str, launcher: Callable, fake: Callable, autograd: Autograd | None) -> None:
    """``fastkd::<name>`` as a torch.library.triton_op running ``launcher``.

    triton_op reads the schema from the function's annotations (the ``schema`` argument is ignored in torch 2.11
    and 2.13), so the launcher is wrapped in a function whose signature is the schema's, and the inferred schema
    is checked against it (:func:`_signature`). Its fake would be the launcher itself run on fake tensors, which the Triton
    interpreter (CPU tests) cannot do: the public op's fake replaces it.
    """
    parsed = torch._C.parse_schema(schema)

    def kernel(*args):
        return launcher(*args)

    params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_ANNOTATIONS[str(a.type)])
              for a in parsed.arguments]
    returns = [torch.Tensor] * len(parsed.returns)
    result = None if not returns else returns[0] if len(returns) == 1 else tuple[tuple(returns)]
    kernel.__signature__ = inspect.Signature(params, return_annotation=result)
    kernel.__name__ = kernel.__qualname__ = name
    mutated = [a.name for a in parsed.arguments if a.alias_info is not None and a.alias_info.is_write]
    op = torch.library.triton_op(f"fastkd::{name}", kernel, mutates_args=mutated)
    inferred = op._opoverload._schema
    if _signature(inferred) != _signature(parsed):
        raise RuntimeError(f"the Triton op fastkd::{name} was inferred as {inferred}, not fastkd::{schema}")
    op.register_fake(fake)
    if autograd is not None:
        op.register_autograd(autograd.backward, setup_context=autograd.setup_context)


def _signature(schema: torch._C.FunctionSchema) -> tuple:
    """What two schemas must share: each argument's name, type and whether it is written (not its alias set's
    name), and the return types; an ``int`` as ``SymInt``, which the launchers take alike."""
    def kind(t) -> str:
        return str(t).replace("SymInt", "int")

    return (tuple((a.name, kind(a.type), a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments),
            tuple(kind(r.type) for r in schema.returns))


def traceable(kernel):
    """A Triton kernel, to be launched (``traceable(kernel)[grid](...)``) inside a Triton op's launcher:
    ``torch.library.wrap_triton(kernel)``, which torch.compile traces into the graph (eager calls of the op
    launch the kernel directly), except under Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests),
    whose kernels wrap_triton refuses before torch 2.13 and returns unwrapped from 2.13 on: they are launched
    as they are. Called on every launch: outside torch.compile's tracing (wrap_triton disabled) the kernel is
    returned at once, without wrap_triton's imports and checks (11.5 µs a launch, measured on the CPU)."""
    if not _wrap_enabled():
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


def _wrap_enabled() -> bool:
    """Whether wrap_triton would wrap now (inside a traced triton_op); ``True`` where torch does not say."""
    check = getattr(getattr(getattr(torch, "_library", None), "triton", None), "is_wrap_triton_enabled", None)
    return True if check is None else bool(check())
