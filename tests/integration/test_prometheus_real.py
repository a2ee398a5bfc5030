"""The real Prometheus (Debian's package; .ci/run installs it) scraping the running service.

Skipped where the binaries are absent. A PromQL query through Prometheus's
HTTP API must give the counts the CSV holds, and ``promtool check metrics``
must find nothing to complain about in a real scrape.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import urllib.parse
import urllib.request

import numpy as np
import pytest
from fixtures.faultkit import csv_rows, fault_service
from fixtures.service import blobs, drop
from fixtures.waiting import wait_for

from monitor.service.metrics import serve
from monitor.service.wiring import stop_server

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_service(tmp_path):
    svc = fault_service(tmp_path, assembly={"channels": ["phase", "apo15"], "wait_s": 30})
    w = svc.settings.watch_dir
    fluo = np.random.default_rng(1).normal(0.1, 0.005, (128, 128)).astype(np.float32)
    fluo[:16, :16] = 1.0
    for name, n, b in (("A1_t1", 3, 0.3), ("A1_t2", 4, 0.9), ("B2_t1", 2, 0.3)):
        drop(w, f"{name}_phase.npy", blobs(n, b))
        drop(w, f"{name}_apo15.npy", fluo)
    (w / "A1_t3_phase.npy").write_bytes(b"garbage")  # one quarantined file
    port = free_port()
    server = serve(svc.metrics.registry, port, "127.0.0.1")
    stop = threading.Event()
    th = threading.Thread(target=svc.run, args=(stop,), kwargs={"observe": False})
    th.start()
    try:
        # wait on what the tests read: the counters themselves, not the CSV (written first) nor
        # svc.failed (counted on entry to the quarantine, before its metrics, ledger row and line).
        # A frame's gauges (the Prometheus sink) are set before its frames_total{counted}, in one step.
        def sample(name: str, **labels: str) -> float:
            return svc.metrics.registry.get_sample_value(name, labels) or 0.0

        wait_for(lambda: sample("cellmonitor_frames_total", result="counted") >= 3 and sample("cellmonitor_files_total", result="quarantined") >= 1,
                 what="3 frames counted and 1 file quarantined in the service's metrics")
        yield svc, port, tmp_path
    finally:
        stop.set()
        th.join(60)
        svc.close()
        stop_server(server)


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (CI installs Debian's prometheus)")
def test_promtool_finds_nothing_to_lint_in_a_real_scrape(live_service):
    _, port, _ = live_service
    text = scrape(port)
    assert 'cellmonitor_control_area_square_meters{experiment="test",instrument="test",well="A1"} 2.65' in text  # 256 px of 0.322 um
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


@pytest.mark.timeout(280)
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (CI installs Debian's prometheus)")
def test_real_prometheus_scrapes_the_service_and_promql_matches_the_csv(live_service, tmp_path_factory):
    svc, port, tmp = live_service
    work = tmp_path_factory.mktemp("prom")
    web = free_port()
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: cellmonitor\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
    )
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )

    def query(q: str) -> list[dict]:
        url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        body = json.loads(urllib.request.urlopen(url, timeout=5).read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    try:
        def scraped() -> list[dict]:
            try:
                return query('cellmonitor_latest_cells{job="cellmonitor"}')
            except OSError:
                return []

        def alive() -> None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""

        # one scrape is committed at once: its first series in a query means all of them are there
        wait_for(scraped, 150, "Prometheus's first scrape of the service", interval=0.5, check=alive)
        up = query('up{job="cellmonitor"}')
        assert up and up[0]["value"][1] == "1"
        # the latest frame of each well, as PromQL sees it, against the CSV's last row per well
        rows = csv_rows(tmp)
        last = {}
        for r in sorted(rows, key=lambda r: int(r["timepoint"])):
            last[r["well"]] = r
        got = {(s["metric"]["well"], s["metric"]["state"]): float(s["value"][1]) for s in query("sum by (well, state) (cellmonitor_latest_cells)")}
        for well, r in last.items():
            for state in ("live", "dead"):
                assert got[(well, state)] == float(r[f"n_{state}"]), (well, state)
        frac = query('cellmonitor_state_fraction{well="A1",state="dead"}')
        assert float(frac[0]["value"][1]) == pytest.approx(float(last["A1"]["frac_dead"]), abs=1e-4)
        counted = query('sum(cellmonitor_frames_total{result="counted"})')
        assert float(counted[0]["value"][1]) == len(rows) == 3
        notcounted = query('sum(cellmonitor_files_total{result=~"quarantined|skipped"})')
        assert float(notcounted[0]["value"][1]) == 1.0
        area = query('cellmonitor_control_area_square_meters{well="A1"}')
        assert float(area[0]["value"][1]) == pytest.approx(float(last["A1"]["control_area_um2"]) * 1e-12, rel=1e-3)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
