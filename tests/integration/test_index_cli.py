"""index build / evaluate / search and classify, end to end on tiny synthetic images."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import cv2
import numpy as np
import pytest
from fixtures.tinyenc import tiny_encoder_source

from monitor.cli.main import main

TINY = tiny_encoder_source()

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "tinyenc_cli.py").write_text(TINY)
    yield d
    sys.modules.pop("tinyenc_cli", None)


def _folders(root: Path, n: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls, rgb in COLOURS.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            img = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (40, 44, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / cls / f"{cls}_{i}.png"), img[..., ::-1])
    return root


def _voc(root: Path, n: int = 6, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for f in range(n):
        img = np.full((120, 120), 100, np.uint8)
        objs = []
        for j, (y, x) in enumerate([(30, 30), (30, 90), (90, 30), (90, 90)]):
            live = (f + j) % 2 == 0
            img[y - 8 : y + 8, x - 8 : x + 8] = 230 if live else 20
            objs.append(("Living Cell" if live else "Dead Cell", x - 8, y - 8, x + 8, y + 8))
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / f"frame{f}.png"), img)
        xml = "<annotation>" + "".join(
            f"<object><name>{n_}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>" for n_, a, b, c, d in objs
        ) + "</annotation>"
        (root / f"frame{f}.xml").write_text(xml)
    return root


def _calls() -> int:
    return sys.modules["tinyenc_cli"].CALLS["crops"]


def test_build_evaluate_classify(tmp_path: Path, plugin: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    data = _folders(tmp_path / "data")
    (data / "red" / "broken.png").write_bytes(b"not a png")
    common = ["--encoders", "tinyenc_cli:TINY", "--plugin-path", str(plugin), "--cache", str(tmp_path / "cache"), "--no-progress", "--crop-px", "32", "--condition-dim", "0"]
    idx = tmp_path / "index"
    assert main(["index", "build", str(data), "--out", str(idx), "--k-min", "3", "--k-max", "12", "--threshold", "0.3", *common]) == 0
    out, err = capsys.readouterr()
    assert "24 references x 6 dims" in out
    assert "skipped 1 unreadable file" in err
    assert [r.getMessage() for r in caplog.records if "broken.png" in r.getMessage()] == [f"skipped {data / 'red' / 'broken.png'}: image decode failed (truncated or not an image)"]
    n_first = _calls()
    assert n_first == 24
    meta = json.loads((idx / "meta.json").read_text())
    assert meta["encoders"][0]["id"] == "tiny@v1:meanstd" and meta["encoders"][0]["dim"] == 6
    assert meta["preprocessing"]["crop_px"] == 32 and meta["class_counts"] == {"blue": 8, "green": 8, "red": 8}
    assert meta["ewc"] == {"k_min": 3, "k_max": 12, "entropy_threshold": 0.3, "reweight": True}

    # rebuild: every cell comes from the cache
    assert main(["index", "build", str(data), "--out", str(tmp_path / "index2"), *common]) == 0
    assert _calls() == n_first
    assert "24 hit(s) / 1 miss(es)" in capsys.readouterr().out  # the broken file is re-tried, never cached

    test = _folders(tmp_path / "test", n=4, seed=7)
    ecommon = ["--plugin-path", str(plugin), "--cache", str(tmp_path / "cache"), "--no-progress"]
    assert main(["index", "evaluate", str(idx), str(test), "--json", "--baseline-k", "5", *ecommon]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ewc"]["macro_accuracy"] == 1.0 and rep["baseline"]["macro_accuracy"] == 1.0
    assert rep["baseline"]["method"] == "plain 5-NN"
    assert 3 <= rep["ewc"]["mean_k"] <= 12
    assert np.array(rep["ewc"]["confusion"]["counts"]).trace() == 12
    assert Path(rep["confusion_png"]).read_bytes()[:4] == b"\x89PNG"
    assert main(["index", "evaluate", str(idx), str(test), *ecommon]) == 0
    text = capsys.readouterr().out
    assert "macro accuracy" in text and "plain 20-NN" in text and "mean k" in text and "true \\ predicted" in text

    html = tmp_path / "page.html"
    q = [str(test / "green" / "green_0.png"), str(test / "blue" / "blue_1.png")]
    assert main(["classify", str(idx), *q, "--json", "--html", str(html), "--neighbours", "3", *ecommon]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in lines] == ["green", "blue"]
    assert lines[0]["k_used"] == 3 and lines[0]["certainty"] == pytest.approx(1.0)
    assert len(lines[0]["neighbours"]) == 3 and lines[0]["neighbours"][0]["name"].startswith("green/")
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 2 + 6 and "green" in page


def test_voc_boxes_and_search(tmp_path: Path, plugin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _voc(tmp_path / "voc")
    common = ["--encoders", "tinyenc_cli:TINY", "--plugin-path", str(plugin), "--cache", str(tmp_path / "cache"), "--no-progress", "--crop-px", "24"]
    idx = tmp_path / "index"
    assert main(["index", "build", str(data), "--out", str(idx), "--k-min", "2", "--k-max", "8", *common]) == 0
    meta = json.loads((idx / "meta.json").read_text())
    assert meta["class_counts"] == {"Dead Cell": 12, "Living Cell": 12}
    assert json.loads((idx / "ids.json").read_text())[1] == "frame0.png#1"
    capsys.readouterr()
    out_toml = tmp_path / "win.toml"
    assert main(["index", "search", str(data), "--val-fraction", "0.25", "--thresholds", "0.2,0.6", "--k-ranges", "2:8", "--condition-dims", "0,4", "--top", "40", "--out", str(out_toml), *common]) == 0
    text = capsys.readouterr().out
    assert "plain k-NN" in text and "EWC" in text
    # split by frame: 2 of the 6 frames (4 cells each) validate, the others train
    assert "validation: 8 cells, training: 16 cells, 10 configurations" in text
    cfg = tomllib.loads(out_toml.read_text())
    assert cfg["encoders"] == [{"name": "tinyenc_cli:TINY"}] and cfg["classifier"]["k_min"] == 2
    from monitor.config import parse_config

    parse_config(cfg)  # the snippet is a valid service config


def test_corrupt_index_is_one_line(tmp_path: Path, plugin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folders(tmp_path / "data", n=3)
    idx = tmp_path / "index"
    common = ["--plugin-path", str(plugin), "--cache", str(tmp_path / "cache"), "--no-progress"]
    assert main(["index", "build", str(data), "--out", str(idx), "--encoders", "tinyenc_cli:TINY", "--crop-px", "16", *common]) == 0
    (idx / "labels.npy").write_bytes((idx / "labels.npy").read_bytes()[:-8] + b"\0" * 8)
    capsys.readouterr()
    assert main(["index", "evaluate", str(idx), str(data), *common]) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(idx) in err[0] and "checksum" in err[0]


def test_unknown_quantile_is_recorded_or_turned_off(tmp_path: Path, plugin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folders(tmp_path / "data", n=4)
    common = ["--encoders", "tinyenc_cli:TINY", "--crop-px", "16", "--plugin-path", str(plugin), "--cache", str(tmp_path / "cache"), "--no-progress"]
    for q, want in (([], 0.99), (["--unknown-quantile", "0.9"], 0.9), (["--unknown-quantile", "0"], None)):
        idx = tmp_path / f"index{len(q)}{q[-1] if q else ''}"
        assert main(["index", "build", str(data), "--out", str(idx), *q, *common]) == 0
        rec = json.loads((idx / "meta.json").read_text())["unknown"]
        assert (rec["quantile"] if rec else None) == want
    assert main(["index", "build", str(data), "--out", str(tmp_path / "bad"), "--unknown-quantile", "1.5", *common]) == 78
    assert "--unknown-quantile must be in [0, 1)" in capsys.readouterr().err


def test_a_class_named_like_a_count_column_is_refused(tmp_path: Path, plugin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folders(tmp_path / "data", n=3)
    (data / next(iter(sorted(p.name for p in data.iterdir())))).rename(data / "Unknown")
    common = ["--encoders", "tinyenc_cli:TINY", "--crop-px", "16", "--plugin-path", str(plugin), "--cache", str(tmp_path / "cache"), "--no-progress"]
    assert main(["index", "build", str(data), "--out", str(tmp_path / "i"), *common]) == 65
    err = capsys.readouterr().err.strip().splitlines()
    assert "'Unknown' is reserved" in err[-1] and str(data) in err[-1]


def test_evaluate_scores_the_index_classes_and_classes_take_spaces_or_commas(tmp_path, capsys):
    """A test folder with classes the index lacks is scored on the index's classes by default (the rest
    listed); --classes takes "a b" and "a,b" and names a class the data does not have."""
    rng = np.random.default_rng(0)
    for root, classes in ((tmp_path / "train", ("red", "blue")), (tmp_path / "test", ("red", "blue", "green"))):
        for c, colour in zip(classes, ((0, 0, 200), (200, 0, 0), (0, 200, 0)), strict=False):
            (root / c).mkdir(parents=True)
            for i in range(6):
                img = np.clip(np.array(colour, np.float32) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                cv2.imwrite(str(root / c / f"{i}.png"), img)
    assert main(["index", "build", str(tmp_path / "train"), "--out", str(tmp_path / "idx"), "--preset", "raw", "--no-cache",
                 "--no-progress", "--pixel-size", "0.5", "--source-pixel-size", "0.5"]) == 0
    capsys.readouterr()
    assert main(["index", "evaluate", str(tmp_path / "idx"), str(tmp_path / "test"), "--json", "--no-cache", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["classes_left_out"] == ["green"] and "left out: green" in err
    assert set(doc["ewc"]["per_class"]) == {"red", "blue"}
    for spec in ("red blue", "red,blue", "red, blue"):
        assert main(["index", "evaluate", str(tmp_path / "idx"), str(tmp_path / "test"), "--json", "--no-cache", "--no-progress", "--classes", spec]) == 0
        assert set(json.loads(capsys.readouterr().out)["ewc"]["per_class"]) == {"red", "blue"}
    assert main(["index", "evaluate", str(tmp_path / "idx"), str(tmp_path / "test"), "--classes", "red purple", "--no-cache"]) == 64
    assert "--classes: 'purple' not a class of the data (classes: blue, green, red)" in capsys.readouterr().err


def test_index_split_by_group_writes_links_and_records_the_split(tmp_path, capsys):
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    for c in ("live", "dead"):
        (data / c).mkdir(parents=True)
        for exp in range(6):
            for i in range(3):
                cv2.imwrite(str(data / c / f"exp{exp}_{i}.png"), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    out = tmp_path / "split"
    assert main(["index", "split", str(data), "--test", "0.34", "--by-group", r"^[a-z]+/(exp\d+)_", "--out", str(out)]) == 0
    rec = json.loads((out / "split.json").read_text())
    assert set(rec["groups"]["train"]).isdisjoint(rec["groups"]["test"]) and len(rec["groups"]["test"]) == 2
    test_files = sorted(p.relative_to(out / "test").as_posix() for p in (out / "test").rglob("*.png"))
    assert test_files and all(p.is_symlink() and p.resolve().is_relative_to(data) for p in (out / "test").rglob("*.png"))
    assert {f.split("/")[1].split("_")[0] for f in test_files} == set(rec["groups"]["test"])  # whole experiments held out
    assert len(test_files) + len(list((out / "train").rglob("*.png"))) == 36
    # the same seed gives the same split; a non-empty folder is never written over
    assert main(["index", "split", str(data), "--test", "0.34", "--by-group", r"^[a-z]+/(exp\d+)_", "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "split.json").read_text())["files"] == rec["files"]
    capsys.readouterr()
    assert main(["index", "split", str(data), "--out", str(out)]) == 64 and "not empty" in capsys.readouterr().err
