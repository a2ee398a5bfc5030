"""Reader plugins against vendor-like exports: Gen5, Nanolive, generic TIFF/PNG/JPEG.

Every bad input must give one line naming the file (BadInput, or NotReady for
a file caught mid-write), never a crash; every good one must give the values
written into it.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cellmonitor_plugins.readers import gen5, nanolive, tiff
from fixtures.vendor import (
    BRIGHT_FIELD,
    DAPI_STITCHED,
    LIONHEART_20X_UM,
    TEXAS_RED,
    Gen5Plate,
    bti_xml,
    entity_bomb_xml,
    ri_stack,
    synthetic_cells,
    truncated_copy,
    write_gen5_file,
    write_gen5_ome,
    write_gen5_plate,
    write_nanolive_export,
    write_tiff,
)

from monitor.cli.main import main
from monitor.config import Config
from monitor.errors import BadInput, NotReady
from monitor.imaging import rescale
from monitor.intake.assemble import FrameAssembler
from monitor.intake.readers import build_readers
from monitor.protocols import BuildContext, FrameReader
from monitor.registry import Registry
from monitor.testing import check_reader

GEN5_NAME = "A1_03_1_1_Bright Field_001.tif"


def gen5_reader(**kw) -> gen5.Gen5Reader:
    return gen5.Gen5Reader(gen5.Options(**kw), "svc-exp")


def nano_reader(**kw) -> nanolive.NanoliveReader:
    return nanolive.NanoliveReader(nanolive.Options(**kw), "svc-exp")


def tiff_reader(**kw) -> tiff.TiffReader:
    return tiff.TiffReader(tiff.Options(**kw), "svc-exp")


def one_line_naming(err: BaseException, path: Path) -> str:
    msg = str(err)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert msg.startswith(str(path)), f"does not name the file: {msg!r}"
    return msg


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Gen5Plate:
    return write_gen5_plate(tmp_path_factory.mktemp("gen5"))


@pytest.fixture(scope="module")
def auto_readers(tmp_path_factory):
    ctx = BuildContext(state_dir=tmp_path_factory.mktemp("state"), experiment="svc-exp")
    return build_readers(Config(), Registry(), ctx)


# -- contract: every built-in reader -------------------------------------------------------


def test_every_builtin_reader_is_installed_and_ordered_by_specificity(auto_readers):
    names = [r.name for r in auto_readers.readers]
    assert names.index("gen5") < names.index("nanolive") < names.index("tiff")
    for r in auto_readers.readers:
        assert isinstance(r, FrameReader)
    assert gen5.Gen5Reader.specificity > tiff.TiffReader.specificity == 0


def test_contract_gen5(plate, tmp_path):
    bad = write_tiff(tmp_path / GEN5_NAME, synthetic_cells((32, 32)), entity_bomb_xml())
    acq = check_reader(gen5_reader(), plate.files[0], bad)
    assert acq.instrument == "gen5"


def test_contract_nanolive(tmp_path):
    ex = write_nanolive_export(tmp_path, timepoints=1)
    bad = tmp_path / "HeLa_A1_pos1_RI_t0002.tif"
    bad.write_text("not an image at all, but long enough")
    acq = check_reader(nano_reader(), ex.ri_files[0], bad)
    # the identity comes from the name HeLa_drugA_A1_pos1_RI_t0001.tif: experiment, well, field, timepoint
    assert (acq.key.experiment, acq.key.well, acq.key.field, acq.key.timepoint) == ("HeLa_drugA", "A1", "1", 1)
    later = nano_reader().read(write_nanolive_export(tmp_path / "b", well="C7", position=3, timepoints=2).ri_files[1])
    assert (later.key.well, later.key.field, later.key.timepoint) == ("C7", "3", 2)


def test_contract_tiff(tmp_path):
    good = write_tiff(tmp_path / "exp_A1_f1_t3_phase.tif", synthetic_cells((32, 32)))
    bad = write_tiff(tmp_path / "exp_A1_f1_t4_phase.tif", synthetic_cells((32, 32)))
    acq = check_reader(tiff_reader(pixel_size_um=0.5), good)
    assert (acq.key.experiment, acq.key.well, acq.key.field, acq.key.timepoint) == ("exp", "A1", "1", 3)
    with pytest.raises(BadInput) as e:
        tiff_reader().read(bad)  # no pixel size anywhere
    assert "set readers.tiff.pixel_size_um" in one_line_naming(e.value, bad)


# -- Gen5 -----------------------------------------------------------------------------------


def test_gen5_kinetic_plate_reads_every_file_exactly(plate):
    r = gen5_reader()
    assert len(plate.files) == 2 * 2 * 2 * 3
    seen = set()
    for (well, fld, ch, t), img in plate.images.items():
        path = plate.file(well, fld, ch, t)
        assert r.accepts(path) is None
        a = r.read(path)
        assert a.key.experiment == "241128_111010_Plate 1"
        assert (a.key.well, a.key.field, a.key.timepoint) == (well, str(fld), t)
        assert list(a.channels) == [ch]
        assert a.channels[ch].dtype == np.uint16 and np.array_equal(a.channels[ch], img)
        assert a.pixel_size_source == "metadata:gen5"
        assert a.pixel_size_um == pytest.approx(LIONHEART_20X_UM, rel=1e-4)
        assert a.acquired_at == plate.when(t)
        assert a.metadata["plate"] == "Plate 1" and a.metadata["objective"] == "20x"
        assert a.metadata["numerical_aperture"] == "0.45"
        if ch == "Texas Red":
            assert (a.metadata["excitation_nm"], a.metadata["emission_nm"]) == ("586", "647")
            assert a.metadata["transmitted"] == "False"
        seen.add(a.key)
    assert len(seen) == 2 * 2 * 3


def test_gen5_plate_assembles_into_complete_frames(plate):
    r = gen5_reader()
    asm = FrameAssembler(["Bright Field", "Texas Red"], wait_s=60)
    frames = [f for p in plate.files if (f := asm.add(r.read(p))) is not None]
    assert len(frames) == 12 and asm.n_pending == 0
    for f in frames:
        assert (f.primary, f.control, f.missing_channels) == ("Bright Field", "Texas Red", ())
        assert len(f.sources) == 2
    assert sorted({(f.key.well, f.key.field) for f in frames}) == [("A1", "1"), ("A1", "2"), ("B2", "1"), ("B2", "2")]
    assert rescale(frames[0], 0.322).shape_px == frames[0].shape_px  # Lionheart 20x already on the common grid


def test_gen5_plate_missing_channel_released_after_wait(plate):
    clock = [0.0]
    asm = FrameAssembler(["Bright Field", "Texas Red"], wait_s=30, clock=lambda: clock[0])
    assert asm.add(gen5_reader().read(plate.file("A1", 1, "Bright Field", 1))) is None
    clock[0] = 31
    (f,) = asm.due()
    assert f.missing_channels == ("Texas Red",) and f.control is None


def test_gen5_ome_tiff_with_xml_annotation(tmp_path):
    img = synthetic_cells((48, 64))
    p = write_gen5_ome(tmp_path / "A1_03_2_1_DAPI_004.ome.tif", img, channel=DAPI_STITCHED, well="A1")
    a = gen5_reader().read(p)
    assert a.pixel_size_source == "metadata:gen5"
    assert a.pixel_size_um == pytest.approx(LIONHEART_20X_UM, rel=1e-4)
    assert list(a.channels) == ["DAPI"] and a.key.timepoint == 4 and a.key.experiment == "svc-exp"
    assert (a.metadata["channel_xml"], a.metadata["excitation_nm"], a.metadata["emission_nm"]) == ("DAPI", "377", "447")
    # the generic reader sees the same file's OME PhysicalSizeX
    t = tiff_reader().read(p)
    assert t.pixel_size_source == "metadata:ome" and t.pixel_size_um == pytest.approx(LIONHEART_20X_UM, rel=1e-4)


def test_gen5_file_without_gen5_name_is_recognised_by_its_xml(tmp_path, auto_readers):
    p = write_gen5_file(tmp_path / "exported image.tif", synthetic_cells((32, 40)), channel=TEXAS_RED, well="C07")
    assert auto_readers.choose(p).name == "gen5"
    with pytest.raises(BadInput) as e:  # by default a name Gen5 does not write is not given a guessed identity
        gen5_reader().read(p)
    assert "not Gen5's export naming" in one_line_naming(e.value, p) and 'unrecognised_names = "accept"' in str(e.value)
    a = gen5_reader(unrecognised_names="accept").read(p)
    assert (a.key.well, list(a.channels), a.metadata["name_variant"]) == ("C7", ["Texas Red"], "unrecognised")


def test_a_file_managers_copy_of_a_gen5_file_is_quarantined_not_given_a_wrong_timepoint(tmp_path):
    """'B3_02_1_1_Bright Field_005 (1).tif' would read as timepoint 1 from its trailing number."""
    p = write_gen5_file(tmp_path / "B3_02_1_1_Bright Field_005 (1).tif", synthetic_cells((32, 40)), well="B3")
    with pytest.raises(BadInput) as e:
        gen5_reader().read(p)
    assert "a copy such as 'name (1).tif'" in one_line_naming(e.value, p)


def test_gen5_name_without_xml_falls_back_to_config_or_one_line(tmp_path):
    p = write_gen5_file(tmp_path / GEN5_NAME, synthetic_cells((32, 32)), xml=False)
    with pytest.raises(BadInput) as e:
        gen5_reader().read(p)
    msg = one_line_naming(e.value, p)
    assert "no <BTIImageMetaData> XML" in msg and "readers.gen5.pixel_size_um" in msg
    a = gen5_reader(pixel_size_um=0.65).read(p)
    assert (a.pixel_size_um, a.pixel_size_source, a.metadata["bti_xml"]) == (0.65, "config", "absent")
    assert a.key.well == "A1" and list(a.channels) == ["Bright Field"]


def test_gen5_prefer_config_pixel_size(plate):
    a = gen5_reader(pixel_size_um=0.5, prefer_config_pixel_size=True).read(plate.files[0])
    assert (a.pixel_size_um, a.pixel_size_source) == (0.5, "config")


def test_gen5_entity_bomb_is_refused_fast_with_one_line(tmp_path):
    p = write_tiff(tmp_path / GEN5_NAME, synthetic_cells((32, 32)), entity_bomb_xml(levels=12))
    t0 = time.perf_counter()
    with pytest.raises(BadInput) as e:
        gen5_reader().read(p)
    assert time.perf_counter() - t0 < 2.0
    assert "DTD or entities" in one_line_naming(e.value, p)
    assert not isinstance(e.value, NotReady)  # never readable: quarantine, do not retry


def test_gen5_malformed_xml_is_bad_input(tmp_path):
    p = write_tiff(tmp_path / GEN5_NAME, synthetic_cells((32, 32)), "<BTIImageMetaData><ImageAcquisition>")
    with pytest.raises(BadInput) as e:
        gen5_reader().read(p)
    assert "malformed XML" in one_line_naming(e.value, p)


def test_gen5_pixel_size_out_of_range_names_file_and_source(tmp_path):
    p = write_gen5_file(tmp_path / GEN5_NAME, synthetic_cells((32, 32)), pixel_size_um=0.01)
    with pytest.raises(BadInput) as e:
        gen5_reader().read(p)
    msg = one_line_naming(e.value, p)
    assert "0.01 um/px from metadata:gen5" in msg and "0.05..5.0" in msg


def test_gen5_8bit_and_rgb_exports(tmp_path):
    g8 = (synthetic_cells((32, 48)) >> 8).astype(np.uint8)
    a = gen5_reader().read(write_gen5_file(tmp_path / GEN5_NAME, g8))
    assert a.channels["Bright Field"].dtype == np.uint8 and np.array_equal(a.channels["Bright Field"], g8)
    rgb = np.stack([g8, g8 // 2, g8 // 3], axis=-1)
    p = tmp_path / "A1_03_2_1_Texas Red_001.tif"
    write_tiff(p, rgb, bti_xml(channel=TEXAS_RED, width_px=48, height_px=32), photometric="rgb")
    a = gen5_reader().read(p)
    assert a.channels["Texas Red"].shape == (32, 48, 3) and np.array_equal(a.channels["Texas Red"], rgb)


def test_gen5_multi_page_one_channel_per_page(tmp_path):
    bf, tr = synthetic_cells((32, 32), seed=1), synthetic_cells((32, 32), seed=2)
    p = tmp_path / "A1_03_1_1_Bright Field_005.tif"
    with tifffile.TiffWriter(p) as tw:
        tw.write(bf, description=bti_xml(channel=BRIGHT_FIELD, width_px=32, height_px=32), metadata=None)
        tw.write(tr, description=bti_xml(channel=TEXAS_RED, width_px=32, height_px=32), metadata=None)
    a = gen5_reader().read(p)
    assert list(a.channels) == ["Bright Field", "Texas Red"]
    assert np.array_equal(a.channels["Texas Red"], tr) and a.key.timepoint == 5


def test_gen5_z_planes_get_distinct_channel_names_or_one_is_kept(tmp_path):
    p0 = write_gen5_file(tmp_path / "C01_06_1_1Z0_Bright Field_001.tif", synthetic_cells((16, 16)))
    p1 = write_gen5_file(tmp_path / "C01_06_1_1Z1_Bright Field_001.tif", synthetic_cells((16, 16)))
    assert list(gen5_reader().read(p1).channels) == ["Bright Field Z1"]
    r = gen5_reader(z_plane=0)
    assert r.accepts(p1) is not None and r.accepts(p0) is None
    assert list(r.read(p0).channels) == ["Bright Field"]


def test_gen5_roi_and_explicit_names_give_field_ids(tmp_path):
    img = synthetic_cells((16, 16))
    a = gen5_reader().read(write_gen5_file(tmp_path / "B1ROI14_02_1_1_Bright Field_005.tif", img, well="B1"))
    assert (a.key.well, a.key.field, a.key.timepoint, a.metadata["roi"]) == ("B1", "ROI14-1", 5, "14")
    b = gen5_reader().read(write_gen5_file(tmp_path / "B2_02_SP10Z10_C1_Bright Field_T001.tif", img, well="B2"))
    assert (b.key.field, b.metadata["z"], b.metadata["name_variant"]) == ("10", "10", "explicit")


def test_gen5_well_mismatch_is_noted_and_name_wins(tmp_path):
    p = write_gen5_file(tmp_path / GEN5_NAME, synthetic_cells((16, 16)), well="H12")
    a = gen5_reader().read(p)
    assert a.key.well == "A1" and a.metadata["well_mismatch"] == "name A1, xml H12"


def test_gen5_channel_mismatch_is_a_warning_and_noted(tmp_path, caplog):
    import logging

    p = write_gen5_file(tmp_path / GEN5_NAME, synthetic_cells((16, 16)), channel=TEXAS_RED)  # named Bright Field, XML says Texas Red
    with caplog.at_level(logging.WARNING, logger="cellmonitor_plugins.readers.gen5"):
        a = gen5_reader().read(p)
    assert list(a.channels) == ["Bright Field"] and a.metadata["channel_mismatch"] == "name Bright Field, xml Texas Red"
    assert any("channel 'Bright Field' in the name but 'Texas Red' in the Gen5 XML" in r.getMessage() for r in caplog.records)
    caplog.clear()
    gen5_reader().read(write_gen5_file(tmp_path / "A1_03_1_1_bright  field_002.tif", synthetic_cells((16, 16))))
    assert not caplog.records  # the same name up to case and spaces is no mismatch


# -- decoding: truncated, not-TIFF, bit depths, multi-page, RGB -------------------------------


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.97])
def test_truncated_tiff_is_not_ready_for_every_reader(plate, tmp_path, keep):
    src = plate.files[0]
    for reader, name in ((gen5_reader(), GEN5_NAME), (tiff_reader(pixel_size_um=0.3), "x_t1.tif")):
        p = truncated_copy(src, tmp_path / name, keep)
        with pytest.raises(NotReady) as e:
            reader.read(p)
        one_line_naming(e.value, p)


def test_truncated_z_stack_is_not_ready_not_fewer_planes(tmp_path):
    ex = write_nanolive_export(tmp_path, timepoints=1, n_z=6)
    p = truncated_copy(ex.ri_files[0], tmp_path / "HeLa_A1_pos1_RI_t0009.tif", 0.6)
    with pytest.raises(NotReady) as e:
        nano_reader().read(p)
    assert "truncated" in one_line_naming(e.value, p)


def test_empty_and_non_tiff_files(tmp_path):
    empty = tmp_path / GEN5_NAME
    empty.touch()
    with pytest.raises(NotReady):
        gen5_reader().read(empty)
    junk = tmp_path / "A1_03_1_1_Bright Field_002.tif"
    junk.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(BadInput) as e:
        gen5_reader().read(junk)
    assert not isinstance(e.value, NotReady) and "not a TIFF" in one_line_naming(e.value, junk)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int16, np.uint32])
def test_grey_bit_depths_keep_dtype_and_values(tmp_path, dtype):
    img = synthetic_cells((24, 40), dtype=np.uint16).astype(dtype)
    p = write_tiff(tmp_path / "e_A1_f1_t1_bf.tif", img)
    a = tiff_reader(pixel_size_um=0.3).read(p)
    assert a.channels["bf"].dtype == img.dtype and np.array_equal(a.channels["bf"], img)


def test_rgb_and_rgba_tiff(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    a = tiff_reader(pixel_size_um=0.3).read(write_tiff(tmp_path / "rgb.tif", rgb, photometric="rgb"))
    assert np.array_equal(a.channels["image"], rgb)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], axis=-1)
    a = tiff_reader(pixel_size_um=0.3).read(write_tiff(tmp_path / "rgba.tif", rgba, photometric="rgb"))
    assert a.channels["image"].shape == (20, 30, 3) and np.array_equal(a.channels["image"], rgb)
    planar = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
    a = tiff_reader(pixel_size_um=0.3).read(write_tiff(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate"))
    assert np.array_equal(a.channels["image"], rgb)


def test_multi_page_tiff_gives_named_channels(tmp_path):
    pages = np.stack([synthetic_cells((16, 16), seed=i) for i in range(3)])
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, pages, photometric="minisblack")  # else 3 planes read as planar RGB
    a = tiff_reader(pixel_size_um=0.3, page_channels=["bf", "red"]).read(p)
    assert list(a.channels) == ["bf", "red", "page2"]
    assert np.array_equal(a.channels["page2"], pages[2]) and a.metadata["pages"] == "3"


def test_unsupported_shape_is_one_line(tmp_path):
    p = tmp_path / "grey_alpha.tif"  # two samples per pixel: neither grey nor RGB
    tifffile.imwrite(p, np.zeros((8, 8, 2), np.uint8), photometric="minisblack", extrasamples=["unspecified"], metadata=None)
    with pytest.raises(BadInput) as e:
        tiff_reader(pixel_size_um=0.3).read(p)
    assert "unsupported shape" in one_line_naming(e.value, p)


# -- pixel sizes from metadata ----------------------------------------------------------------


def _ome(p: Path, value: str, unit: str) -> Path:
    ome = (
        '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
        f'<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" SizeX="16" SizeY="16" '
        f'SizeC="1" SizeZ="1" SizeT="1" PhysicalSizeX="{value}" PhysicalSizeXUnit="{unit}">'
        '<TiffData/></Pixels></Image></OME>'
    )
    return write_tiff(p, synthetic_cells((16, 16)), ome)


@pytest.mark.parametrize(
    "value, unit, want",
    [("0.322", "µm", 0.322), ("0.322", "μm", 0.322), ("322", "nm", 0.322), ("0.000645", "mm", 0.645), ("3220", "Å", 0.322)],
)
def test_ome_physical_size_with_units(tmp_path, value, unit, want):
    a = tiff_reader().read(_ome(tmp_path / "x.ome.tif", value, unit))
    assert a.pixel_size_source == "metadata:ome" and a.pixel_size_um == pytest.approx(want)


def test_ome_pixel_size_out_of_range(tmp_path):
    p = _ome(tmp_path / "x.ome.tif", "10", "µm")
    with pytest.raises(BadInput) as e:
        tiff_reader().read(p)
    assert "10 um/px from metadata:ome" in one_line_naming(e.value, p)


@pytest.mark.parametrize("unit", ["um", "micron", "\\u00B5m"])  # ImageJ escapes the micro sign
def test_imagej_calibration(tmp_path, unit):
    p = tmp_path / "ij.tif"
    tifffile.imwrite(p, synthetic_cells((16, 16)), imagej=True, resolution=(1 / 0.25, 1 / 0.25), metadata={"unit": unit})
    a = tiff_reader().read(p)
    assert a.pixel_size_source == "metadata:imagej" and a.pixel_size_um == pytest.approx(0.25)


def test_imagej_hyperstack_gives_pages(tmp_path):
    p = tmp_path / "ij.tif"
    stack = np.stack([synthetic_cells((16, 16), seed=i) for i in range(4)])
    tifffile.imwrite(p, stack, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "um", "axes": "ZYX"})
    a = tiff_reader().read(p)
    assert len(a.channels) == 4 and a.pixel_size_um == pytest.approx(0.5)


def test_resolution_tags_centimetre_and_screen_inch(tmp_path):
    p = tmp_path / "cm.tif"
    tifffile.imwrite(p, synthetic_cells((16, 16)), resolution=(1e4 / 0.4, 1e4 / 0.4), resolutionunit="CENTIMETER", metadata=None)
    a = tiff_reader().read(p)
    assert a.pixel_size_source == "metadata:resolution" and a.pixel_size_um == pytest.approx(0.4)
    q = tmp_path / "dpi.tif"
    tifffile.imwrite(q, synthetic_cells((16, 16)), resolution=(72, 72), resolutionunit="INCH", metadata=None)
    with pytest.raises(BadInput):
        tiff_reader().read(q)  # 72 dpi is a screen default, not a pixel size
    assert tiff_reader(pixel_size_um=0.3).read(q).pixel_size_source == "config"


def _png_with_phys(path: Path, img: np.ndarray, px_per_m: int) -> Path:
    import cv2

    assert cv2.imwrite(str(path), img)
    data = path.read_bytes()
    body = b"pHYs" + struct.pack(">IIB", px_per_m, px_per_m, 1)
    chunk = struct.pack(">I", 9) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    path.write_bytes(data[:33] + chunk + data[33:])  # after the 8-byte signature + IHDR
    return path


def test_png_and_jpeg_use_configured_size_or_phys(tmp_path):
    import cv2

    grey16 = synthetic_cells((24, 32))
    p = tmp_path / "e_A1_f2_t7_bf.png"
    cv2.imwrite(str(p), grey16)
    a = tiff_reader(pixel_size_um=0.3).read(p)
    assert (a.pixel_size_source, a.key.field, a.key.timepoint) == ("config", "2", 7)
    assert a.channels["bf"].dtype == np.uint16 and np.array_equal(a.channels["bf"], grey16)
    q = _png_with_phys(tmp_path / "phys.png", (grey16 >> 8).astype(np.uint8), 2_000_000)  # 0.5 um/px
    b = tiff_reader().read(q)
    assert b.pixel_size_source == "metadata:png" and b.pixel_size_um == pytest.approx(0.5)
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB order
    j = tmp_path / "colour.jpg"
    cv2.imwrite(str(j), rgb[..., ::-1])
    c = tiff_reader(pixel_size_um=0.3).read(j)
    assert c.channels["image"].shape == (24, 32, 3) and c.channels["image"][..., 0].mean() > 150
    with pytest.raises(BadInput) as e:
        tiff_reader().read(j)
    one_line_naming(e.value, j)


def test_configured_pixel_size_out_of_range(tmp_path):
    p = write_tiff(tmp_path / "x.tif", synthetic_cells((16, 16)))
    with pytest.raises(BadInput) as e:
        tiff_reader(pixel_size_um=0.01).read(p)
    assert "from config" in one_line_naming(e.value, p)


# -- Nanolive ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    return write_nanolive_export(tmp_path_factory.mktemp("nanolive"), timepoints=2, n_z=5)


@pytest.mark.parametrize(
    "projection, reduce",
    [
        ("max", lambda s: s.max(0)),
        ("min", lambda s: s.min(0)),
        ("mean", lambda s: s.mean(0)),
        ("median", lambda s: np.median(s, 0)),
        ("sum", lambda s: s.sum(0)),
        ("std", lambda s: s.std(0)),
        ("middle", lambda s: s[2]),
    ],
)
def test_nanolive_ri_stack_projection_in_ri_units(nano, projection, reduce):
    p = nano.ri_files[1]
    a = nano_reader(projection=projection).read(p)
    want = reduce(nano.ri_stacks[p].astype(np.float64) / 10_000)
    assert list(a.channels) == ["RI"] and a.channels["RI"].dtype == np.float32
    np.testing.assert_allclose(a.channels["RI"], want, rtol=1e-5, atol=1e-5)
    assert a.metadata["ri_scaled"] == "x10000" and a.metadata["ri_projection"] == projection


def test_nanolive_identity_pixel_size_and_rescale(nano):
    a = nano_reader().read(nano.ri_files[1])
    assert (a.key.experiment, a.key.well, a.key.field, a.key.timepoint) == ("HeLa_drugA", "A1", "1", 2)
    assert (a.pixel_size_um, a.pixel_size_source, a.instrument) == (0.19, "config", "nanolive")
    lo, hi = (float(x) for x in a.metadata["ri_range"].split(".."))
    assert 1.33 < lo < hi < 1.40
    asm = FrameAssembler(["RI", "Apo-15"])
    r = nano_reader(channel_names={"FL1": "Apo-15"})
    assert asm.add(r.read(nano.ri_files[0])) is None
    frame = asm.add(r.read(nano.fluo_files[0]))
    assert frame is not None and (frame.primary, frame.control) == ("RI", "Apo-15")
    small = rescale(frame, 0.322)  # Nanolive 60x -> Lionheart 20x grid: x0.59
    assert small.shape_px == (round(160 * 0.19 / 0.322), round(160 * 0.19 / 0.322)) == (94, 94)
    assert small.channels["Apo-15"].shape == (94, 94)


def test_nanolive_z_plane_and_scaling_modes(nano, tmp_path):
    p = nano.ri_files[0]
    stack = nano.ri_stacks[p]
    a = nano_reader(z_plane=4).read(p)
    np.testing.assert_allclose(a.channels["RI"], stack[4] / 10_000, rtol=1e-6)
    raw = nano_reader(ri_scale="none", projection="max").read(p)
    assert raw.channels["RI"].dtype == np.uint16 and np.array_equal(raw.channels["RI"], stack.max(0))
    with pytest.raises(BadInput) as e:
        nano_reader(z_plane=9).read(p)
    assert "z_plane 9" in one_line_naming(e.value, p)
    # 'auto' leaves a uint16 image that is not RI x 10000 alone; 'x10000' always scales it
    q = write_tiff(tmp_path / "e_A1_pos1_RI_t0001.tif", synthetic_cells((16, 16)))
    assert nano_reader().read(q).metadata["ri_scaled"] == "none"
    assert nano_reader(ri_scale="x10000").read(q).channels["RI"].max() <= 6.6


def test_nanolive_2d_ri_fluorescence_and_names(nano, tmp_path):
    f = nano_reader().read(nano.fluo_files[0])
    assert list(f.channels) == ["FL1"] and f.channels["FL1"].dtype == np.uint16 and f.metadata["FL1.z_planes"] == "1"
    p = write_tiff(tmp_path / "Exp 3_B4_pos2_RI-MIP_t0012.tif", ri_stack(np.ones((8, 8), np.float32), 1)[0])
    a = nano_reader().read(p)
    assert list(a.channels) == ["RI"] and a.channels["RI"][0, 0] == pytest.approx(1.387)
    assert (a.key.experiment, a.key.well, a.key.field, a.key.timepoint) == ("Exp 3", "B4", "2", 12)
    assert "does not match" in (nano_reader().accepts(Path("random_t0001.tif")) or "")
    custom = nano_reader(pattern=r"^(?P<channel>RI|FL\d)-(?P<timepoint>\d+)\.tif$", experiment="run7")
    q = write_tiff(tmp_path / "FL2-5.tif", synthetic_cells((8, 8)))
    b = custom.read(q)
    assert (b.key.experiment, b.key.timepoint, list(b.channels)) == ("run7", 5, ["FL2"])


def test_nanolive_channel_axis_and_time_axis(tmp_path):
    zcyx = np.stack([np.stack([ri_stack(np.ones((8, 8), np.float32), 1)[0], np.full((8, 8), 7, np.uint16)])] * 3)
    p = tmp_path / "e_A1_pos1_RI_t0001.tif"
    tifffile.imwrite(p, zcyx, imagej=True, metadata={"axes": "ZCYX"})
    a = nano_reader(page_channels=["RI", "FL1"]).read(p)
    assert list(a.channels) == ["RI", "FL1"] and a.channels["FL1"][0, 0] == 7
    assert a.channels["RI"][0, 0] == pytest.approx(1.387)
    q = tmp_path / "e_A1_pos1_FL1_t0002.tif"
    tifffile.imwrite(q, np.zeros((2, 8, 8), np.uint16), imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(BadInput) as e:
        nano_reader().read(q)
    assert "2 timepoints" in one_line_naming(e.value, q)


def test_nanolive_pixel_size_option_is_checked(nano):
    with pytest.raises(BadInput) as e:
        nano_reader(pixel_size_um=7.0).read(nano.ri_files[0])
    assert "7 um/px from config" in one_line_naming(e.value, nano.ri_files[0])


# -- reader choice --------------------------------------------------------------------------------


def test_auto_choice_and_explanations(plate, nano, tmp_path, auto_readers):
    assert auto_readers.choose(plate.files[0]).name == "gen5"
    assert auto_readers.choose(nano.ri_files[0]).name == "nanolive"
    generic = write_tiff(tmp_path / "20180101ef002xy01t01.tif", synthetic_cells((8, 8)))
    assert auto_readers.choose(generic).name == "tiff"
    why = {r.name: reason for r, reason in auto_readers.explain(generic)}
    assert why["tiff"] is None and "not a Gen5 export" in why["gen5"] and "readers.nanolive.pattern" in why["nanolive"]
    with pytest.raises(BadInput) as e:
        auto_readers.choose(tmp_path / "notes.txt")
    assert "no reader accepts" in str(e.value)


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_inspect_prints_every_field(plate, capsys):
    path = plate.file("B2", 2, "Texas Red", 3)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for want in (
        "reader             gen5", "instrument         gen5", "experiment         241128_111010_Plate 1",
        "plate              Plate 1", "well               B2", "field              2", "timepoint index    3",
        "acquired at        2024-11-28T12:10:10", "channel            Texas Red: 192x256 uint16 (fluorescence)",
        "pixel size         0.3219 um/px (from metadata:gen5)", "excitation_nm      586", "objective          20x",
    ):
        assert want in out, want


def test_cli_inspect_json_for_every_reader(plate, nano, tmp_path, capsys):
    png = tmp_path / "exp_A1_f1_t2_bf.png"
    import cv2

    cv2.imwrite(str(png), synthetic_cells((8, 8)))
    cfg = tmp_path / "c.toml"
    cfg.write_text("[readers.tiff]\npixel_size_um = 0.5\n")
    assert main(["inspect", "--json", "--config", str(cfg), str(plate.files[0]), str(nano.ri_files[0]), str(png)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["reader"] for r in rows] == ["gen5", "nanolive", "tiff"]
    g, n, t = rows
    assert (g["plate"], g["well"], g["field"], g["timepoint"], g["pixel_size_source"]) == ("Plate 1", "A1", "1", 1, "metadata:gen5")
    assert g["acquired_at"] == datetime(2024, 11, 28, 11, 10, 10).isoformat()
    assert g["channels"] == {"Bright Field": {"shape": [192, 256], "dtype": "uint16", "role": "transmitted"}}
    assert (n["instrument"], n["pixel_size_um"], n["pixel_size_source"]) == ("nanolive", 0.19, "config")
    assert n["channels"]["RI"]["dtype"] == "float32"
    assert (t["pixel_size_um"], t["pixel_size_source"], t["timepoint"]) == (0.5, "config", 2)


def test_cli_inspect_bad_inputs_one_line_each_and_exit_status(plate, tmp_path, capsys):
    bomb = write_tiff(tmp_path / GEN5_NAME, synthetic_cells((16, 16)), entity_bomb_xml())
    noxml = write_gen5_file(tmp_path / "A1_03_1_1_Bright Field_002.tif", synthetic_cells((16, 16)), xml=False)
    cut = truncated_copy(plate.files[0], tmp_path / "A1_03_1_1_Bright Field_003.tif", 0.5)
    assert main(["inspect", str(bomb), str(noxml), str(cut), str(plate.files[0])]) == 65
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("cellmonitor: error: ") for line in err)
    assert str(bomb) in err[0] and "DTD or entities" in err[0]
    assert str(noxml) in err[1] and "readers.gen5.pixel_size_um" in err[1]
    assert str(cut) in err[2] and "truncated" in err[2]
    assert "Traceback" not in cap.err and str(plate.files[0]) in cap.out  # the good file is still inspected
    assert main(["inspect", str(cut)]) == 75  # only 'not ready': try again later
    capsys.readouterr()
    cfg = tmp_path / "c.toml"
    cfg.write_text("[readers.gen5]\npixel_size_um = 0.65\n")
    assert main(["inspect", "--config", str(cfg), str(noxml)]) == 0
    assert "0.6500 um/px (from config)" in capsys.readouterr().out


def test_cli_plugins_check(plate, tmp_path, capsys):
    assert main(["plugins", "check", str(plate.files[0])]) == 0
    out = capsys.readouterr().out
    assert "gen5       [10] TAKES this file" in out
    assert "tiff       [ 0] would accept, but gen5 is more specific" in out
    assert "nanolive   [ 5] declined: name does not match" in out
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["plugins", "check", str(tmp_path / "notes.txt")]) == 65
    cap = capsys.readouterr()
    assert "declined: suffix .txt" in cap.out and cap.err.strip().endswith("notes.txt: no reader accepts this file")
    assert main(["plugins", "check", str(tmp_path / "absent.tif")]) == 66  # a missing file: 66 in every command
    assert capsys.readouterr().err.strip().endswith("absent.tif: no such file")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[reader]\nname = "tiff"\n')
    assert main(["plugins", "check", "--config", str(cfg), str(plate.files[0])]) == 0
    out = capsys.readouterr().out
    assert "configured reader" in out and "gen5" not in out.split("\n", 1)[1]


def test_cli_bad_config_is_one_line_exit_78(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[readers.gen5]\nz_plane = -1\n")
    assert main(["inspect", "--config", str(cfg), str(tmp_path / "x.tif")]) == 78
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "readers.gen5.options.z_plane" in line and "(got -1)" in line


# -- real data ------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_t98g_pixels_through_gen5_export(shared_data, tmp_path):
    plate = write_gen5_plate(tmp_path, wells=("C3",), fields=(1,), timepoints=2)
    assert plate.source == "real"
    frame_file = sorted((shared_data / "timelapse" / "t98g_phase" / "frames").glob("*t02.tif"))[0]
    original = tifffile.imread(frame_file)
    a = gen5_reader().read(plate.file("C3", 1, "Bright Field", 2))
    img = a.channels["Bright Field"]
    assert img.dtype == np.uint16 and np.array_equal(img, original[: img.shape[0], : img.shape[1]])
    assert a.acquired_at == plate.when(2)


@pytest.mark.realdata
def test_real_qpi_pixels_through_nanolive_export(shared_data, tmp_path):
    ex = write_nanolive_export(tmp_path, timepoints=1)
    assert ex.source == "real"
    a = nano_reader().read(ex.ri_files[0])
    ri = a.channels["RI"]
    assert 1.33 <= float(ri.min()) and float(ri.max()) <= 1.39 and ri.std() > 1e-3


@pytest.mark.realdata
def test_real_timelapse_tiff_with_configured_pixel_size(shared_data):
    p = sorted((shared_data / "timelapse" / "t98g_phase" / "frames").glob("*.tif"))[0]
    a = tiff_reader(pixel_size_um=0.65).read(p)
    assert a.channels["image"].shape == (1022, 1024) and a.channels["image"].dtype == np.uint16
    assert a.key.timepoint == 1 and a.pixel_size_source == "config"
