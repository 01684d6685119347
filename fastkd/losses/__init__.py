"""The drop-in loss modules, one file per family (see ../shared METHODS.md for the formulas).

Each loss registers itself, next to its class, under its recipe key (:mod:`fastkd.losses._registry`):
``register``, ``entry``, ``registered`` and the feature vocabulary are importable from here, and
importing this package registers every loss it ships.
"""
from fastkd.losses._registry import (FEATURES, Feature, Features, InitStage, LossEntry, MissingFeature,  # noqa: F401
                                     entry, register, registered, unregister, widths)
from fastkd.losses.contrastive import *  # noqa: F401,F403
from fastkd.losses.features import *  # noqa: F401,F403
from fastkd.losses.logits import *  # noqa: F401,F403
from fastkd.losses.online import *  # noqa: F401,F403
from fastkd.losses.projector import *  # noqa: F401,F403
from fastkd.losses.self_supervised import *  # noqa: F401,F403
from fastkd.losses.similarity import *  # noqa: F401,F403
from fastkd.losses import contrastive, features, logits, online, projector, self_supervised, similarity

# the loss modules (fastkd re-exports these); the registry's names stay in this namespace
__all__ = [*logits.__all__, *features.__all__, *similarity.__all__, *contrastive.__all__, *projector.__all__,
           *online.__all__, *self_supervised.__all__]
