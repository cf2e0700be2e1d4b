"""Test configuration shared by every test file."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (no flaky CI); set HYPOTHESIS_PROFILE=explore
# to search new examples locally.
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny tensors: intra-op threads only cost time (a lot when other jobs share the CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
