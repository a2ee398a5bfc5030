"""`cellmonitor replay --engine ray` on a local Ray cluster started here (2 CPUs, one start-up for
the file): the same CSV as a local replay, row for row; a worker killed mid-run and a driver
killed mid-run still give every frame exactly once. Skipped where ray is not installed."""

from __future__ import annotations

import csv
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures.fakeplugins import write_setup
from fixtures.service import blobs

ray = pytest.importorskip("ray")

from monitor.cli.main import main  # noqa: E402
from monitor.config import load_config  # noqa: E402
from monitor.registry import Registry  # noqa: E402
from monitor.service.cluster import ClusterReplay  # noqa: E402

EXE = Path(sys.executable).parent / "cellmonitor"
TIMING = ("processed_at", "seconds_total")  # when and how long: the only columns a second run may change


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the whole file; its GCS address for drivers in subprocesses."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def setup(folder: Path, n: int, channels: bool = False, bad: bool = True, segmenter_options: str = "", service: str = "",
          reader_options: str = "") -> Path:
    """A fake-plugin config and ``n`` frames (one file each, or a phase + pi pair with ``channels``)."""
    cfg = write_setup(folder, segmenter_options=segmenter_options, service=service, reader_options=reader_options)
    watch = folder / "in"
    for i in range(n):
        name = f"{'ABCDEF'[i % 6]}{1 + i // 24}_t{1 + (i // 6) % 4}"
        np.save(watch / f"{name}_phase.npy", blobs(1 + i % 5, 0.3 if i % 3 else 0.9, seed=i))
        if channels and i % 7 != 3:  # every 7th frame lacks its pi channel: released incomplete
            pi = np.zeros((128, 128), np.float32)
            pi[10 : 10 + 4 * (i % 5), 10:40] = 1.0
            np.save(watch / f"{name}_pi.npy", pi)
    if bad:
        (watch / "Z9_t1_phase.npy").write_bytes(b"this is not numpy data at all")  # quarantined: bad magic
    if channels:
        np.save(watch / "Z8_t1_dapi.npy", blobs(2, 0.3))  # a channel not configured: skipped
        with cfg.open("a") as f:
            f.write('\n[assembly]\nchannels = ["phase", "pi"]\nprimary = "phase"\ncontrol = "pi"\nwait_s = 5\n')
    return cfg


