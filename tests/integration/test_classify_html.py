"""``classify --html``: the labelled cell marked in every reference crop, and a warning (or per-cell results)
when the query image holds several cells."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from fixtures.tinyenc import tiny_encoder_source

from monitor.cli.main import main

TINY = tiny_encoder_source("tiny@v1:meanstd-html")

CYAN = (0, 230, 255)


def _disc_image(centres: list[tuple[int, int]], value: int, shape: tuple[int, int] = (200, 200)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, 10, np.uint8)
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 22**2] = value
    return np.clip(img + np.random.default_rng(0).normal(0, 2, shape), 0, 255).astype(np.uint8)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, list[str], Path]:
    plug = tmp_path / "plugins"
    plug.mkdir()
    (plug / "tinyenc_html.py").write_text(TINY)
    data = tmp_path / "data"
    for cls, v in (("bright", 240), ("dim", 120)):
        (data / cls).mkdir(parents=True)
        for i in range(5):
            cv2.imwrite(str(data / cls / f"{cls}_{i}.png"), _disc_image([(100, 100 + i)], v))
    idx = tmp_path / "index"
    common = ["--plugin-path", str(plug), "--no-cache", "--no-progress"]
    assert main(["index", "build", str(data), "--out", str(idx), "--encoders", "tinyenc_html:TINY", "--crop-px", "48", "--framing", "center", "--condition-dim", "0", "--k-min", "3", "--k-max", "6", *common]) == 0
    cfg = tmp_path / "seg.toml"
    cfg.write_text('[segmenter]\nname = "classical"\noptions = { mode = "intensity" }\n')
    yield idx, common, cfg
    sys.modules.pop("tinyenc_html", None)


def _imgs(page: str) -> list[np.ndarray]:
    return [cv2.imdecode(np.frombuffer(base64.b64decode(b), np.uint8), cv2.IMREAD_COLOR)[..., ::-1] for b in re.findall(r"base64,([A-Za-z0-9+/=]+)'", page)]


def test_marks_and_several_cells_warning(setup: tuple[Path, list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx, common, cfg = setup
    one = tmp_path / "one.png"
    cv2.imwrite(str(one), _disc_image([(100, 100)], 240))
    three = tmp_path / "three.png"
    cv2.imwrite(str(three), _disc_image([(50, 50), (60, 150), (150, 100)], 240))
    capsys.readouterr()
    html = tmp_path / "page.html"
    assert main(["classify", str(idx), str(one), str(three), "--json", "--html", str(html), "--neighbours", "3", "--config", str(cfg), *common]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(s) for s in out.splitlines()]
    assert [r["cells_found"] for r in rows] == [1, 3]
    assert f"{three}: the segmenter found 3 cells" in err and str(one) + ":" not in err
    # the index holds class-folder (single-cell) images: --per-cell is not suggested for an image like them
    assert "--per-cell" not in err and "references are single-cell images" in err
    page = html.read_text()
    assert page.count("found 3 cells in this image; it was classified as one cell") == 1
    assert "--per-cell" not in page and "references are single-cell images" in page
    imgs = _imgs(page)
    assert len(imgs) == 2 * (1 + 3)
    for img in imgs:  # query and every reference crop: the labelled cell is marked, a scale bar is drawn
        assert np.all(img == CYAN, axis=-1).sum() >= 8
        assert np.all(img[-12:] == 255, axis=-1).sum() >= 3


def test_per_cell_classifies_each_cell(setup: tuple[Path, list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx, common, cfg = setup
    mixed = tmp_path / "mixed.png"
    img = np.maximum(_disc_image([(50, 50), (60, 150)], 240), _disc_image([(150, 100)], 120))
    cv2.imwrite(str(mixed), img)
    capsys.readouterr()
    html = tmp_path / "page.html"
    assert main(["classify", str(idx), str(mixed), "--json", "--per-cell", "--html", str(html), "--config", str(cfg), *common]) == 0
    rows = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [f"{mixed}#cell{i}" for i in (1, 2, 3)]
    assert sorted(r["label"] for r in rows) == ["bright", "bright", "dim"]
    page = html.read_text()
    assert "each is classified below" in page and "cells outlined by their call" in page
