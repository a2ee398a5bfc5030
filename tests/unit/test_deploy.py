"""Deployment artefacts: systemd unit, sd_notify, Grafana provisioning and dashboard."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from monitor.records import ControlSignal, Counts, FrameKey, MarkerAgreement
from monitor.service import notify as systemd
from monitor.service.metrics import ServiceMetrics

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "cellmonitor.service"


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_policy():
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["RestartPreventExitStatus"] == ["78"]
    assert s["Restart"] == ["on-failure"]
    assert "WatchdogSec" in s and s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    assert "PrivateDevices" not in s  # would hide /dev/nvidia*
    # RestartPreventExitStatus covers the main process only: a check-config ExecStartPre exiting 78
    # would be restarted every RestartSec; `run` itself exits 78 on a bad config
    assert "ExecStartPre" not in s
    assert s["ExecStart"][0].split()[-2] == "run"
    assert s["SystemCallFilter"] == ["@system-service"] and s["SystemCallErrorNumber"] == ["EPERM"]
    assert "MemoryDenyWriteExecute" not in s  # breaks torch/numba JIT


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path):
    exe = Path(sys.executable).parent / "cellmonitor"
    text = UNIT.read_text().replace("/opt/cellmonitor/.venv/bin/cellmonitor", str(exe))
    unit = tmp_path / "cellmonitor.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sec = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout)
    assert m and float(m.group(1)) <= 4.0, sec.stdout[-500:]


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's, named in NOTIFY_SOCKET."""
    addr = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(addr)
    srv.settimeout(30)  # a recv ends as soon as the datagram comes; the service thread may start late
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    yield srv
    srv.close()


def test_sd_notify_datagrams(notify_socket, monkeypatch):
    srv = notify_socket
    assert systemd.notify("READY=1")
    assert srv.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert systemd.notify("READY=1") is False


def test_service_sends_ready_then_watchdog(tmp_path, notify_socket):
    from fixtures.service import make_service

    srv = notify_socket
    svc, _ = make_service(tmp_path)
    stop = threading.Event()
    th = threading.Thread(target=svc.run, args=(stop,))
    th.start()
    try:
        first = srv.recv(200).decode()
        second = srv.recv(200).decode()
    finally:
        stop.set()
        th.join(10)
        svc.close()
    assert first.startswith("READY=1")
    assert second == "WATCHDOG=1"


def exposition() -> str:
    m = ServiceMetrics(CollectorRegistry(), "test")
    c = Counts(FrameKey("e", "A1", "1", 1), "lionheart", None, 0.322, "config", 2, {"live": 1, "dead": 1}, 0, 0.9, ControlSignal("pi", 1, 2, 0.1, 1), stage_seconds={"segment": 0.1},
               n_unknown=1, index_version=2, marker=MarkerAgreement(2, 1, 0))
    m.observe_counts(c)
    m.observe_frame(c)
    m.errors.labels("segment").inc()
    m.files.labels("quarantined").inc()
    m.queue_depth.labels("files").set(0)
    return generate_latest(m.registry).decode()


def test_metric_names_follow_prometheus_conventions():
    names = {line.split()[2] for line in exposition().splitlines() if line.startswith("# TYPE")}
    assert all(n.startswith("cellmonitor_") for n in names)
    text = exposition()
    for forbidden in ("timepoint=", "file=", "path=", "cell_id="):
        assert forbidden not in text  # high-cardinality labels


def test_dashboard_queries_only_existing_metrics():
    dash = json.loads((REPO / "config/grafana/dashboards/cellmonitor.json").read_text())
    assert dash["uid"] == "cellmonitor-overview"
    assert [v["name"] for v in dash["templating"]["list"]] == ["instrument", "experiment", "well"]
    exposed = set(re.findall(r"^(cellmonitor_\w+)", exposition(), re.M))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"] if p["datasource"]["type"] == "prometheus"]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"]]
    used = {n for e in exprs for n in re.findall(r"cellmonitor_\w+", e)}
    assert used and used <= exposed, used - exposed
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_is_file_based():
    import yaml

    prov = yaml.safe_load((REPO / "config/grafana/provisioning/dashboards/cellmonitor.yml").read_text())
    assert prov["providers"][0]["type"] == "file"
    ds = yaml.safe_load((REPO / "config/grafana/provisioning/datasources/cellmonitor.yml").read_text())
    dash = json.loads((REPO / "config/grafana/dashboards/cellmonitor.json").read_text())
    assert ds["datasources"][0]["uid"] == dash["panels"][0]["datasource"]["uid"]
