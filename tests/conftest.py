"""Shared fixtures: offline hubs, the ../shared/data location, a thread-leak check."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# the embedding cache (index build/evaluate) of every test and of the commands they start goes to a
# temporary folder, never to ~/.cache/cellmonitor
_CACHE = tempfile.mkdtemp(prefix="cellmonitor-test-cache-")
os.environ["CELLMONITOR_CACHE"] = _CACHE
os.environ["CELLMONITOR_RUNTIME_CACHE"] = os.path.join(_CACHE, "runtime")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
_HOME_CACHE = Path.home() / ".cache" / "cellmonitor"

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


def _tree_state(p: Path) -> tuple[int, float]:
    """(file count, newest mtime) of a folder; (0, 0) when absent."""
    if not p.exists():
        return 0, 0.0
    files = [f for f in p.rglob("*") if f.is_file()]
    return len(files), max((f.stat().st_mtime for f in files), default=0.0)


@pytest.fixture(scope="session", autouse=True)
def nothing_written_to_the_home_cache():
    """Tests write only under temporary folders: the suite fails if ~/.cache/cellmonitor changes."""
    before = _tree_state(_HOME_CACHE)
    yield
    assert _tree_state(_HOME_CACHE) == before, f"a test wrote into {_HOME_CACHE}"
