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
