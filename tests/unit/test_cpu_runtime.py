"""The CNN encoders on a CPU inference runtime (ONNX Runtime, OpenVINO): same vectors as torch,
a cached export keyed by the encoder and the runtime's version, rebuilt (one WARNING) when it is
corrupt or from another version, torch whenever the runtime is missing or disagrees."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from cellmonitor_plugins.encoders import runtime as rt
from cellmonitor_plugins.encoders.efficientnet import FittedLiteEncoder, load_efficientnet_lite

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 255, (5, 48, 48, 3), dtype=np.uint8)


def _enc(layers: str = "all", pool: str = "mean"):
    """A random-weight Lite0, the same weights every time (its id says "random", not a digest)."""
    import torch

    torch.manual_seed(0)
    return load_efficientnet_lite(0, None, input_px=64, random_init=True, layers=layers, pool=pool)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(("layers", "pool"), [("last", "mean"), ("all", "gem"), ("multi", "meanmax")])
def test_onnxruntime_gives_torchs_vectors_and_names_itself(tmp_path: Path, crops: np.ndarray, layers: str, pool: str) -> None:
    enc = _enc(layers, pool)
    want = enc.encode(crops)
    assert enc.runtime.startswith("torch ")
    enc.use_runtime("onnxruntime", tmp_path)
    assert enc.runner is not None and enc.runtime.startswith(f"onnxruntime {ort.__version__} (")
    got = enc.encode(crops)
    assert got.shape == want.shape and got.dtype == np.float32 and _rel(got, want) < 1e-4
    # row-independent, as the Encoder contract asks (batches are split and merged freely)
    assert _rel(np.concatenate([enc.encode(crops[:2]), enc.encode(crops[2:])]), want) < 1e-4


def test_openvino_gives_torchs_vectors(tmp_path: Path, crops: np.ndarray) -> None:
    pytest.importorskip("openvino")
    enc = _enc()
    want = enc.encode(crops)
    enc.use_runtime("openvino", tmp_path)
    assert enc.runner is not None and enc.runtime.startswith("openvino ")
    assert _rel(enc.encode(crops), want) < 1e-4  # pinned to f32: bf16 units would change the calls


def test_the_export_is_cached_and_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    enc = _enc()
    with caplog.at_level(logging.INFO, logger=rt.__name__):
        enc.use_runtime("onnxruntime", tmp_path)
    (onnx,) = tmp_path.glob("*.onnx")
    record = json.loads(onnx.with_suffix(".json").read_text())
    assert record["runtime"] == "onnxruntime" and record["runtime_version"] == ort.__version__ and record["encoder"] == enc.id
    assert "exported" in caplog.text
    caplog.clear()
    stamp = onnx.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger=rt.__name__):
        _enc().use_runtime("onnxruntime", tmp_path)
    assert "exported" not in caplog.text and onnx.stat().st_mtime_ns == stamp
    # another encoder configuration (here: another pool) is another export, never the cached one
    _enc("all", "gem").use_runtime("onnxruntime", tmp_path)
    assert len(list(tmp_path.glob("*.onnx"))) == 2


@pytest.mark.parametrize("damage", ["corrupt", "version"])
def test_a_corrupt_or_other_version_export_is_rebuilt_with_one_warning(tmp_path: Path, crops: np.ndarray, damage: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    enc = _enc()
    want = enc.encode(crops)
    enc.use_runtime("onnxruntime", tmp_path)
    (onnx,) = tmp_path.glob("*.onnx")
    if damage == "corrupt":
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
        why = "digest does not match"
    else:
        meta = onnx.with_suffix(".json")
        meta.write_text(json.dumps(json.loads(meta.read_text()) | {"runtime_version": "0.0.1"}))
        why = "runtime_version '0.0.1'"
    again = _enc()
    with caplog.at_level(logging.INFO, logger=rt.__name__):
        again.use_runtime("onnxruntime", tmp_path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and why in warnings[0].getMessage() and "rebuilding" in warnings[0].getMessage()
    assert again.runner is not None and _rel(again.encode(crops), want) < 1e-4
    assert json.loads(onnx.with_suffix(".json").read_text())["runtime_version"] == ort.__version__


def test_a_runtime_that_disagrees_with_torch_is_never_used(tmp_path: Path, crops: np.ndarray, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    enc = _enc()
    want = enc.encode(crops)
    real = rt._session

    def off_by_one_percent(*a: object) -> object:
        run = real(*a)  # type: ignore[arg-type]
        return lambda x: run(x) * 1.01

    monkeypatch.setattr(rt, "_session", off_by_one_percent)
    with caplog.at_level(logging.WARNING, logger=rt.__name__):
        enc.use_runtime("onnxruntime", tmp_path)
    assert enc.runner is None and enc.runtime.startswith("torch")
    assert "differ from torch" in caplog.text and "torch runs instead" in caplog.text
    assert np.array_equal(enc.encode(crops), want)


def test_runtime_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rt.choose("auto", "cuda") == "torch" and rt.choose("onnxruntime", "cuda:0") == "torch"  # GPUs: torch
    assert rt.choose("torch", "cpu") == "torch"
    assert rt.choose("auto", "cpu") == "onnxruntime"
    monkeypatch.setattr(rt, "available", lambda name: None)
    assert rt.choose("auto", "cpu") == "torch"  # nothing installed: torch, no error
    with pytest.raises(ValueError, match="pip install openvino"):
        rt.choose("openvino", "cpu")


def test_a_fitted_encoder_runs_its_eight_views_on_the_runtime(tmp_path: Path, crops: np.ndarray) -> None:
    """The fitted encoder's test-time views go through the runtime as one batch: same vectors, and
    the export is kept beside the fitted weights."""
    import torch

    base = _enc("last", "mean")
    enc = FittedLiteEncoder(0, "random", base.model, 64, 16)
    arrays = {f"model.{k}": v.numpy() for k, v in enc.model.state_dict().items()}
    arrays |= {f"proj.{k}": v.detach().numpy() for k, v in enc.proj.state_dict().items()}
    path = tmp_path / "fit" / "efficientnet-lite0.npz"
    path.parent.mkdir()
    np.savez(path, **arrays)
    enc.load(path)
    with torch.inference_mode():
        want = enc.encode(crops)
    enc.use_runtime("onnxruntime", path.parent)
    assert enc.runner is not None and list(path.parent.glob("*.onnx"))
    assert _rel(enc.encode(crops), want) < 1e-4


def test_beside_a_runtime_torch_and_blas_keep_one_thread() -> None:
    """Every encoder on a runtime: torch and BLAS one thread each (their pools spinning beside the
    runtime's and the segment-ahead thread cost a backlog a sixth of a frame); an encoder on torch
    leaves both as they are; the compute log line says the BLAS threads."""
    from types import SimpleNamespace

    import torch
    threadpoolctl = pytest.importorskip("threadpoolctl")

    from monitor.service import wiring

    torch_before = torch.get_num_threads()
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        torch.set_num_threads(2)
        try:
            wiring.torch_threads_beside_runtime([SimpleNamespace(runtime="torch 2 (2 threads)"), SimpleNamespace(runtime="onnxruntime 1")])
            assert torch.get_num_threads() == 2 and wiring.blas_threads() == 2
            wiring.torch_threads_beside_runtime([SimpleNamespace(runtime="onnxruntime 1.32.0 (2 threads)")])
            assert torch.get_num_threads() == 1 and wiring.blas_threads() == 1
            p = SimpleNamespace(encoders=[SimpleNamespace(name="lite0", runtime="onnxruntime")], segmenter=object())
            assert "BLAS 1 thread(s)" in wiring.compute_line(p)  # type: ignore[arg-type]
        finally:
            torch.set_num_threads(torch_before)
