"""Shared test settings and fixtures."""
import pytest
import torch

from tests.helpers import load_script

# The tests' models are tiny: one thread is as fast as two and immune to a busy second core.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def train():
    """train.py, imported as a module (for in-process calls of main and its parser)."""
    return load_script("train")


@pytest.fixture(scope="module")
def evaluate():
    """eval.py, imported as a module."""
    return load_script("eval")