def rows(state: Path) -> list[dict[str, str]]:
    with (state / "counts.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def quarantined(state: Path) -> list[tuple[str, str, str]]:
    q = state / "quarantine.csv"
    if not q.exists():
        return []
    with q.open(newline="") as f:
        return sorted((Path(r["path"]).name, r["stage"], r["problem"]) for r in csv.DictReader(f))


def assert_once(state: Path, n: int) -> None:
    got = rows(state)
    keys = [(r["well"], r["timepoint"]) for r in got]
    assert len(keys) == len(set(keys)) == n, f"{len(keys)} rows, {len(set(keys))} distinct, want {n}"
    db = sqlite3.connect(state / "ledger.sqlite")
    try:
        assert db.execute("SELECT COUNT(*) FROM frames WHERE status = 'done'").fetchone() == (n,)
        assert db.execute("SELECT COUNT(*) FROM timepoints").fetchone() == (n,)
    finally:
        db.close()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("channels", [False, True], ids=["one-file-frames", "channel-pairs"])
def test_cluster_replay_csv_equals_local_replay_row_for_row(cluster, tmp_path, channels):
    n = 24
    local, remote = setup(tmp_path / "local", n, channels), setup(tmp_path / "ray", n, channels)
    assert main(["replay", str(local), "--no-metrics"]) == 0
    assert main(["replay", str(remote), "--no-metrics", "--engine", "ray", "--workers", "2"]) == 0
    want, got = rows(tmp_path / "local" / "state"), rows(tmp_path / "ray" / "state")
    assert len(want) == n and any(int(r["n_dead"]) for r in want) and any(int(r["n_live"]) for r in want)
    assert got == want  # same rows (counts, fractions, control), same order
    assert quarantined(tmp_path / "ray" / "state") == quarantined(tmp_path / "local" / "state")
    assert any(name == "Z9_t1_phase.npy" for name, _, _ in quarantined(tmp_path / "ray" / "state"))
    if channels:
        assert any(r["control_area_fraction"] for r in got)  # the pi channel made it to the workers' frames
        assert any(not r["control_area_fraction"] for r in got)  # and the frames without it were released
    assert_once(tmp_path / "ray" / "state", n)
    # a second replay finds everything recorded: nothing shipped, nothing written
    assert main(["replay", str(remote), "--no-metrics", "--engine", "ray", "--workers", "1"]) == 0
    assert rows(tmp_path / "ray" / "state") == want


def ledger_state(state: Path) -> dict[str, list[tuple]]:
    """Everything the ledger holds that does not depend on when or how fast: files (by name),
    frames, per-timepoint counts and states."""
    db = sqlite3.connect(state / "ledger.sqlite")
    try:
        files = sorted((Path(p).name, st, fr, err) for p, st, fr, err in db.execute("SELECT path, status, frame, error FROM files"))
        frames = sorted(db.execute("SELECT frame, status, error FROM frames"))
        cols = [r[1] for r in db.execute("PRAGMA table_info(timepoints)") if r[1] not in ("time_s", "processed_s")]  # when: not what
        points = sorted(db.execute(f"SELECT {', '.join(cols)} FROM timepoints"))
        states = sorted(db.execute("SELECT * FROM timepoint_states"))
    finally:
        db.close()
    return {"files": files, "frames": frames, "timepoints": points, "states": states}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("channels", [False, True], ids=["one-file-frames", "channel-pairs"])
def test_local_loop_and_ray_driver_record_the_same_everything(cluster, tmp_path, channels):
    """One intake, two engines: the same frames, a bad file, an unconfigured channel and a file
    still being written give the same rows, quarantine lines and ledger in both."""
    states, problems = {}, []
    for engine in ("local", "ray"):
        root = tmp_path / engine
        cfg = setup(root, 12, channels, reader_options="not_ready_reads = 2")
        np.save(root / "in" / "halfwritten_t1_phase.npy", blobs(3, 0.5, seed=99))
        if channels:
            np.save(root / "in" / "halfwritten_t1_pi.npy", np.ones((128, 128), np.float32))
        args = ["replay", str(cfg), "--no-metrics"] + (["--engine", "ray", "--workers", "2"] if engine == "ray" else [])
        assert main(args) == 0
        state = root / "state"
        # the half-written file was found not ready twice, retried, then counted: never quarantined
        # (each engine is checked on its own, so a change to the retry policy is caught in both)
        if (root / "in" / "halfwritten_t1_phase.npy.reads").read_text() != "2":
            problems.append(f"{engine}: the half-written file was not read until it was complete")
        if not any(r["well"] == "halfwritten" for r in rows(state)):
            problems.append(f"{engine}: the half-written file's frame was not counted")
        if any(name.startswith("halfwritten") for name, _, _ in quarantined(state)):
            problems.append(f"{engine}: a file still being written was quarantined")
        states[engine] = (rows(state), quarantined(state), ledger_state(state))
    assert problems == []
    (want_rows, want_q, want_ledger), (got_rows, got_q, got_ledger) = states["local"], states["ray"]
    assert got_rows == want_rows
    assert got_q == want_q and any(stage == "read" for _, stage, _ in want_q)
    for table in want_ledger:
        assert got_ledger[table] == want_ledger[table], table
    if channels:
        assert any(st == "skipped" for _, st, _, _ in want_ledger["files"])  # the unconfigured channel


@pytest.mark.timeout(300)
def test_local_loop_and_ray_driver_give_the_same_tracks(cluster, tmp_path):
    """The per-cell sink links cells on the driver as frames are recorded, in whatever order
    the workers return them: both engines give the same track ids, links and fates store."""
    pytest.importorskip("laptrack")
    from monitor.fate.table import read_cells

    tables = {}
    for engine in ("local", "ray"):
        root = tmp_path / engine
        cfg = setup(root, 24, bad=False)
        with cfg.open("a") as f:
            f.write('\n[[sinks]]\nname = "csv"\n\n[[sinks]]\nname = "cells"\n\n[tracking]\nmax_step_um = 10\n')
        args = ["replay", str(cfg), "--no-metrics"] + (["--engine", "ray", "--workers", "2"] if engine == "ray" else [])
        assert main(args) == 0
        df = read_cells(root / "state" / "cells")
        cols = ["well", "field", "timepoint", "label", "track_id", "parent_track_id", "link_timepoint", "link_label", "state"]
        tables[engine] = df[cols].sort_values(cols[:4]).reset_index(drop=True)
        with sqlite3.connect(root / "state" / "fates.sqlite") as db:
            tables[engine + "_smoothed"] = sorted(db.execute("SELECT * FROM smoothed_counts").fetchall())
    assert len(tables["local"]) > 0 and tables["local"]["track_id"].notna().all()
    assert tables["local"]["link_timepoint"].notna().any()  # cells were linked across timepoints
    assert tables["ray"].equals(tables["local"])
    assert tables["ray_smoothed"] == tables["local_smoothed"] and tables["local_smoothed"]


@pytest.mark.timeout(150)
def test_a_worker_killed_mid_run_has_its_frames_redone_exactly_once(cluster, tmp_path):
    n = 30
    cfg_path = setup(tmp_path, n, bad=False, segmenter_options="sleep_s = 0.15")
    cfg = load_config(cfg_path)
    engine = ClusterReplay(cfg, Registry(cfg.plugins.paths), workers=2, serve_metrics=False)
    killed: list[int] = []

    def kill_one(stats):
        if stats.frames == 4 and not killed:  # calls are in flight on both workers now
            os.kill(stats.actor_pids[0], signal.SIGKILL)
            killed.append(stats.actor_pids[0])

    engine.on_recorded = kill_one
    stats = engine.run()
    assert killed
    assert stats.resubmitted >= 1  # frames of the dead worker's calls were sent again
    assert stats.frames == n
    assert_once(tmp_path / "state", n)
    assert quarantined(tmp_path / "state") == []  # a kill at a random moment costs no frame


@pytest.mark.timeout(150)
def test_a_driver_killed_mid_run_then_rerun_gives_every_frame_exactly_once(cluster, tmp_path):
    n = 40
    cfg = setup(tmp_path, n, bad=False, segmenter_options="sleep_s = 0.1")
    state = tmp_path / "state"
    cmd = [str(EXE), "replay", str(cfg), "--engine", "ray", "--address", cluster, "--workers", "2", "--no-metrics"]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 90:
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        if (state / "counts.csv").exists() and len(rows(state)) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(rows(state))
    assert 6 <= before < n, f"killed after {before} of {n} frames"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert_once(state, n)
    assert quarantined(state) == []


@pytest.mark.timeout(150)
def test_a_frame_past_the_time_limit_is_quarantined_its_worker_restarted_and_the_rest_counted(cluster, tmp_path):
    """The four good frames and the hanging one share the first call: past 5 x the limit the worker
    is killed, none is blamed, each goes again alone, and only the hanging one is quarantined."""
    cfg_path = setup(tmp_path, 4, bad=False, segmenter_options="sleep_on_blank_s = 3600", service="frame_timeout_s = 1.5")
    np.save(tmp_path / "in" / "A9_t1_phase.npy", np.zeros((64, 64), np.float32))  # hangs the (fake) segmenter
    cfg = load_config(cfg_path)
    stats = ClusterReplay(cfg, Registry(cfg.plugins.paths), workers=1, serve_metrics=False).run()
    assert stats.frames == 4
    assert_once(tmp_path / "state", 4)
    q = quarantined(tmp_path / "state")
    assert [(name, stage) for name, stage, _ in q] == [("A9_t1_phase.npy", "process")], q
    assert "still processing after 1.5s" in q[0][2]


@pytest.mark.timeout(120)
def test_an_overlay_sink_on_the_driver_gets_each_cells_call_from_the_workers(cluster, tmp_path):
    cfg = setup(tmp_path, 3, bad=False)
    cfg.write_text(cfg.read_text().replace("[plugins]", '[[sinks]]\nname = "csv"\n\n[[sinks]]\nname = "overlay"\noptions = { max_px = 128 }\n\n[plugins]'))
    assert main(["replay", str(cfg), "--engine", "ray", "--workers", "1", "--no-metrics"]) == 0
    assert len(rows(tmp_path / "state")) == 3
    assert len(list((tmp_path / "state" / "overlays").rglob("*.png"))) == 3


def test_a_worker_that_cannot_build_the_pipeline_stops_the_replay_in_one_line(cluster, tmp_path, capsys):
    cfg = setup(tmp_path, 2, bad=False)
    (tmp_path / "index" / "meta.json").unlink()  # the index is loaded by the workers, not the driver
    assert main(["replay", str(cfg), "--engine", "ray", "--workers", "1", "--no-metrics"]) == 78
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "worker:" in err[0] and "no meta.json" in err[0], err
    assert not (tmp_path / "state" / "counts.csv").exists()


def test_an_address_with_no_cluster_is_exit_69_at_once(tmp_path, capsys):
    cfg = setup(tmp_path, 1, bad=False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    assert main(["replay", str(cfg), "--engine", "ray", "--address", f"127.0.0.1:{port}", "--no-metrics"]) == 69
    assert time.monotonic() - t0 < 20
    err = capsys.readouterr().err
    assert f"--address 127.0.0.1:{port}: no Ray cluster there" in err


def test_without_ray_the_engine_says_what_to_install(tmp_path, monkeypatch, capsys):
    cfg = setup(tmp_path, 1, bad=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    assert main(["replay", str(cfg), "--engine", "ray", "--no-metrics"]) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'cellmonitor[cluster]'" in err[0], err


def test_more_workers_than_the_cluster_holds_is_a_usage_error(cluster, tmp_path, capsys):
    cfg = setup(tmp_path, 1, bad=False)
    assert main(["replay", str(cfg), "--engine", "ray", "--workers", "5", "--no-metrics"]) == 64
    assert "--workers 5" in capsys.readouterr().err




@pytest.mark.timeout(200)
def test_a_mask_that_never_comes_is_retried_then_quarantined_alike_on_ray(cluster, tmp_path):
    """The masks segmenter's "not there yet" is retried by the one retry policy on the workers too:
    the same quarantine line and counts as the local loop, the frame with its mask counted."""
    from fixtures.fields import write_field
    from test_marker_fields import marker_setup

    got = {}
    for engine in ("local", "ray"):
        root = tmp_path / engine
        cfg = marker_setup(root, deadline_s=2.0, sinks='name = "prometheus"')
        write_field(root / "in", "exp1_snap_0_1_1", mask=False)  # its mask never comes
        write_field(root / "in", "exp1_snap_0_1_2")
        args = ["replay", str(cfg), "--no-metrics"] + (["--engine", "ray", "--workers", "2"] if engine == "ray" else [])
        assert main(args) == 0
        q = quarantined(root / "state")
        assert [(name, stage) for name, stage, _ in q] == [("exp1_snap_0_1_1.tif", "read")], engine
        assert "no segmentation mask yet" in q[0][2] and "still unreadable after 2s" in q[0][2], engine
        got[engine] = repr((rows(root / "state"), q, ledger_state(root / "state"))).replace(str(root), "ROOT")
    assert got["ray"] == got["local"] and "exp1_snap_0_1_2" in got["local"]
