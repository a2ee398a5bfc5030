"""Configuration: one line per problem, exit 78, example configs never go stale."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from monitor.cli.main import main
from monitor.config import Config, load_config, parse_config
from monitor.errors import ConfigError
from monitor.registry import Registry

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[pipeline]\npixel_size_um = 0\n", "c.toml: pipeline.pixel_size_um: Input should be greater than or equal to 0.05 (got 0)"),
        ("[pipeline]\ncrop_px = 'big'\n", "c.toml: pipeline.crop_px: Input should be a valid integer, unable to parse string as an integer (got 'big')"),
        ("[service]\nwatch_dri = 'x'\n", "c.toml: service.watch_dri: unknown key (got 'x')"),
        ("[classifier]\nk_min = 50\nk_max = 10\n", "c.toml: classifier: Value error, k_min must not exceed k_max (got k_min=50, k_max=10)"),
        ("[pipeline]\ncertainty_floor = 1.5\n", "c.toml: pipeline.certainty_floor: Input should be less than or equal to 1 (got 1.5)"),
        ("[service]\nmetrics_port = 70000\n", "c.toml: service.metrics_port: Input should be less than or equal to 65535 (got 70000)"),
        ("encoders = []\n", "c.toml: encoders: List should have at least 1 item after validation, not 0 (got [])"),
        ("[pipeline\n", "c.toml: invalid TOML"),
        ("[assembly]\nchannels = ['phase', 'pi']\nprimary = 'ri'\n", "c.toml: assembly: Value error, primary channel 'ri' is not one of channels ['phase', 'pi']"),
        ("[tracking]\nmax_gap = 2\nmemory_timepoints = 6\n",
         "c.toml: tracking: Value error, memory_timepoints = 6 must be more than 2 x (max_gap + 1) = 6"),
    ],
)
def test_one_line_per_problem(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    (line,) = e.value.lines
    assert line.startswith(str(tmp_path / "c.toml"))
    assert line.replace(str(tmp_path) + "/", "").startswith(expected)


def test_two_problems_two_lines(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "[pipeline]\npixel_size_um = 9\ncrop_px = 1\n"))
    assert len(e.value.lines) == 2


def test_plugin_options_validated_against_the_plugin(tmp_path):
    cfg = load_config(write(tmp_path, "[segmenter]\nname = 'classical'\noptions = { min_area_um2 = -3 }\n"))
    problems = Registry().validate_config(cfg)
    assert len(problems) == 1
    assert "segmenter.options.min_area_um2" in problems[0] and "(got -3)" in problems[0]


def test_unknown_plugin_is_one_line(tmp_path):
    cfg = load_config(write(tmp_path, "[segmenter]\nname = 'nope'\n"))
    (line,) = Registry().validate_config(cfg)
    assert "plugin 'nope' (group cellmonitor.segmenters): not found" in line


def test_check_config_exit_78_and_one_line(tmp_path, capsys):
    p = write(tmp_path, "[pipeline]\npixel_size_um = -1\n")
    assert main(["check-config", str(p)]) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pipeline.pixel_size_um" in err[0]


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    cfg = load_config(write(tmp_path, "[service]\nwatch_dir = 'in'\n[classifier]\nindex = 'idx'\n"))
    assert cfg.service.watch_dir == tmp_path / "in"
    assert cfg.classifier.index == tmp_path / "idx"


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_load_and_validate(path):
    cfg = load_config(path)
    assert Registry(cfg.plugins.paths).validate_config(cfg, files=False) == []  # the files they name live on a lab's machine


def test_demo_config_matches_the_shipped_example():
    from monitor.demo.run import DEMO_CONFIG

    shipped = tomllib.loads((REPO / "config" / "demo.toml").read_text())
    assert parse_config(shipped) == parse_config(tomllib.loads(DEMO_CONFIG))


def test_defaults_are_valid():
    assert Config().pipeline.pixel_size_um == 0.322


def test_bad_regex_in_reader_options_is_one_line(tmp_path):
    cfg = load_config(write(tmp_path, "[readers.tiff]\npattern = '(unclosed'\n"))
    (line,) = Registry().validate_config(cfg)
    assert "readers.tiff.options.pattern: Value error, not a valid regular expression" in line


def test_plugins_list_cli_shows_every_kind_with_origin(capsys):
    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out
    for kind in ("readers:", "segmenters:", "encoders:", "sinks:"):
        assert kind in out
    for name in ("gen5", "nanolive", "tiff", "classical", "sam", "efficientnet-lite0", "dinov2", "csv", "prometheus"):
        assert f"  {name} " in out
    assert "from entry point cellmonitor (cellmonitor_plugins." in out and "BROKEN" not in out
