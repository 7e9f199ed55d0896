"""Shared fixtures."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny problems run fastest (and steadiest on a shared CPU) on one intra-op thread, as in
    ``verification.run`` and ``StudyConfig(threads=1)``; the previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
