"""Models by source and name: fastkd's zoo, torchvision (``tv:NAME``) and timm (``timm:NAME``).

A name without a prefix is a zoo model (:data:`fastkd.models.CIFAR_MODELS` …); ``tv:resnet50`` is
``torchvision.models.get_model("resnet50", weights=None, ...)`` and ``timm:deit_tiny_patch16_224``
is ``timm.create_model(..., pretrained=False, ...)``, with the keyword arguments a recipe gives
(``student.kwargs.img_size=32``) passed through. Nothing is downloaded: weights come from a local
file (a recipe's ``teacher.weights``), so ``pretrained`` / ``weights`` keywords are refused.

torchvision and timm are optional (``pip install 'fastkd[models]'``, with the torchvision built for
the installed torch); a missing or broken one is named with the command that installs it. Names are
checked (:func:`check`) before a run loads any data.
"""
from __future__ import annotations

import difflib
import fnmatch
from types import ModuleType

SOURCES = {"tv": "torchvision", "timm": "timm"}
"""A model name's prefix → the package that builds it."""

EXTRA = "pip install 'fastkd[models]'"
_NO_DOWNLOAD = ("pretrained", "weights", "pretrained_cfg_overlay", "checkpoint_path")


def split(name: str) -> tuple[str, str]:
    """``(source, bare name)``: ``("zoo", "resnet8")``, ``("tv", "resnet50")``, ``("timm", "vit_tiny_patch16_224")``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    source, sep, bare = name.partition(":")
    if not sep:
        return "zoo", name
    if source not in SOURCES or not bare:
        raise ValueError(f"model {name!r}: the prefix must be one of {', '.join(p + ':' for p in SOURCES)} "
                         "(torchvision, timm) followed by a name, or no prefix for fastkd's zoo")
    return source, bare


def package(source: str) -> ModuleType:
    """The package behind ``source`` (``"tv"`` or ``"timm"``), imported; ``ImportError`` saying how to
    install it when it is missing or cannot be imported beside this torch."""
    import torch

    module = SOURCES[source]
    try:
        if module == "torchvision":
            import torchvision.models as found
        else:
            import timm as found
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        raise ImportError(f"{source}: models need {missing}, which is not installed: {EXTRA} (with the torchvision "
                          f"built for torch {torch.__version__}, e.g. torch==2.14.1 torchvision==0.29.1)") from None
    except Exception as exc:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
        raise ImportError(f"{source}: {module} cannot be imported beside torch {torch.__version__} "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                          "install the torchvision built for this torch (torch 2.14.1 pairs with torchvision "
                          f"0.29.1), then {EXTRA}") from None
    return found


def _names(source: str) -> list[str]:
    return list(package(source).list_models())


def check(name: str) -> str:
    """``name`` itself when :func:`create` can build it here; ``ValueError`` naming close matches (an
    unknown name) or ``ImportError`` (a missing package) otherwise. Cheap: builds nothing."""
    from fastkd.models.zoo import names as zoo_names

    source, bare = split(name)
    known = zoo_names() if source == "zoo" else _names(source)
    if bare in known:
        return name
    close = difflib.get_close_matches(bare, known, n=3, cutoff=0.6)
    prefix = "" if source == "zoo" else f"{source}:"
    hint = f"did you mean {' or '.join(repr(prefix + c) for c in close)}? " if close else ""
    where = "fastkd's zoo" if source == "zoo" else SOURCES[source]
    listing = "fastkd models" + ("" if source == "zoo" else f" '{source}:*'")
    raise ValueError(f"unknown model {name!r} in {where}; {hint}`{listing}` lists the names"
                     + ("; torchvision and timm models take a prefix (tv:resnet50, timm:vit_tiny_patch16_224)"
                        if source == "zoo" else ""))


def create_external(name: str, num_classes: int | None, **kwargs):
    """A torchvision or timm model (see the module doc); never downloads."""
    source, bare = split(name)
    refused = sorted(set(kwargs) & set(_NO_DOWNLOAD))
    if refused:
        raise ValueError(f"model {name!r}: {', '.join(refused)} would download weights; fastkd reads weights from a "
                         "local file only: leave it out and give the file as teacher.weights=PATH (or student.weights)")
    check(name)
    found = package(source)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        if source == "tv":
            return found.get_model(bare, weights=None, **kwargs)
        return found.create_model(bare, pretrained=False, **kwargs)
    except TypeError as exc:  # an argument the builder does not take
        raise ValueError(f"model {name!r} does not take {sorted(kwargs)}: {exc}") from None


def listing(pattern: str | None = None) -> tuple[list[str], list[str]]:
    """(the model names :func:`fastkd.models.create` takes that match the shell-style ``pattern``, lines
    about the sources that cannot be listed here). A pattern without a prefix matches the bare names of
    every source (``'*vit*'``); ``'timm:*'`` lists one source."""
    from fastkd.models.zoo import names as zoo_names

    rows, problems = [], []
    for source in ("zoo", *SOURCES):
        try:
            bare = zoo_names() if source == "zoo" else _names(source)
        except ImportError as exc:
            problems.append(str(exc))
            continue
        prefix = "" if source == "zoo" else f"{source}:"
        full = [prefix + n for n in bare]
        rows += [n for n, b in zip(full, bare) if pattern is None or fnmatch.fnmatchcase(n, pattern)
                 or (":" not in pattern and fnmatch.fnmatchcase(b, pattern))]
    return rows, problems
