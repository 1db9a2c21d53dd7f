import numpy as np
import pytest
import torch

from model.checkpoint import random_init


@pytest.fixture(scope="session")
def tiny():
    """The tiny preset with seeded random weights (float32, CPU)."""
    return random_init("tiny", seed=0)


@pytest.fixture
def rng_image():
    def make(h=60, w=90, seed=0):
        return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)

    return make


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
