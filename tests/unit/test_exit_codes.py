"""One exit status per kind of failure, the same in every command, each with one line on stderr."""

from __future__ import annotations

import socket

import pytest

from monitor.cli.main import main
from monitor.errors import EXIT_STATUSES


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("cellmonitor:")]
    assert len(lines) == 1, err
    return lines[0]


def test_demo_with_no_timepoints_fails_in_one_line(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--timepoints", "0", "--out", str(tmp_path / "d"))
    assert code == 64
    assert one_line(err) == "cellmonitor: error: --timepoints must be at least 1 (got 0)"
    assert "SYNTHETIC" not in out and not (tmp_path / "d").exists()


@pytest.mark.parametrize("argv", [
    ("inspect", "{missing}"),
    ("plugins", "check", "{missing}"),
    ("export", "{missing}", "--out", "{tmp}/x.csv"),
    ("segment", "{missing}", "--out", "{tmp}/labels.tif"),
])
def test_a_missing_file_is_exit_66_in_every_command(capsys, tmp_path, argv):
    missing = tmp_path / "nope_A1_t1_phase.tif"
    code, out, err = run(capsys, *(a.format(missing=missing, tmp=tmp_path) for a in argv))
    assert code == 66, (out, err)
    line = one_line(err)
    assert str(missing) in line and ("no such file" in line or "not found" in line)
    assert "TAKES" not in out  # plugins check no longer judges a missing file by its name


def write_config(tmp_path, extra: str = "", watch: bool = True, index: bool = True) -> str:
    if watch:
        (tmp_path / "in").mkdir(exist_ok=True)
    if index:
        (tmp_path / "idx").mkdir(exist_ok=True)
        (tmp_path / "idx" / "meta.json").write_text("{}")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[service]\nwatch_dir = "in"\nstate_dir = "state"\n{extra}\n[classifier]\nindex = "idx"\n')
    return str(cfg)


def test_metrics_port_as_a_string_is_a_config_error(capsys, tmp_path):
    cfg = write_config(tmp_path, 'metrics_port = "9108"')
    code, _, err = run(capsys, "check-config", cfg)
    assert code == 78
    assert "service.metrics_port: Input should be a valid integer" in one_line(err)


def test_metrics_listen_on_localhost_by_default():
    from monitor.config import Config

    assert Config().service.metrics_addr == "127.0.0.1"


def test_check_config_reports_a_missing_watch_folder_and_a_missing_index(capsys, tmp_path):
    code, out, err = run(capsys, "check-config", write_config(tmp_path, watch=False), "--no-index")
    assert code == 69 and "OK" not in out
    assert "service.watch_dir" in one_line(err) and "no such folder" in err
    (tmp_path / "in").mkdir()
    import shutil

    shutil.rmtree(tmp_path / "idx")
    code, out, err = run(capsys, "check-config", str(tmp_path / "c.toml"))
    assert code == 78 and "OK" not in out
    assert "classifier.index" in one_line(err) and "not an index folder" in err
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "meta.json").write_text("{}")
    code, out, err = run(capsys, "check-config", str(tmp_path / "c.toml"))
    assert code == 78 and "OK" not in out and "classifier.index" in one_line(err)  # what run would refuse
    code, out, _ = run(capsys, "check-config", str(tmp_path / "c.toml"), "--no-index")
    assert code == 0 and out.strip().endswith(": OK")


def _index_for(folder, encoder_id: str, dim: int, name: str = "efficientnet-lite0", options=None) -> None:
    import numpy as np

    from monitor.index.store import ReferenceIndex

    rng = np.random.default_rng(0)
    idx = ReferenceIndex.build(rng.normal(size=(12, dim)).astype(np.float32), np.array([0, 1] * 6), ("live", "dead"),
                               [{"name": name, "options": options or {}, "id": encoder_id, "dim": dim}])
    idx.save(folder)


