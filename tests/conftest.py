"""Test configuration shared by every test file."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from _helpers import DDPResults, run_ddp_script
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


@pytest.fixture(autouse=True)
def _restore_logging_and_warnings():
    """The examples quiet Lightning's loggers and warnings for their own run (tests of
    test_examples.py and test_fusion.py call them); other tests rely on both (e.g. the module's
    "no weighting callback" message), so every test restores them afterwards."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


@pytest.fixture(scope="session")
def ddp_results(tmp_path_factory) -> DDPResults:
    """Every 2-process DDP case of ``ddp_script.py``, run in one launch for the whole session
    (the DDP tests of several files read their cases' results from it)."""
    out = tmp_path_factory.mktemp("ddp")
    try:
        run_ddp_script(Path(__file__).with_name("ddp_script.py"), out, timeout=600)
    except AssertionError as err:  # reported by each test, with its case's error if it raised
        return DDPResults(out, str(err))
    return DDPResults(out)


@pytest.fixture(scope="session")
def fsdp_results(tmp_path_factory) -> DDPResults:
    """Every 2-process FSDP2-against-DDP case of ``fsdp_script.py``, run in one launch."""
    out = tmp_path_factory.mktemp("fsdp")
    try:
        run_ddp_script(Path(__file__).with_name("fsdp_script.py"), out, timeout=600)
    except AssertionError as err:
        return DDPResults(out, str(err))
    return DDPResults(out)
