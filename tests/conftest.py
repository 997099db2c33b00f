"""Shared test settings."""
import torch

# The tests' models are tiny: one thread is as fast as two and immune to a busy second core.
torch.set_num_threads(1)
