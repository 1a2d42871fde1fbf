"""Test configuration.

The jaxtyping import hook (pytest addopts --jaxtyping-packages) must be installed before tl_reward
is imported, so nothing here imports the package at module level.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and small sklearn fits run fastest (and steadiest on a shared machine) on one
    thread: torch's and the BLAS pools', restored after the module. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(n)
