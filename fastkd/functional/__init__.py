"""Stateless loss functions, one per loss, grouped by family like :mod:`fastkd.losses`.

``fastkd.functional.kd_loss(logits_s, logits_t, temperature=4.0)`` and its siblings compute the
same value as the module of the same name; the modules hold parameters and state (regressors,
embeds, memory banks) and call these.
"""
from fastkd.functional.contrastive import *  # noqa: F401,F403
from fastkd.functional.features import *  # noqa: F401,F403
from fastkd.functional.logits import *  # noqa: F401,F403
from fastkd.functional.online import *  # noqa: F401,F403
from fastkd.functional.projector import *  # noqa: F401,F403
from fastkd.functional.self_supervised import *  # noqa: F401,F403
from fastkd.functional.similarity import *  # noqa: F401,F403
from fastkd.functional import contrastive, features, logits, online, projector, self_supervised, similarity

__all__ = [*logits.__all__, *features.__all__, *similarity.__all__, *contrastive.__all__, *projector.__all__,
           *online.__all__, *self_supervised.__all__]
