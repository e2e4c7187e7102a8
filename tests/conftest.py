import os
from pathlib import Path

import pytest
import torch

from bench.registry import load_plugins

TEST_PLUGINS = Path(__file__).parent / "plugins"
torch.set_num_threads(2)

# The device of the device-sensitive tests (the generated method tests, the sources' round trips, methods on
# imported models): cpu here; `python -m bench gpucheck` sets BENCH_TEST_DEVICE=cuda on a GPU machine.
TEST_DEVICE = os.environ.get("BENCH_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
    raise pytest.UsageError("BENCH_TEST_DEVICE=cuda but torch sees no CUDA GPU")


@pytest.fixture(scope="session", autouse=True)
def _plugins():
    load_plugins([TEST_PLUGINS])
