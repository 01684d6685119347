"""Custom ops (torch.library, namespace ``fastkd``): schema, fake impl, autograd, backend dispatch.

The readable torch reference of each op lives beside its registration and is the oracle of the
tests and the fallback of every backend.
"""
from fastkd.ops import cosine, crd, logits, nst, similarity  # noqa: F401
