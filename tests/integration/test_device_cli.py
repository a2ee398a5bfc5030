"""``pipeline.device = "cuda"`` on a machine without a usable GPU: one line, exit 78, before any model loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_run_with_cuda_and_no_gpu_exits_78_in_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text('[service]\nwatch_dir = "in"\nstate_dir = "state"\nmetrics_port = 0\n[pipeline]\ndevice = "cuda"\n')
    r = subprocess.run([sys.executable, "-m", "monitor.cli.main", "run", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 78
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert errors == [errors[0]] and "pipeline.device = 'cuda' but no usable GPU" in errors[0] and "cuda-or-cpu" in errors[0]
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_cuda_or_cpu_is_the_logged_fallback(tmp_path, caplog):
    import logging

    from monitor.config import parse_config
    from monitor.device import resolve_device

    cfg = parse_config({"pipeline": {"device": "cuda-or-cpu"}}, "t.toml", tmp_path)
    with caplog.at_level(logging.INFO, logger="monitor.device"):
        assert resolve_device(cfg.pipeline.device) == "cpu"
    fallback = [r for r in caplog.records if r.name == "monitor.device"]
    assert len(fallback) == 1 and fallback[0].levelno == logging.WARNING  # one line, seen at the default log level
    assert "cuda-or-cpu: no usable GPU" in fallback[0].getMessage() and "running on the CPU" in fallback[0].getMessage()
