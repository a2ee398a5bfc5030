"""``cellmonitor demo``: the real service on a synthetic time-lapse, nothing to download."""
