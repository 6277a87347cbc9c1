"""Fixtures shared by tests/ and bench/."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: the trainer's small tensors run faster and deterministic on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
