"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def float64():
    """Run a test in double precision (exactness checks); the default dtype is restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
