"""``cellmonitor segment-fit``: the blob mode's acceptance rule learned from boxed frames, used by the segmenter.

Synthetic counting-chamber frames at 0.7 um/px hold in-focus cells (living:
black ring, bright core; dead: grey body), faint dead cells an annotator
boxes but whose dark part is too weak for the hand-set rule, and
out-of-focus ghosts (a faint ring round a bright core) nobody boxes.
"""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from cellmonitor_plugins.segmenters.classical import Options, segment_image

from monitor.cli.main import main

UM = 0.7
SHAPE = (160, 160)
OPTIONS = {"mode": "blobs", "work_pixel_size_um": UM, "background_um": 10.0, "contrast_um": 1.5}


def _disk(shape: tuple[int, int], cy: float, cx: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(yy - cy, xx - cx)


def synthetic_frame(seed: int) -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    """(uint8 image, boxes (x0, y0, x1, y1)) of one field: 2-5 cells (some faint and dead) and 0-2 unboxed ghosts."""
    rng = np.random.default_rng(seed)
    img = 0.5 + rng.normal(0, 0.01, SHAPE)
    boxes: list[tuple[float, float, float, float]] = []
    placed: list[tuple[float, float]] = []
    kinds = ["live", "dead", "faint"][: 3] * 2
    n_cells, n_ghosts = int(rng.integers(2, 6)), int(rng.integers(0, 3))
    for i in range(n_cells + n_ghosts):
        for _ in range(100):
            cy, cx = rng.uniform(20, SHAPE[0] - 20, 2)
            if all(np.hypot(cy - y, cx - x) > 30 for y, x in placed):
                break
        placed.append((cy, cx))
        d = _disk(SHAPE, cy, cx)
        r = rng.uniform(8.5, 11.0)
        kind = "ghost" if i >= n_cells else kinds[int(rng.integers(0, len(kinds)))]
        if kind == "live":
            img[(d <= r) & (d > 0.65 * r)] -= 0.45
            img[d <= 0.45 * r] += 0.3
        elif kind == "dead":
            img[d <= r] -= 0.2
            img[d <= 0.5 * r] -= 0.25
        elif kind == "faint":  # a dead cell out of the focal plane: grey, no deep dark part
            img[d <= r] -= 0.06
            img[d <= 0.5 * r] -= 0.06
        else:  # ghost: not a cell
            img[(d <= r) & (d > 0.65 * r)] -= 0.1
            img[d <= 0.45 * r] += 0.2
        if kind != "ghost":
            boxes.append((cx - r, cy - r, cx + r, cy + r))
    return np.clip(img * 255, 0, 255).astype(np.uint8), boxes


def write_voc(folder: Path, name: str, img: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> None:
    iio.imwrite(folder / f"{name}.png", img)
    objs = "".join(
        f"<object><name>Living Cell</name><bndbox><xmin>{x0:.0f}</xmin><ymin>{y0:.0f}</ymin><xmax>{x1:.0f}</xmax><ymax>{y1:.0f}</ymax></bndbox></object>"
        for x0, y0, x1, y1 in boxes
    )
    (folder / f"{name}.xml").write_text(f"<annotation><filename>{name}.png</filename>{objs}</annotation>")


def write_config(path: Path, **extra: object) -> None:
    opts = {**OPTIONS, **extra}
    lines = ["[service]", f'watch_dir = "{path.parent}"', f'state_dir = "{path.parent / "state"}"',
             "[pipeline]", f"pixel_size_um = {UM}", "[segmenter]", 'name = "classical"', "[segmenter.options]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
    path.write_text("\n".join(lines) + "\n")


def count_error(options: Options, frames: list[tuple[np.ndarray, list]], acceptance: object = None) -> float:
    return float(np.mean([abs(int(segment_image(img, UM, options, acceptance).max()) - len(b)) / max(len(b), 1) for img, b in frames]))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("segfit")
    train = root / "train"
    train.mkdir()
    for i in range(40):
        write_voc(train, f"f{i:03d}", *synthetic_frame(i))
    cfg = root / "lab.toml"
    write_config(cfg)
    rc = main(["segment-fit", str(train), "--config", str(cfg), "--out", str(root / "models" / "acceptance.json"), "--no-progress"])
    return {"root": root, "cfg": cfg, "rc": rc, "model": root / "models" / "acceptance.json"}


def test_segment_fit_learns_what_the_lab_boxes(fitted: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from cellmonitor_plugins.segmenters.acceptance import AcceptanceModel
    from cellmonitor_plugins.segmenters.blobs import FEATURES

    assert fitted["rc"] == 0
    model = AcceptanceModel.load(fitted["model"], FEATURES)
    held_out = [synthetic_frame(1000 + i) for i in range(20)]
    o = Options(**OPTIONS)
    rule, learned = count_error(o, held_out), count_error(o, held_out, model)
    print(rule, learned)
    assert rule > 0.15  # the hand-set rule drops the faint dead cells ...
    assert learned < 0.5 * rule  # ... the learned rule counts them (and still not the ghosts)
    assert model.fitted["cv_count_error"] < model.fitted["rule_count_error"]


def _build(cfg: Path):
    from monitor.config import load_config
    from monitor.protocols import BuildContext
    from monitor.registry import Registry

    c = load_config(cfg)
    return Registry().build("segmenters", c.segmenter, BuildContext(state_dir=cfg.parent, config_path=cfg), c.source_name, "segmenter")


def test_the_configured_model_is_what_the_service_segmenter_uses(fitted: dict, tmp_path: Path) -> None:
    from monitor.records import Frame, FrameKey

    cfg = fitted["root"] / "with_model.toml"
    write_config(cfg, acceptance="models/acceptance.json")  # relative to the config file
    seg = _build(cfg)
    assert seg.acceptance is not None
    held_out = [synthetic_frame(2000 + i) for i in range(10)]
    counted = [len(seg.segment(Frame(FrameKey("e", "w", "1", 0), {"image": img}, "image", None, UM, "config", "png")).cells) for img, _ in held_out]
    truth = [len(b) for _, b in held_out]
    assert np.mean([abs(c - t) / t for c, t in zip(counted, truth, strict=True)]) < 0.1
    assert counted != [int(segment_image(img, UM, Options(**OPTIONS)).max()) for img, _ in held_out]  # not the hand-set rule


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"acceptance": "models/acceptance.json", "contrast_um": 2.0}, "fitted with contrast_um = 1.5, this config has 2.0"),
        ({"acceptance": "models/missing.json"}, "no such file (write one with `cellmonitor segment-fit`)"),
        ({"acceptance": "models/acceptance.json", "mode": "contrast"}, "a blob acceptance model is for mode = \"blobs\""),
        ({"acceptance": "lab.toml"}, "not readable JSON"),
    ],
)
def test_a_model_that_does_not_fit_the_config_is_one_startup_line(fitted: dict, extra: dict, needle: str) -> None:
    from monitor.errors import PluginError

    cfg = fitted["root"] / "bad.toml"
    write_config(cfg, **extra)
    with pytest.raises(PluginError) as err:
        _build(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_damaged_model_file_is_refused(fitted: dict, tmp_path: Path) -> None:
    from cellmonitor_plugins.segmenters.acceptance import AcceptanceModel
    from cellmonitor_plugins.segmenters.blobs import FEATURES

    from monitor.errors import ConfigError

    d = json.loads(fitted["model"].read_text())
    for name, change in [("format", {"format": "other"}), ("features", {"features": ["a"]}), ("weights", {"weights": [1.0, 2.0]}),
                         ("threshold", {"threshold": 1.5}), ("options", {"options": {"nonsense": 1}}), ("features_type", {"features": 5}),
                         ("option_text", {"options": {**d["options"], "fg_snr": "x"}}), ("option_null", {"options": {**d["options"], "fg_snr": None}}),
                         ("snr_nan", {"candidate_snr": float("nan")}), ("snr_negative", {"candidate_snr": -1.0}), ("options_missing", {"options": {}})]:
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({**d, **change}))
        with pytest.raises(ConfigError, match=str(p)):
            AcceptanceModel.load(p, FEATURES)


