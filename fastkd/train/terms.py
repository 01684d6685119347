"""The loss terms of an objective, read from the loss registry (:mod:`fastkd.losses._registry`).

Every objective (:class:`~fastkd.train.distiller.Distiller`, the online and transformed-input ones)
says, as class attributes, the objective name its losses register with (``OBJECTIVE``), the
features it hands them (``OFFERS``, names of :data:`~fastkd.losses._registry.FEATURES`), how
errors name it (``WHAT``) and whether it computes the recipe's cross entropy ``ce`` (``CE``); and it
runs the same few steps: check that it runs each of the recipe's losses (:func:`entries_for`),
build each criterion from a probe (:func:`build_criteria`), then at each step hand each loss the
features it takes (:func:`evaluate`) and sum the weighted terms (:func:`total`).
A recipe's ``ce`` is not a registered loss: each objective computes its own cross entropy.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

from fastkd.losses import Features, LossEntry, entry, registered


def runs_in(loss: LossEntry, objective: str, offers: Collection[str]) -> bool:
    """Whether ``objective`` (offering the features ``offers``) runs ``loss``: one that names it, or any
    objective for an ``"offline"`` loss, provided it offers every feature the loss takes."""
    return loss.objective in (objective, "offline") and set(loss.takes) <= set(offers)


def entries_for(losses: Mapping[str, dict], objective) -> dict[str, LossEntry]:
    """The registry entries of ``losses`` (a recipe's, less ``ce``) in the recipe's order, for the
    objective (class or instance) ``objective``.

    ``ValueError`` for an unknown name, and for a loss the objective does not run (the error lists
    the valid ones).
    """
    ce, name, offers = objective.CE, objective.OBJECTIVE, objective.OFFERS
    entries = {key: entry(key) for key in losses if not (ce and key == "ce")}
    bad = sorted(key for key, loss in entries.items() if not runs_in(loss, name, offers))
    if bad:
        valid = ["ce"] if ce else []
        valid += [key for key, loss in registered().items() if runs_in(loss, name, offers)]
        elsewhere = [f"{key} runs in the {entries[key].objective} objective" for key in bad
                     if entries[key].objective not in (name, "offline")]
        where = f" ({', '.join(elsewhere)}: fastkd.train.objectives.build_objective picks it)" if elsewhere else ""
        raise ValueError(f"losses {bad} do not apply to {objective.WHAT}{where}; valid: {', '.join(valid)}")
    return entries


def normalised(losses: Mapping[str, object]) -> dict[str, dict]:
    """``losses`` with a bare weight (``{"kd": 0.9}``) written as ``{"kd": {"weight": 0.9}}``; a mapping
    without a weight is refused."""
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError(f"losses must be a non-empty mapping of loss name → weight or options, got {losses!r}")
    out = {}
    for name, spec in losses.items():
        spec = {"weight": spec} if isinstance(spec, (int, float)) and not isinstance(spec, bool) else spec
        if not isinstance(spec, Mapping) or "weight" not in spec:
            raise ValueError(f"losses[{name!r}] must be a weight or a mapping with a 'weight', got {spec!r}")
        out[name] = dict(spec)
    return out


def options(spec: Mapping[str, object]) -> dict[str, object]:
    """A recipe loss's constructor options: its mapping less ``weight``."""
    return {key: value for key, value in spec.items() if key != "weight"}


def weights(losses: Mapping[str, Mapping[str, object]]) -> dict[str, float]:
    """{name: weight} of a recipe's losses."""
    return {name: float(spec["weight"]) for name, spec in losses.items()}


def build_criteria(entries: Mapping[str, LossEntry], losses: Mapping[str, dict], probe: Features) -> nn.ModuleDict:
    """Each loss's criterion, built by its entry from the recipe's options and ``probe``, under its recipe key."""
    return nn.ModuleDict({name: loss.create(probe, options(losses[name])) for name, loss in entries.items()})


def evaluate(entries: Mapping[str, LossEntry], criteria: Mapping[str, nn.Module],
             features: Features) -> dict[str, torch.Tensor]:
    """{name: loss} of each of ``criteria`` on the features its entry takes."""
    return {name: entries[name].loss(criterion, features) for name, criterion in criteria.items()}


def total(weights: Mapping[str, float], parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Σ weight · loss over ``parts``, in fp32 at least."""
    return sum(weights[name] * value.float() for name, value in parts.items())
