"""Expert corrections beside a built index: saved crash-safe, checked and applied on load.

``corrections.json`` names the version, the ``meta.json`` it was made for
(its SHA-256, ``base``) and the checksum of every file under
``corrections/``. Saving writes the new files, replaces ``corrections.json``
atomically, then removes older versions' files, so a kill at any point
leaves the previous or the new version whole. A record made for another
``meta.json`` (the corrections were folded in by a full save that was killed
before removing them, or the index was rebuilt under a running service) is
never applied: corrections are never added twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from monitor.hashing import file_sha256, verify_files

if TYPE_CHECKING:
    from monitor.index.store import ReferenceIndex

log = logging.getLogger(__name__)

#: expert corrections beside a built index: version, files and their checksums
CORRECTIONS = "corrections.json"


def save_corrections(index: ReferenceIndex, folder: Path) -> Path:
    """Every correction of ``index`` so far into ``corrections/v<version>.*``; returns ``corrections.json``."""
    sub = folder / "corrections"
    sub.mkdir(exist_ok=True)
    x, y, names = index._corr
    stem = f"v{index.version:05d}"
    files = {f"corrections/{stem}.vectors.npy": x, f"corrections/{stem}.labels.npy": y}
    for rel, arr in files.items():
        with open(folder / rel, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    (folder / f"corrections/{stem}.names.json").write_text(json.dumps(names))
    rels = [*files, f"corrections/{stem}.names.json"]
    rec = {"version": index.version, "base": index.base_sha, "n": len(y), "files": {r: file_sha256(folder / r) for r in rels},
           "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = folder / "corrections.json.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(rec, indent=2))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / CORRECTIONS)
    index.saved_version = index.version
    for old in sub.iterdir():
        if not old.name.startswith(stem + "."):
            old.unlink(missing_ok=True)
    return folder / CORRECTIONS


def load_corrections(index: ReferenceIndex, folder: Path, fail: Any) -> None:
    """Apply the corrections saved beside the index (checked like the index's own files);
    ``fail(message)`` makes the one-line error that names the index folder."""
    path = folder / CORRECTIONS
    if not path.is_file():
        return
    try:
        rec = json.loads(path.read_text())
        files = dict(rec["files"])
        version = int(rec["version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise fail(f"{CORRECTIONS} is unreadable ({e})") from None
    if rec.get("base") != index.base_sha:
        log.warning("%s: %s was made for another build of this index (version %s); not applied, the index as built is used",
                    folder, CORRECTIONS, rec.get("version"))
        return
    verify_files(folder, files, CORRECTIONS, fail)
    try:
        x = np.load(folder / next(r for r in files if r.endswith(".vectors.npy")), allow_pickle=False)
        y = np.load(folder / next(r for r in files if r.endswith(".labels.npy")), allow_pickle=False)
        names = json.loads((folder / next(r for r in files if r.endswith(".names.json"))).read_text())
        index.add(x, y, names)
    except (StopIteration, ValueError, OSError) as e:
        raise fail(f"expert corrections: {e}") from None
    index.version = version
