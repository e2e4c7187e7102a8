from pathlib import Path

import pytest
import torch

from bench.registry import load_plugins

TEST_PLUGINS = Path(__file__).parent / "plugins"
torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _plugins():
    load_plugins([TEST_PLUGINS])
