"""pytest set-up for tests/ and benchmarks/: Triton's interpreter without a GPU, the markers' skips."""
import os

import torch

if not torch.cuda.is_available():
    # must happen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastkd import backends  # noqa: E402


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_native = pytest.mark.skip(reason="the native extension fastkd._C was not built")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "native" in item.keywords and "native" not in backends():
            item.add_marker(no_native)
