"""25 kinds of bad input among good frames, through the real readers (auto choice): the
service survives each, gives it one log line naming the file, quarantines or skips it (or,
where the reader can make a frame of it, counts it once), and counts the good frames once."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fixtures.faultkit import csv_rows, fault_service, run_idle
from fixtures.service import blobs

from monitor.config import parse_config
from monitor.intake.ledger import path_text
from monitor.intake.readers import build_readers
from monitor.protocols import BuildContext
from monitor.registry import Registry

RES = (1 / 0.322, 1 / 0.322)  # pixels per micrometre (resolution unit: none -> the reader's default)


def tiff_header_only(path: Path, w: int, h: int) -> None:
    """A valid TIFF whose one strip claims w x h uint16 pixels but holds 16 bytes."""
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 16), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 12 * 10 + 4), (277, 3, 1, 1), (278, 4, 1, h), (279, 4, 1, 16), (284, 3, 1, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 16)


QUARANTINED, COUNTED_OR_QUARANTINED, IGNORED = "quarantined", "counted or quarantined", "ignored"


def write_bad(d: Path) -> dict[str, tuple[str, str]]:
    """Bad inputs written into ``d``: {shown name: (what it is, expected outcome)}."""
    import cv2

    good = blobs(3, 0.3)
    u16 = (good * 1000).astype(np.uint16)
    bad: dict[str, tuple[str, str]] = {}

    def add(name: str, desc: str, outcome: str) -> Path:
        bad[path_text(name)] = (desc, outcome)
        return d / name

    add("B1_f1_t1_phase.tif", "empty file", QUARANTINED).write_bytes(b"")
    add("B2_f1_t1_phase.tif", "random bytes", QUARANTINED).write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    cv2.imwrite(str(d / "tmp.png"), (good * 255).astype(np.uint8))
    os.replace(d / "tmp.png", add("B3_f1_t1_phase.tif", "PNG under a .tif name", QUARANTINED))
    tifffile.imwrite(add("B4_f1_t1_phase.tif", "1x1 image", COUNTED_OR_QUARANTINED), np.ones((1, 1), np.uint16), resolution=RES)
    tifffile.imwrite(add("B5_f1_t1_phase.tif", "50-plane stack", COUNTED_OR_QUARANTINED), np.zeros((50, 32, 32), np.uint16))
    nan = good.copy()
    nan[10:20, 10:20] = np.nan
    tifffile.imwrite(add("B6_f1_t1_phase.tif", "NaN float pixels", COUNTED_OR_QUARANTINED), nan)
    inf = good.copy()
    inf[5, 5] = np.inf
    tifffile.imwrite(add("B7_f1_t1_phase.tif", "inf float pixel", COUNTED_OR_QUARANTINED), inf)
    tiff_header_only(add("B8_f1_t1_phase.tif", "huge declared size (45,824 x 45,824 in a tiny file)", QUARANTINED), 45824, 45824)
    tifffile.imwrite(add("B9_f1_t1_phase.tif", "decompression bomb (30,000 x 30,000 zlib zeros)", QUARANTINED),
                     np.zeros((30000, 30000), np.uint8), compression="zlib", tile=(1024, 1024))
    bomb = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
            '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]><BTIImageMetaData><ImageReference><Well>&lol3;</Well>'
            '</ImageReference></BTIImageMetaData>')
    tifffile.imwrite(add("C1_f1_t1_phase.tif", "entity-bomb XML (Gen5 metadata)", QUARANTINED), u16, description=bomb)
    tifffile.imwrite(add("C2_f1_t1_phase.tif", "absurd pixel size (1,000 um/px)", QUARANTINED), u16, resolution=(10, 10), resolutionunit="CENTIMETER")
    add("C3_f1_t1_phase.tif", "a directory named like a frame", IGNORED).mkdir()
    os.symlink("C4_f1_t1_phase.tif", add("C4_f1_t1_phase.tif", "a symlink loop", IGNORED))
    os.symlink("nowhere.tif", add("C5_f1_t1_phase.tif", "a dangling symlink", IGNORED))
    tifffile.imwrite(d / "tmp.tif", u16)
    data = (d / "tmp.tif").read_bytes()
    (d / "tmp.tif").unlink()
    add("C6_f1_t1_phase.tif", "truncated TIFF, never completed", QUARANTINED).write_bytes(data[: len(data) // 3])
    with open(os.path.join(os.fsencode(d), b"C7_f1_t1_ph\xffse.tif"), "wb") as f:
        f.write(b"not a tiff")
    bad[path_text(os.fsdecode(b"C7_f1_t1_ph\xffse.tif"))] = ("non-UTF-8 name, not an image", QUARANTINED)
    add("C8_f1_t1_pha\nse.tif", "newline in the name, 4 bytes", QUARANTINED).write_bytes(b"junk")
    add("notes without numbers.tif", "a name no pattern matches", COUNTED_OR_QUARANTINED).write_bytes(data)
    tifffile.imwrite(add("D1_f1_t1_phase.tif", "int64 pixels", COUNTED_OR_QUARANTINED), u16.astype(np.int64))
    tifffile.imwrite(add("D2_f1_t1_phase.tif", "two samples per pixel (Y, X, 2)", QUARANTINED), np.zeros((32, 32, 2), np.uint16),
                     photometric="minisblack", planarconfig="contig")
    broken = bytearray(data)
    broken[4:8] = struct.pack("<I", len(data) + 1000)
    add("D3_f1_t1_phase.tif", "TIFF magic, first IFD past the end", QUARANTINED).write_bytes(bytes(broken))
    tifffile.imwrite(add("D4_f1_t1_phase.tif", "constant image (no cells)", COUNTED_OR_QUARANTINED), np.full((128, 128), 500, np.uint16), resolution=RES)
    tifffile.imwrite(add("D5_f1_t1_phase.tif", "all-zero image (an empty field)", COUNTED_OR_QUARANTINED), np.zeros((128, 128), np.uint16), resolution=RES)
    cv2.imwrite(str(d / "tmp.jpg"), (good * 255).astype(np.uint8))
    jpg = (d / "tmp.jpg").read_bytes()
    (d / "tmp.jpg").unlink()
    add("D6_f1_t1_phase.jpg", "truncated JPEG", COUNTED_OR_QUARANTINED).write_bytes(jpg[: len(jpg) // 2])
    return bad


def readers(tmp: Path):
    def build(cfg):
        c = parse_config({"readers": {"tiff": {"pixel_size_um": 0.322}}}, "t.toml", tmp)
        return build_readers(c, Registry(), BuildContext(state_dir=tmp / "state", experiment="test"))

    return build


@pytest.mark.timeout(120)
def test_every_kind_of_bad_input_gets_one_line_and_good_frames_are_counted_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    svc = fault_service(tmp_path, service={"patterns": ["*.tif", "*.tiff", "*.png", "*.jpg"], "ready_deadline_s": 1.0}, readers=readers(tmp_path))
    w = svc.settings.watch_dir
    for t in range(1, 6):
        tifffile.imwrite(w / f"A1_f1_t{t}_phase.tif", (blobs(t, 0.3) * 1000).astype(np.uint16), resolution=RES)
    bad = write_bad(w)
    gone = w / "E1_f1_t1_phase.tif"  # deleted on arrival: seen, then gone before it is read
    tifffile.imwrite(gone, (blobs(2, 0.3) * 1000).astype(np.uint16), resolution=RES)
    svc.backlog()
    gone.unlink()
    bad[gone.name] = ("deleted on arrival", IGNORED)
    run_idle(svc)
    svc.close()
    # rewritten after it was counted: read again, recognised, not counted twice
    tifffile.imwrite(w / "A1_f1_t2_phase.tif", (blobs(4, 0.3) * 1000).astype(np.uint16), resolution=RES)
    bad["A1_f1_t2_phase.tif (rewritten)"] = ("rewritten after it was counted", "already recorded")
    svc = fault_service(tmp_path, service={"patterns": ["*.tif", "*.tiff", "*.png", "*.jpg"], "ready_deadline_s": 1.0}, readers=readers(tmp_path))
    run_idle(svc)
    svc.close()

    assert len(bad) >= 25
    rows = csv_rows(tmp_path)
    counted: dict[str, int] = {}
    for r in rows:
        for s in r["sources"].split(";"):
            counted[s] = counted.get(s, 0) + 1
    good = sorted((int(r["timepoint"]), int(r["n_cells"])) for r in rows if r["well"] == "A1")
    assert good == [(t, t) for t in range(1, 6)]  # each good frame once, t2 with its first content
    q = (tmp_path / "state" / "quarantine.csv").read_text(encoding="utf-8").splitlines()[1:]
    quarantined: dict[str, int] = {}
    for line in q:
        name = Path(line.split(",")[1]).name
        quarantined[name] = quarantined.get(name, 0) + 1
    messages = [r.getMessage() for r in caplog.records if r.name.startswith(("monitor", "cellmonitor"))]
    assert all("\n" not in m for m in messages)
    report = []
    for name, (desc, outcome) in bad.items():
        shown = name.split(" (rewritten)")[0]
        lines = [m for m in messages if shown in m and ("quarantined" in m or "ignored" in m or "already recorded" in m)]
        in_csv, in_q = counted.get(shown, 0), quarantined.get(shown, 0)
        if outcome == QUARANTINED:
            ok = in_q == 1 and in_csv == 0 and len(lines) == 1
        elif outcome == COUNTED_OR_QUARANTINED:
            ok = in_q + in_csv == 1 and len(lines) == in_q
        elif outcome == IGNORED:
            ok = in_q == 0 and in_csv == 0 and len(lines) == 1
        else:
            ok = len(lines) == 1 and in_csv == 1
        report.append(f"{'ok ' if ok else 'BAD'} {desc:<50} csv={in_csv} quarantine={in_q} lines={len(lines)}")
    assert all(r.startswith("ok") for r in report), "\n".join(report)
    # nothing left to do: a third start reads none of them again
    caplog.clear()
    svc = fault_service(tmp_path, service={"patterns": ["*.tif", "*.tiff", "*.png", "*.jpg"], "ready_deadline_s": 1.0}, readers=readers(tmp_path))
    run_idle(svc)
    read_again = svc.metrics.registry.get_sample_value("cellmonitor_files_total", {"result": "read"})
    svc.close()
    assert read_again is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
