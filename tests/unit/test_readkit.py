"""The reader toolkit: pixel-size precedence, identity from a name, roles, declared-size cap, reader choice."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from monitor.errors import BadInput
from monitor.imageio import MAX_PLANE_PIXELS, as_plane, read_raster, read_tiff
from monitor.intake.readers import ReaderSet
from monitor.readkit import choose_pixel_size, guess_role, key_from_match
from monitor.records import FrameKey


def test_pixel_size_precedence_and_source():
    meta = (0.5, "metadata:ome")
    assert choose_pixel_size("f.tif", [None, meta], 0.3, False, "x") == (0.5, "metadata:ome")
    assert choose_pixel_size("f.tif", [meta], 0.3, True, "x") == (0.3, "config")  # prefer_config wins
    assert choose_pixel_size("f.tif", [None], 0.3, False, "x") == (0.3, "config")  # file has none
    assert choose_pixel_size("f.tif", [(0.2, "metadata:gen5"), meta], None, False, "x") == (0.2, "metadata:gen5")
    with pytest.raises(BadInput, match=r"f.tif: no pixel size .* \(set readers.tiff.pixel_size_um\)"):
        choose_pixel_size("f.tif", [None], None, False, "readers.tiff.pixel_size_um")
    with pytest.raises(BadInput, match="outside the sane range"):
        choose_pixel_size("f.tif", [(72.0, "metadata:resolution")], None, False, "x")


def test_key_from_match_fills_what_the_name_lacks():
    rx = re.compile(r"^(?P<well>[A-Z]\d+)_t(?P<timepoint>\d+)")
    assert key_from_match(rx.match("B3_t07.tif"), "B3_t07.tif", "exp") == FrameKey("exp", "B3", "1", 7)
    assert key_from_match(None, "/x/scan_0042.tif", "exp") == FrameKey("exp", "-", "1", 42)
    rx2 = re.compile(r"^(?P<experiment>\w+?)_(?P<well>[A-Z]\d+)\.tif$")
    assert key_from_match(rx2.match("run1_C2.tif"), "run1_C2.tif", "exp") == FrameKey("run1", "C2", "1", 2)  # no timepoint group: the last number


@pytest.mark.parametrize("name, role", [("Bright Field", "transmitted"), ("Phase Contrast", "transmitted"), ("RI", "transmitted"),
                                        ("Texas Red", "fluorescence"), ("Apo-15", "marker"), ("PI", "marker"), ("dead_nuclei_channel", "marker"),
                                        ("SYTOX Green", "marker"), ("Hoechst 33342", "nuclear"), ("DAPI", "nuclear"),
                                        ("live_nuclei_channel", "nuclear"), ("FL1", "fluorescence"), ("chan0", None)])
def test_guess_role(name, role):
    assert guess_role(name) == role


def _tiff_declaring(path: Path, height: int, width: int) -> Path:
    """A small real TIFF whose IFD is patched to declare height x width pixels."""
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8))
    b = bytearray(path.read_bytes())
    assert b[:2] == b"II"
    ifd = struct.unpack_from("<I", b, 4)[0]
    n = struct.unpack_from("<H", b, ifd)[0]
    for i in range(n):
        e = ifd + 2 + 12 * i
        tag, typ = struct.unpack_from("<HH", b, e)
        if tag in (256, 257):
            val = width if tag == 256 else height
            struct.pack_into("<I" if typ == 4 else "<H", b, e + 8, val)
    path.write_bytes(bytes(b))
    return path


def test_a_tiff_declaring_a_huge_plane_is_refused_before_decoding(tmp_path):
    p = _tiff_declaring(tmp_path / "bomb.tif", 45_824, 45_824)
    assert p.stat().st_size < 50_000
    with pytest.raises(BadInput, match=r"bomb.tif: declares 45824 x 45824 pixels per plane, above the limit"):
        read_tiff(p)
    ok = _tiff_declaring(tmp_path / "ok.tif", 16, 16)
    assert read_tiff(ok).pages[0].shape == (16, 16)


def test_a_png_declaring_a_huge_plane_is_refused(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    side = int(MAX_PLANE_PIXELS**0.5) + 1
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")
    p = tmp_path / "bomb.png"
    p.write_bytes(png)
    with pytest.raises(BadInput, match="declares .* pixels per plane"):
        read_raster(p)


def test_non_finite_float_planes():
    a = np.ones((4, 4), np.float32)
    a[0, 0], a[1, 1] = np.nan, np.inf
    out = as_plane("f.tif", "RI", a)
    assert np.isfinite(out).all() and out.max() == 1.0
    with pytest.raises(BadInput, match="f.tif: channel 'RI' holds no finite value"):
        as_plane("f.tif", "RI", np.full((4, 4), np.nan, np.float32))


class _Raising:
    name = "raising"
    specificity = 9

    def accepts(self, path):
        raise RuntimeError("boom")

    def read(self, path):  # pragma: no cover - never chosen
        raise AssertionError("a reader whose accepts raised was chosen")


class _Taking:
    name = "taking"
    specificity = 0

    def accepts(self, path):
        return None

    def read(self, path):  # pragma: no cover
        raise AssertionError


def test_reader_choice_declines_a_reader_whose_accepts_raises():
    rs = ReaderSet([_Raising(), _Taking()])
    assert rs.choose(Path("x.tif")).name == "taking"
    verdicts = dict((r.name, why) for r, why in rs.explain(Path("x.tif")))
    assert verdicts["raising"].startswith("accepts() failed: RuntimeError: boom") and verdicts["taking"] is None
    with pytest.raises(BadInput, match="raising: accepts\\(\\) failed"):
        ReaderSet([_Raising()]).choose(Path("x.tif"))
