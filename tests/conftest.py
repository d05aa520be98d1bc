import os
import sys

import pytest
import torch
from hypothesis import settings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

# Property tests draw the same examples on every run and machine (seeded from each test's own
# code), and keep no example database, so a failure seen once is seen again.
# HYPOTHESIS_PROFILE=explore draws fresh examples to look for new failures.
settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch RNG state, whatever ran before it: tests that build
    a model or draw an input outside models.py (which seeds its own builds) repeat too."""
    torch.manual_seed(0)


def pytest_sessionfinish(session, exitstatus):
    """Stop the spawned ranks the multi-process tests share (``rank_pool.shared_ranks``)."""
    from rank_pool import close_shared

    close_shared()
