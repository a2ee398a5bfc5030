"""`cellmonitor run` as systemd runs it: a subprocess, files dropped in, SIGTERM, clean exit."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fixtures.waiting import wait_for

from monitor.config import PluginRef
from monitor.demo.run import DEMO_CONFIG, FIELD_PX, FRAME_UM, write_frame
from monitor.demo.synthetic import make_cells, render_field
from monitor.index.ewc import EWCParams
from monitor.index.store import ReferenceIndex
from monitor.protocols import BuildContext
from monitor.registry import Registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(480)
def test_run_counts_a_dropped_frame_serves_metrics_and_stops_on_sigterm(tmp_path):
    enc = Registry().build("encoders", PluginRef(name="efficientnet-lite0"), BuildContext(state_dir=tmp_path))
    crops = np.random.default_rng(0).integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)
    ReferenceIndex.build(
        enc.encode(crops), np.array([0, 0, 1, 1, 2, 3]), ("live", "apoptotic", "necrotic", "dead"),
        [{"name": enc.name, "id": enc.id, "dim": enc.dim}], ewc=EWCParams(1, 4, 0.5, True),
    ).save(tmp_path / "index")
    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(DEMO_CONFIG.replace("metrics_port = 9108", f"metrics_port = {port}"))
    (tmp_path / "input").mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # systemd's notify socket
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    exe = Path(sys.executable).parent / "cellmonitor"
    proc = subprocess.Popen([str(exe), "run", str(cfg)], stderr=subprocess.PIPE, text=True, env=env)

    def alive() -> None:
        assert proc.poll() is None, proc.stderr.read()

    def ready() -> bool:
        try:
            return sock.recv(4096).decode().startswith("READY=1")
        except TimeoutError:
            return False

    try:
        # READY=1 comes once the watcher is up; the ledger file (waited on before) exists earlier, before
        # the backlog scan and the watcher, and a frame written between the two waited for the next rescan
        wait_for(ready, 180, "READY=1 from `cellmonitor run`", check=alive)
        cells = make_cells(8, FIELD_PX * FRAME_UM, np.random.default_rng(1), onset_scale=0, n_timepoints=1)
        phase, fluo, _ = render_field(cells, 0, (FIELD_PX, FIELD_PX), FRAME_UM, 3)
        write_frame(tmp_path / "input", "B3", 5, phase, fluo)
        out = tmp_path / "state" / "counts.csv"
        wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, 120, "the frame's row in counts.csv", interval=0.2, check=alive)
        rows = list(csv.DictReader(out.open()))
        assert [(r["well"], r["timepoint"], r["n_cells"]) for r in rows] == [("B3", "5", "8")]
        # the counter is updated after the CSV row is written: wait on the counter itself, never race it
        want = 'cellmonitor_frames_total{result="counted"} 1.0'

        def scrape() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()

        wait_for(lambda: want in scrape(), 60, want, interval=0.2, check=alive)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "stopped: 1 frame(s) counted" in err
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