def test_segment_fit_refuses_what_it_cannot_fit(fitted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    contrast = tmp_path / "contrast.toml"
    write_config(contrast, mode="contrast")
    train = fitted["root"] / "train"
    assert main(["segment-fit", str(train), "--config", str(contrast), "--out", str(tmp_path / "m.json")]) == 78
    assert 'segment-fit is for mode = "blobs"' in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"")
    assert main(["segment-fit", str(empty), "--config", str(fitted["cfg"]), "--out", str(tmp_path / "m.json")]) == 65
    assert "no annotated frame" in capsys.readouterr().err
    one = tmp_path / "one"
    one.mkdir()
    write_voc(one, "a", *synthetic_frame(5))
    assert main(["segment-fit", str(one), "--config", str(fitted["cfg"]), "--out", str(tmp_path / "m.json")]) == 65
    assert "at least 10 of each are needed" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_on_real_counting_chamber_frames_the_learned_rule_counts_better(shared_data: Path, tmp_path: Path) -> None:
    """560 boxed livedead frames: cross-validated over frames, the learned rule counts better than the hand-set rule.

    Paired on the same frames (what segment-fit prints and records); a
    held-out set of this size would be too noisy to tell 0.01 apart.
    """
    from cellmonitor_plugins.segmenters.acceptance import AcceptanceModel
    from cellmonitor_plugins.segmenters.blobs import FEATURES

    frames = sorted((shared_data / "livedead").glob("*.png"))
    order = np.random.default_rng(8).permutation(len(frames))
    folder = tmp_path / "boxed"
    folder.mkdir()
    for f in (frames[i] for i in order[:560]):
        (folder / f.name).symlink_to(f)
        (folder / f.with_suffix(".xml").name).symlink_to(f.with_suffix(".xml"))
    repo_cfg = Path(__file__).resolve().parents[2] / "config" / "livedead.toml"
    model = tmp_path / "acceptance.json"
    assert main(["segment-fit", str(folder), "--config", str(repo_cfg), "--out", str(model), "--no-progress"]) == 0
    fitted = AcceptanceModel.load(model, FEATURES).fitted
    assert fitted["boxes_with_candidate"] >= 0.92 * fitted["boxes"]  # nearly every boxed cell has a candidate (the hand-set rule keeps ~85%)
    assert fitted["cv_count_error"] < fitted["rule_count_error"] - 0.01, fitted


