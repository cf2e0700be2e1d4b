"""Test configuration shared by every test file."""

from __future__ import annotations

import os

from hypothesis import settings

# Property tests draw the same examples on every run (no flaky CI); set HYPOTHESIS_PROFILE=explore
# to search new examples locally.
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
