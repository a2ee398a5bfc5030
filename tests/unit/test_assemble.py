"""Frame assembly across channels: completeness, timeout release, roles, drops."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from monitor.errors import ConfigError
from monitor.intake.assemble import FrameAssembler, merge, resolve_roles
from monitor.intake.events import FileEvent
from monitor.readkit import guess_role
from monitor.records import Acquisition, FrameKey

KEY = FrameKey("exp", "A1", "1", 3)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def acq(channel: str, key: FrameKey = KEY, shape=(40, 60), px: float = 0.322, value: int = 1, path: str | None = None,
        when: datetime | None = None) -> Acquisition:
    img = np.full(shape, value, np.uint16)
    role = guess_role(channel)  # as the Gen5 reader declares it
    return Acquisition(
        Path(path or f"/in/{key.well}_{key.field}_{key.timepoint}_{channel}.tif"), key, {channel: img}, px,
        "metadata:gen5", "lionheart", when, roles={channel: role} if role else {},
    )


@pytest.mark.parametrize(
    "names, primary, control, want",
    [
        (["Texas Red", "Bright Field"], "auto", "auto", ("Bright Field", "Texas Red")),
        (["RI", "FL1"], "auto", "auto", ("RI", "FL1")),
        (["Phase Contrast", "GFP", "DAPI"], "auto", "auto", ("Phase Contrast", "GFP")),
        (["Bright Field", "Texas Red"], "auto", "none", ("Bright Field", None)),
        (["Bright Field", "Texas Red"], "Texas Red", "auto", ("Texas Red", None)),  # bright field is no control
        (["Bright Field", "Texas Red"], "auto", "Apo-15", ("Bright Field", None)),
        (["chan0"], "auto", "auto", ("chan0", None)),
        (["x", "y"], "auto", "auto", ("x", "y")),
    ],
)
def test_resolve_roles(names, primary, control, want):
    """Roles as a generic reader declares them (from the channel names)."""
    from monitor.readkit import guess_role

    roles = {n: r for n in names if (r := guess_role(n)) is not None}
    assert resolve_roles(names, primary, control, roles) == want


def test_declared_roles_decide_not_names_or_order():
    # a reader that knows its channels: the names say nothing, the order is 'wrong'
    assert resolve_roles(["ch1", "ch2"], "auto", "auto", {"ch1": "fluorescence", "ch2": "transmitted"}) == ("ch2", "ch1")
    # no roles declared at all: first channel is primary, the next one the control
    assert resolve_roles(["Texas Red", "Bright Field"]) == ("Texas Red", "Bright Field")


def test_resolve_roles_errors():
    with pytest.raises(KeyError, match="'RI' not in frame"):
        resolve_roles(["Bright Field"], "RI")
    with pytest.raises(ValueError):
        resolve_roles([])


def test_complete_frame_is_released_at_once_with_roles_from_config():
    a = FrameAssembler(["Bright Field", "Texas Red"], clock=Clock())
    assert a.add(acq("Texas Red", value=7)) is None
    assert a.n_pending == 1 and a.pending_paths() == ["/in/A1_1_3_Texas Red.tif"]
    f = a.add(acq("Bright Field", value=9, when=datetime(2024, 1, 1, 12)))
    assert f is not None and a.n_pending == 0
    assert (f.primary, f.control, f.missing_channels) == ("Bright Field", "Texas Red", ())
    assert f.key == KEY and f.image[0, 0] == 9 and f.channels["Texas Red"][0, 0] == 7
    assert f.sources == (Path("/in/A1_1_3_Texas Red.tif"), Path("/in/A1_1_3_Bright Field.tif"))
    assert f.acquired_at == datetime(2024, 1, 1, 12)
    assert a.stats["complete"] == 1 and a.due(force=True) == []


def test_frames_of_other_keys_do_not_mix():
    a = FrameAssembler(["Bright Field", "Texas Red"], clock=Clock())
    k2 = FrameKey("exp", "A1", "2", 3)
    assert a.add(acq("Bright Field")) is None
    assert a.add(acq("Texas Red", key=k2)) is None
    assert a.n_pending == 2


def test_timeout_releases_incomplete_frame_with_missing_channels(caplog):
    clock = Clock()
    a = FrameAssembler(["Bright Field", "Texas Red"], wait_s=60, clock=clock)
    a.add(acq("Bright Field"))
    clock.t += 59.9
    assert a.due() == []
    clock.t += 0.2
    with caplog.at_level(logging.WARNING, logger="monitor.intake.assemble"):
        (f,) = a.due()
    assert f.missing_channels == ("Texas Red",) and f.control is None and f.primary == "Bright Field"
    assert a.n_pending == 0 and a.stats["incomplete"] == 1
    assert any("without channel(s) Texas Red" in r.getMessage() for r in caplog.records)


def test_force_releases_everything_pending():
    a = FrameAssembler(["Bright Field", "Texas Red"], wait_s=1e9, clock=Clock())
    a.add(acq("Bright Field"))
    a.add(acq("Bright Field", key=FrameKey("exp", "B2", "1", 3)))
    assert len(a.due(force=True)) == 2 and a.n_pending == 0


def test_frame_without_primary_is_dropped_not_released():
    clock = Clock()
    a = FrameAssembler(["Bright Field", "Texas Red"], wait_s=10, clock=clock)
    a.add(acq("Texas Red"))
    clock.t += 11
    (d,) = a.due()  # the typed result: a dropped event, not a frame
    assert isinstance(d, FileEvent) and d.kind == "dropped"
    assert d.key == KEY and d.paths == ("/in/A1_1_3_Texas Red.tif",)
    assert "primary channel 'Bright Field' never arrived" in d.problem
    assert a.due(force=True) == [] and a.stats["dropped"] == 1
    # the primary arriving after the drop cannot resurrect the frame
    late = a.add(acq("Bright Field"))
    assert isinstance(late, FileEvent) and late.kind == "dropped"
    assert "arrived after the frame was dropped" in late.problem


def test_late_channel_after_release_is_dropped():
    clock = Clock()
    a = FrameAssembler(["Bright Field", "Texas Red"], wait_s=5, clock=clock)
    a.add(acq("Bright Field"))
    clock.t += 6
    assert len(a.due()) == 1
    d = a.add(acq("Texas Red"))
    assert isinstance(d, FileEvent) and d.kind == "dropped" and a.n_pending == 0
    assert "after the frame was released" in d.problem
    # a rescan re-reading the same file is not reported twice
    assert a.add(acq("Texas Red")) is None


def test_same_file_twice_replaces_it():
    a = FrameAssembler(["Bright Field", "Texas Red"], clock=Clock())
    a.add(acq("Bright Field", value=1))
    a.add(acq("Bright Field", value=2))
    assert len(a.pending_paths()) == 1
    f = a.add(acq("Texas Red"))
    assert f is not None and f.image[0, 0] == 2 and len(f.sources) == 2


def test_channel_names_match_case_insensitively_and_extras_are_left_out(caplog):
    a = FrameAssembler(["Bright Field", "Texas Red"], clock=Clock())
    with caplog.at_level(logging.WARNING, logger="monitor.intake.assemble"):
        skip = a.add(acq("DAPI"))
    assert skip == FileEvent("skip", ("/in/A1_1_3_DAPI.tif",), "channel 'DAPI' is not in assembly.channels", KEY)
    assert a.n_pending == 0 and a.stats["ignored_files"] == 1
    assert any("'DAPI' is not in assembly.channels" in r.getMessage() for r in caplog.records)
    a.add(acq("bright  field"))
    f = a.add(acq("TEXAS RED"))
    assert f is not None and set(f.channels) == {"Bright Field", "Texas Red"}


def test_multi_channel_acquisition_completes_alone():
    a = FrameAssembler(["RI", "FL1"], clock=Clock())
    two = Acquisition(Path("/in/x.tif"), KEY, {"RI": np.zeros((8, 8), np.float32), "FL1": np.ones((8, 8), np.uint16)},
                      0.19, "config", "nanolive")
    f = a.add(two)
    assert f is not None and (f.primary, f.control) == ("RI", "FL1")


def test_no_channels_configured_every_file_is_a_frame():
    a = FrameAssembler()
    f = a.add(acq("image"))
    assert f is not None and f.primary == "image" and f.control is None and a.n_pending == 0


def test_misconfigured_roles_are_config_errors():
    with pytest.raises(ConfigError, match="assembly.primary: 'Phase'"):
        FrameAssembler(["Bright Field", "Texas Red"], primary="Phase")
    with pytest.raises(ConfigError, match="assembly.control"):
        FrameAssembler(["Bright Field", "Texas Red"], control="Apo-15")
    a = FrameAssembler(["Bright Field", "Texas Red"], primary="bright field", control="texas red")
    assert a.configured_roles == ("Bright Field", "Texas Red")


def test_merge_resamples_onto_the_primary_grid():
    bf = acq("Bright Field", shape=(40, 60), px=0.322)
    binned = Acquisition(Path("/in/tr.tif"), KEY, {"Texas Red": np.full((20, 30), 500, np.uint16)}, 0.644,
                         "metadata:gen5", "lionheart")
    f = merge([binned, bf], "Bright Field", "Texas Red", ["Bright Field", "Texas Red"])
    assert f.channels["Texas Red"].shape == (40, 60) and f.channels["Texas Red"].mean() == pytest.approx(500)
    assert f.pixel_size_um == 0.322 and f.pixel_size_source == "metadata:gen5"


def test_merge_warns_on_same_grid_different_pixel_size(caplog):
    with caplog.at_level(logging.WARNING, logger="monitor.intake.assemble"):
        merge([acq("Bright Field", px=0.322), acq("Texas Red", px=0.5)], "Bright Field", "Texas Red")
    assert any("on the same grid" in r.getMessage() for r in caplog.records)
