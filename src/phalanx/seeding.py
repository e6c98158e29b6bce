"""One call to seed every random number generator a training run uses."""

from __future__ import annotations

import random

import torch

__all__ = ["seed_everything"]


def seed_everything(seed: int) -> int:
    """Seed Python's `random`, NumPy (when installed) and torch on every device; returns `seed`.

    Example::

        px.seed_everything(0)   # the same seed on every rank gives the same initial weights
    """
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device, lazily
    return seed
