"""Engine tests run tiny models on a shared CPU, where one intra-op thread is several times
faster than contended multi-threading for these shapes. Set per test (and restored), so tests
outside this folder keep the default."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
