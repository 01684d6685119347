"""pytest set-up for tests/ and benchmarks/: Triton's interpreter without a GPU, the markers' skips."""
import os

import torch

if not torch.cuda.is_available():
    # must happen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastkd import backends  # noqa: E402


def _have_model_packages() -> bool:
    try:
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a torchvision built for another torch fails on import in many ways
        return False
    return True


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_native = pytest.mark.skip(reason="the native extension fastkd._C was not built")
    no_models = pytest.mark.skip(reason="needs torchvision and timm: bash scripts/dev test-models runs these")
    # FASTKD_REQUIRE_MODELS=1 (scripts/dev test-models): the packages must be there, so the tests fail without them
    models_here = os.environ.get("FASTKD_REQUIRE_MODELS") == "1" or (
        any("models" in item.keywords for item in items) and _have_model_packages())
    for item in items:
        if "models" in item.keywords and not models_here:
            item.add_marker(no_models)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "native" in item.keywords and "native" not in backends():
            item.add_marker(no_native)
