"""Shared test fixtures.

The real Flickr8k files live outside the repo (../shared/flickr8k on the team's machines, or
wherever $FLICKR8K_DIR points). Tests that need them take the `flickr8k_dir` fixture and are
skipped, with the reason, where the folder is absent.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]   # on sys.path through pytest.ini's pythonpath (the scripts)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def find_flickr8k_dir():
    """$FLICKR8K_DIR, else ../shared/flickr8k beside the repo; None if neither exists."""
    for candidate in (os.environ.get("FLICKR8K_DIR"), REPO.parent / "shared" / "flickr8k"):
        if candidate and Path(candidate, "Flickr8k_text").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def flickr8k_dir():
    path = find_flickr8k_dir()
    if path is None:
        pytest.skip("real Flickr8k files not found (set FLICKR8K_DIR or put them at ../shared/flickr8k)")
    return path
