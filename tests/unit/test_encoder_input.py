"""The Lite encoders' input: grey crops take a faster path to the very same numbers."""

from __future__ import annotations

import numpy as np
import pytest
from cellmonitor_plugins.encoders import efficientnet
from cellmonitor_plugins.encoders.efficientnet import to_input


@pytest.mark.parametrize("size", [224, 96])  # shrunk (antialiased) and grown
def test_grey_crops_give_the_same_input_as_the_three_channel_path(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    grey = np.repeat(rng.integers(0, 256, (5, size, size, 1), dtype=np.uint8), 3, axis=3)
    fast = to_input(grey, 128).numpy()
    monkeypatch.setattr(efficientnet, "_grey", lambda crops: False)  # force the general path
    slow = to_input(grey, 128).numpy()
    assert fast.shape == slow.shape == (5, 3, 128, 128)
    assert fast.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(fast, slow)


def test_colour_crops_keep_their_channels() -> None:
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (3, 200, 200, 3), dtype=np.uint8)
    rgb[0, 5, 5] = (0, 128, 255)  # one pixel differs between channels: not grey
    x = to_input(rgb, 128).numpy()
    assert not np.array_equal(x[:, 0], x[:, 1])
    single = to_input(np.repeat(rgb[..., 2:3], 3, axis=3), 128).numpy()
    np.testing.assert_array_equal(x[:, 2], single[:, 2])  # each channel resized on its own, either way