def test_class_balance_keeps_the_rare_state() -> None:
    """Few, faint 'dead' positives among many clear 'live' ones: weighing each class alike accepts more of the rare one."""
    from cellmonitor_plugins.segmenters.acceptance import (
        FrameCandidates,
        class_weights,
        fit_acceptance,
    )
    from cellmonitor_plugins.segmenters.blobs import FEATURES

    rng = np.random.default_rng(3)
    nf = len(FEATURES)
    frames = []
    for i in range(60):
        kinds = ["live"] * 6 + ["dead"] * (i % 2) + ["none"] * 6
        x = rng.normal(0, 1, (len(kinds), nf))
        x[:, 0] += [2.5 if k == "live" else 1.0 if k == "dead" else 0.0 for k in kinds]
        matched = np.array([k != "none" for k in kinds])
        frames.append(FrameCandidates(f"f{i}", x, matched, int(matched.sum()), 0, tuple("" if k == "none" else k for k in kinds)))
    w = class_weights(frames)
    pos = np.concatenate([np.array(f.box_class) for f in frames])
    assert w[pos == ""].tolist() == [1.0] * int((pos == "").sum())
    assert w[pos == "dead"].sum() == pytest.approx(w[pos == "live"].sum())  # each class weighs alike ...
    assert w[pos != ""].sum() == pytest.approx(int((pos != "").sum()))  # ... and the positives keep their total
    opts = {"contrast_um": 1.5}
    dead_x = np.vstack([f.features[np.array(f.box_class) == "dead"] for f in frames])
    balanced, _ = fit_acceptance(frames, candidate_snr=20.0, options=opts, thresholds=(0.5,))
    plain, _ = fit_acceptance(frames, candidate_snr=20.0, options=opts, thresholds=(0.5,), balance=False)
    assert balanced.accept(dead_x).mean() > plain.accept(dead_x).mean() + 0.1


def test_check_config_names_a_missing_acceptance_model(fitted: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config finds it without building anything (exit 78, one line naming the file), as run would."""
    cfg = fitted["root"] / "check.toml"
    write_config(cfg, acceptance="models/none.json")
    assert main(["check-config", str(cfg)]) == 78
    err = capsys.readouterr().err
    assert f"acceptance model {fitted['root'] / 'models' / 'none.json'}: no such file" in err
    write_config(cfg, acceptance="models/acceptance.json")
    main(["check-config", str(cfg)])
    assert "acceptance" not in capsys.readouterr().err


def test_a_fit_needs_two_frames_with_candidates() -> None:
    """One frame holding every candidate: no fold could train; one clear line, not a numpy error."""
    from cellmonitor_plugins.segmenters.acceptance import FrameCandidates, fit_acceptance
    from cellmonitor_plugins.segmenters.blobs import FEATURES

    x = np.random.default_rng(0).normal(0, 1, (40, len(FEATURES)))
    one = FrameCandidates("a", x, np.arange(40) < 20, 20, 0, ())
    empty = FrameCandidates("b", np.zeros((0, len(FEATURES))), np.zeros(0, bool), 2, 0, ())
    with pytest.raises(ValueError, match="at least 2 frames with candidates"):
        fit_acceptance([one, empty], candidate_snr=20.0, options={})
    model, rep = fit_acceptance([one, FrameCandidates("c", x, np.arange(40) < 20, 20, 0, ()), empty], candidate_snr=20.0, options={})
    assert rep.frames == 3 and 0 < model.threshold < 1
