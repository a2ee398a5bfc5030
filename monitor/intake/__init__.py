"""Intake: from files in the watch folder to frames, the same for every engine.

The local loop, the Ray driver and ``index build --from-marker`` admit,
read, retry and group files through this package, and learn what happened
to each file from its typed outcomes (:mod:`monitor.intake.events`):

* :mod:`~monitor.intake.files`: which files to read and when (stability,
  rescans, the one retry policy for a file still being written);
* :mod:`~monitor.intake.readers`: which reader takes a file, and
  :func:`~monitor.intake.readers.read_file`, which sorts every read error;
* :mod:`~monitor.intake.assemble`: channels into frames, with typed results;
* :mod:`~monitor.intake.ledger`: what is done, in flight or quarantined.

It imports only the core (records, protocols, errors, config, imaging); the
service, the index and the CLI build on it.
"""
