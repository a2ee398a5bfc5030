"""`cellmonitor run` refusing to start, as systemd sees it: one line, an exit status, no READY=1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.fakeplugins import write_setup

EXE = Path(sys.executable).parent / "cellmonitor"


@pytest.fixture
def notify(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.2)
    yield s, {**os.environ, "NOTIFY_SOCKET": path}
    s.close()


def messages(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            return out


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("cellmonitor:")]


@pytest.mark.timeout(120)
def test_metrics_port_in_use_stops_start_up_with_69_and_no_ready(tmp_path, notify):
    sock, env = notify
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_setup(tmp_path, port=port)
        r = subprocess.run([str(EXE), "run", str(cfg)], env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 69, r.stderr[-2000:]
    (line,) = errors(r.stderr)
    assert f"127.0.0.1:{port}: address already in use" in line
    assert not any(m.startswith("READY=1") for m in messages(sock))


@pytest.mark.timeout(120)
def test_second_instance_on_one_state_folder_exits_69_naming_the_first(tmp_path, notify):
    sock, env = notify
    cfg = write_setup(tmp_path)
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([str(EXE), "run", str(cfg)], env=env, stderr=log)
    log.close()
    try:
        t0 = time.monotonic()
        while not any(m.startswith("READY=1") for m in messages(sock)):
            assert first.poll() is None and time.monotonic() - t0 < 120
        r = subprocess.run([str(EXE), "run", str(cfg)], env=env, capture_output=True, text=True, timeout=90)
        assert r.returncode == 69
        (line,) = errors(r.stderr)
        assert f"in use by another cellmonitor (pid {first.pid})" in line
        assert not any(m.startswith("READY=1") for m in messages(sock))
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
