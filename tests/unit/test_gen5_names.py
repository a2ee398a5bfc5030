"""Gen5 export naming, plate folders, dates and the BTIImageMetaData document."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from cellmonitor_plugins.readers.gen5 import (
    Gen5Reader,
    Options,
    parse_bti_xml,
    parse_channel_color,
    parse_gen5_datetime,
    parse_gen5_name,
    plate_folder,
)
from fixtures.vendor import DAPI_STITCHED, TEXAS_RED, bti_xml, entity_bomb_xml

from monitor.readkit import well_name

# name -> (well, read step, channel index, field id, z, roi, channel, timepoint, variant)
NAMES = {
    "A1_03_1_1_Bright Field_001.tif": ("A1", 3, 1, "1", None, None, "Bright Field", 1, "standard"),
    "A1_03_2_1_Texas Red_012.tif": ("A1", 3, 2, "1", None, None, "Texas Red", 12, "standard"),
    "B12_02_1_4_Bright Field_T037.tif": ("B12", 2, 1, "4", None, None, "Bright Field", 37, "standard"),
    "C01_06_1_1Z0_Bright Field_001.tif": ("C1", 6, 1, "1", 0, None, "Bright Field", 1, "z"),
    "C01_06_1_2Z14_GFP_003.tiff": ("C1", 6, 1, "2", 14, None, "GFP", 3, "z"),
    "B2_02_SP10Z10_C1_Bright Field_T001.tif": ("B2", 2, 1, "10", 10, None, "Bright Field", 1, "explicit"),
    "B2_02_SP3_C2_Texas Red_T004.tif": ("B2", 2, 2, "3", None, None, "Texas Red", 4, "explicit"),
    "A1ROI1_03_1_1_Bright Field_001.tif": ("A1", 3, 1, "ROI1-1", None, 1, "Bright Field", 1, "roi"),
    "B1ROI14_02_1_1Z2_Bright Field_005.tif": ("B1", 2, 1, "ROI14-1", 2, 14, "Bright Field", 5, "roi"),
    "A1_-1_1_1_Bright Field_001.tif": ("A1", -1, 1, "1", None, None, "Bright Field", 1, "standard"),
    "A1_-1_1_1_Phase Contrast_-1.tif": ("A1", -1, 1, "1", None, None, "Phase Contrast", 0, "standard"),
    "H12_03_3_1_Tsf[Phase Contrast]_002.tif": ("H12", 3, 3, "1", None, None, "Tsf[Phase Contrast]", 2, "standard"),
    "A1_03_2_1_Stitched[DAPI 377,447]_001.tif": ("A1", 3, 2, "1", None, None, "Stitched[DAPI 377,447]", 1, "standard"),
    "A10_02_1_1_Bright_Field_001.tif": ("A10", 2, 1, "1", None, None, "Bright_Field", 1, "standard"),
    "A1_03_2_1_GFP_2_007.tif": ("A1", 3, 2, "1", None, None, "GFP_2", 7, "standard"),
    "AF48_01_1_1_Bright Field_001.ome.tif": ("AF48", 1, 1, "1", None, None, "Bright Field", 1, "standard"),
    "a1_03_1_1_Bright Field_001.TIF": ("A1", 3, 1, "1", None, None, "Bright Field", 1, "standard"),
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_every_naming_variant(name):
    p = parse_gen5_name(name)
    assert p is not None, name
    got = (p.well, p.read_step, p.channel_index, p.field_id, p.z, p.roi, p.channel, p.timepoint, p.variant)
    assert got == NAMES[name]


@pytest.mark.parametrize(
    "name",
    [
        "image_001.tif",  # not a Gen5 name
        "A1_03_1_1_Bright Field_001.png",  # not a TIFF
        "A1_03_1_1__001.tif",  # empty channel
        "A1_03_1_1_Bright Field.tif",  # no timepoint
        "20180101ef002xy01t01.tif",
        "exp_A1_f1_t3_phase.tif",  # the generic reader's naming
        "HeLa_A1_pos1_RI_t0001.tif",  # Nanolive naming
    ],
)
def test_non_gen5_names_are_not_parsed(name):
    assert parse_gen5_name(name) is None


def test_channel_name_is_not_split_on_underscores_or_spaces():
    p = parse_gen5_name("D4_05_3_2_Alexa Fluor_488 [LED]_010.tif")
    assert p is not None
    assert (p.channel, p.timepoint, p.field) == ("Alexa Fluor_488 [LED]", 10, 2)


@pytest.mark.parametrize("raw, want", [("A1", "A1"), ("c01", "C1"), ("AA012", "AA12"), (" H12 ", "H12")])
def test_well_normalisation(raw, want):
    assert well_name(raw) == want


def test_plate_folder_is_parent_or_grandparent(tmp_path):
    f = tmp_path / "241128_111010_Plate 1" / "A1_03_1_1_Bright Field_001.tif"
    assert plate_folder(f) == ("241128_111010_Plate 1", "Plate 1", datetime(2024, 11, 28, 11, 10, 10))
    g = tmp_path / "250101_080000_Drug screen 2" / "A1" / "A1_03_1_1_Bright Field_001.tif"
    assert plate_folder(g)[:2] == ("250101_080000_Drug screen 2", "Drug screen 2")
    assert plate_folder(tmp_path / "exports" / "A1_03_1_1_Bright Field_001.tif") is None


@pytest.mark.parametrize(
    "date, time, want",
    [
        ("11/28/24", "11:10:10", datetime(2024, 11, 28, 11, 10, 10)),
        (None, "11/28/24 23:59:01", datetime(2024, 11, 28, 23, 59, 1)),
        ("01/02/2025", "07:05:00", datetime(2025, 1, 2, 7, 5, 0)),
        ("11/28/24", "1:10:10 PM", datetime(2024, 11, 28, 13, 10, 10)),
        ("28.11.2024", "11:10", None),
        (None, None, None),
    ],
)
def test_gen5_datetime(date, time, want):
    assert parse_gen5_datetime(date, time) == want


@pytest.mark.parametrize(
    "color, want",
    [
        ("DAPI 377,447", ("DAPI", 377.0, 447.0)),
        ("Stitched[DAPI 377,447]", ("DAPI", 377.0, 447.0)),
        ("Texas Red 586,647", ("Texas Red", 586.0, 647.0)),
        ("Bright Field", ("Bright Field", None, None)),
        ("Tsf[Phase Contrast]", ("Phase Contrast", None, None)),
        ("GFP 469, 525", ("GFP", 469.0, 525.0)),
    ],
)
def test_channel_colour_attribute(color, want):
    assert parse_channel_color(color) == want


def test_full_bti_document_is_parsed():
    xml = bti_xml(
        plate="Plate 7", well="B2", when=datetime(2024, 11, 28, 12, 40, 10), channel=TEXAS_RED,
        width_px=1224, height_px=904, pixel_size_um=394.0 / 1224, objective=20, numerical_aperture=0.45,
        exposure_ms=87.0, gain=12.0, temperature_c=37.1,
    )
    (m,) = parse_bti_xml(xml)
    assert (m.plate, m.well, m.acquired_at) == ("Plate 7", "B2", datetime(2024, 11, 28, 12, 40, 10))
    assert (m.objective, m.numerical_aperture) == ("20", 0.45)
    assert (m.channel_name, m.excitation_nm, m.emission_nm, m.transmitted) == ("Texas Red", 586.0, 647.0, False)
    assert (m.exposure_ms, m.gain, m.temperature_c) == (87.0, 12.0, 37.1)
    size, note = m.pixel_size_um()
    assert size == pytest.approx(394.0 / 1224, rel=1e-4) and note == ""
    meta = m.as_metadata()
    assert meta["objective"] == "20x" and meta["excitation_nm"] == "586" and meta["image_px"] == "1224x904"


def test_wrapped_channel_colour_in_document():
    (m,) = parse_bti_xml(bti_xml(channel=DAPI_STITCHED))
    assert (m.channel_name, m.excitation_nm, m.emission_nm) == ("DAPI", 377.0, 447.0)


def test_pixel_size_uses_stored_width_when_the_export_was_resized():
    (m,) = parse_bti_xml(bti_xml(width_px=1224, pixel_size_um=0.322))
    size, note = m.pixel_size_um(stored_width_px=612)  # 2x2 binned export of the same field
    assert size == pytest.approx(0.644, rel=1e-3)
    assert "612" in note and "1224" in note


def test_bti_inside_ome_annotation_is_found():
    bti = bti_xml(well="C3").split("?>", 1)[1]
    ome = (
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><StructuredAnnotations>'
        f'<XMLAnnotation ID="Annotation:0"><Value>{bti}</Value></XMLAnnotation>'
        "</StructuredAnnotations></OME>"
    )
    (m,) = parse_bti_xml(ome)
    assert m.well == "C3" and m.channel_name == "Bright Field"


def test_entity_bomb_is_refused_quickly_with_one_line():
    with pytest.raises(ValueError) as e:
        parse_bti_xml(entity_bomb_xml(levels=12))
    assert "DTD or entities" in str(e.value) and "\n" not in str(e.value)


def test_malformed_xml_is_one_line():
    with pytest.raises(ValueError, match="malformed XML"):
        parse_bti_xml("<BTIImageMetaData><ImageReference>")


def test_accepts_by_name_by_content_and_z_plane(tmp_path):
    r = Gen5Reader(Options(z_plane=0))
    assert r.accepts(Path("C01_06_1_1Z0_Bright Field_001.tif")) is None
    why = r.accepts(Path("C01_06_1_1Z3_Bright Field_001.tif"))
    assert why is not None and "z_plane 0" in why
    assert "not a TIFF" in (r.accepts(Path("A1_03_1_1_Bright Field_001.png")) or "")
    from fixtures.vendor import synthetic_cells, write_tiff

    renamed = write_tiff(tmp_path / "renamed.tif", synthetic_cells((32, 32)), bti_xml(width_px=32, height_px=32))
    assert r.accepts(renamed) is None  # sniffed: tag 270 holds BTIImageMetaData
    plain = write_tiff(tmp_path / "plain.tif", synthetic_cells((32, 32)))
    assert "not a Gen5 export" in (r.accepts(plain) or "")
