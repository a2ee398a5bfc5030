"""Cells through time: tracks, one-way state smoothing, survival, plate maps and dose response.

Part of the core (it imports no layer): the cells sink links each frame as it is
recorded (:mod:`monitor.fate.tracking`), and the report, the export and the
benchmarks read the tables it leaves. Each module is plain numpy/scipy/pandas on
plain tables, tested with hand-made data:

``tracking``      online LAP linking per field (laptrack), divisions and one-frame gaps
``smoothing``     a one-way hidden-Markov model over each track (live -> apoptotic -> dead,
                  necrotic absorbing), onset of apoptosis and time of death
``survival``      Kaplan-Meier curves, median time to death with its interval, log-rank test
``platemap``      the plate-layout CSV (well, compound, concentration, unit, role)
``doseresponse``  four-parameter logistic fits, EC50 with its interval, failures stated
``fates``         a recorded per-cell table to tracks, fates and per-well summaries
``store``         ``fates.sqlite``: smoothed counts and EC50 over time, kept up to date (Grafana)
``table``         the per-cell table on disk, read back as one DataFrame
"""
