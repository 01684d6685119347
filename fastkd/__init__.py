"""fastkd: knowledge-distillation losses as fused kernels behind drop-in ``nn.Module``s.

Every loss is a module here and a function in :mod:`fastkd.functional`; see README.md for the
table of losses and ``fastkd.backends()`` for the kernels available on this machine.
"""
from fastkd import functional, ops  # noqa: F401  (ops registers the custom ops)
from fastkd._checks import value_checks
from fastkd.backends import backends, use_backend
from fastkd.losses import *  # noqa: F401,F403
from fastkd.losses import __all__ as _loss_names

__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "value_checks", "functional", *_loss_names]
