"""Shared fixtures: offline hubs, the ../shared/data location, a thread-leak check."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins = ["fixtures.tiny_sam"]  # the tiny_checkpoint fixture (a tiny random SAM)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CELLMONITOR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip the test cleanly when it is absent (a user's machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def no_thread_leak():
    """Fail a test that leaves non-daemon threads running."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive() and not t.daemon]
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"
