"""The long-running service: intake (watch, ledger), assembly, the loop, recording, metrics, systemd."""