def test_check_config_checks_the_index_against_the_encoders_and_names_the_fix(capsys, tmp_path):
    """run refuses an index built with other encoders; check-config must say so first, with the fix."""
    from monitor.config import load_config
    from monitor.protocols import context_from
    from monitor.registry import Registry

    cfg_path = write_config(tmp_path, index=False)
    cfg = load_config(cfg_path)
    enc = Registry().build("encoders", cfg.encoders[0], context_from(cfg, device="cpu"))
    _index_for(tmp_path / "idx", enc.id, enc.dim)
    code, out, _ = run(capsys, "check-config", cfg_path)
    assert code == 0 and out.strip().endswith(": OK")
    _index_for(tmp_path / "idx", "efficientnet-lite0@abc:224px:pm1:avgpool", 1280, options={"layers": "last"})
    code, out, err = run(capsys, "check-config", cfg_path)
    line = one_line(err)
    assert code == 78 and "OK" not in out
    assert "built with encoders efficientnet-lite0@abc:224px:pm1:avgpool (dim 1280)" in line
    assert 'fix: name the index\'s encoders in the config ([[encoders]] name = "efficientnet-lite0" options = { layers = "last" })' in line
    assert "cellmonitor index build DATA --out INDEX" in line


def test_check_config_finds_a_metrics_port_in_use(capsys, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, out, err = run(capsys, "check-config", write_config(tmp_path, f"metrics_port = {port}"), "--no-index")
    assert code == 78 and "OK" not in out
    assert f"service.metrics_port: 127.0.0.1:{port} cannot be bound" in one_line(err)


def test_run_with_a_bad_config_exits_78_before_loading_anything(capsys, tmp_path):
    cfg = write_config(tmp_path, "no_such_key = 1")
    code, _, err = run(capsys, "run", cfg)
    assert code == 78 and "service.no_such_key: unknown key" in one_line(err)
    assert not (tmp_path / "state").exists()


def test_metrics_port_in_use_is_exit_69_and_a_bad_address_78():
    from prometheus_client import CollectorRegistry

    from monitor.errors import ConfigError, Unavailable
    from monitor.service.metrics import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(Unavailable) as e:
            serve(CollectorRegistry(), port, "127.0.0.1")
    assert e.value.exit_status == 69 and "address already in use" in str(e.value) and f":{port}" in str(e.value)
    with pytest.raises(ConfigError) as e2:
        serve(CollectorRegistry(), 0, "192.0.2.1")  # TEST-NET: not an address of this machine
    assert e2.value.exit_status == 78 and "cannot listen" in str(e2.value)


def test_disk_full_is_exit_74_not_70(capsys, tmp_path, monkeypatch):
    import errno

    import monitor.cli.service as svc_cli
    from monitor.errors import StateWriteError

    def full(*a, **k):
        raise StateWriteError(f"{tmp_path}/state/counts.csv: cannot write the record of truth (No space left on device)")

    monkeypatch.setattr(svc_cli, "_serve", full)
    code, _, err = run(capsys, "run", write_config(tmp_path))
    assert code == 74 and "No space left on device" in one_line(err)

    def oserror(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "state" / "ledger.sqlite"))

    monkeypatch.setattr(svc_cli, "_serve", oserror)
    code, _, err = run(capsys, "run", write_config(tmp_path))
    assert code == 74 and "ledger.sqlite: No space left on device" in one_line(err)


def test_exit_status_table_is_complete_and_unique():
    codes = [c for c, _ in EXIT_STATUSES]
    assert len(codes) == len(set(codes))
    assert {0, 64, 65, 66, 69, 70, 74, 75, 78} <= set(codes)


def test_a_missing_data_folder_is_exit_66(capsys, tmp_path):
    missing = tmp_path / "no-such-data"
    code, _, err = run(capsys, "index", "build", str(missing), "--out", str(tmp_path / "idx"))
    assert code == 66 and f"{missing}: no such folder" in one_line(err)


def test_the_demo_says_which_torch_build_ran():
    import torch

    from monitor.cli.demo import torch_build

    line = torch_build()
    assert line.startswith(torch.__version__)
    assert ("a CPU-only build" in line) == (torch.version.cuda is None)
    assert line.endswith("ran on the CPU") or "ran on the GPU (" in line
