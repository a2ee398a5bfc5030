"""`cellmonitor export --format parquet`: typed columns, one file per experiment, same rows as the CSV."""

from __future__ import annotations

import pytest
from fixtures.faultkit import csv_rows, fault_service, run_idle
from fixtures.service import blobs, drop

from monitor.cli.main import main

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def test_parquet_export_is_typed_and_split_by_experiment(tmp_path, capsys):
    svc = fault_service(tmp_path)
    for w, t, n in (("A1", 1, 2), ("A1", 2, 3), ("B2", 1, 1)):
        drop(svc.settings.watch_dir, f"{w}_t{t}_phase.npy", blobs(n, 0.3))
    run_idle(svc)
    svc.close()
    src = tmp_path / "state" / "counts.csv"
    # a second experiment in the same record (another plate folder)
    text = src.read_text().splitlines()
    src.write_text("\n".join(text + [text[1].replace("test,A1,1,1", "plate 2,C3,1,7", 1)]) + "\n")
    out = tmp_path / "parquet"
    assert main(["export", str(src), "--out", str(out), "--format", "parquet"]) == 0
    assert "wrote 4 rows" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["plate_2.parquet", "test.parquet"]
    t = pq.read_table(out / "test.parquet")
    schema = {f.name: f.type for f in t.schema}
    assert schema["timepoint"] == pa.int64() and schema["n_cells"] == pa.int64() and schema["n_live"] == pa.int64()
    assert schema["control_regions"] == pa.int64()  # empty in the CSV (no control channel): null integers, not floats
    assert schema["frac_live"] == pa.float64() and schema["pixel_size_um"] == pa.float64()
    assert pa.types.is_timestamp(schema["processed_at"]) and schema["processed_at"].tz == "UTC"
    assert all(pa.types.is_string(schema[c]) or pa.types.is_large_string(schema[c]) for c in ("well", "field", "experiment"))
    rows = t.to_pylist()
    assert [(r["well"], r["timepoint"], r["n_cells"]) for r in rows] == [("A1", 1, 2), ("A1", 2, 3), ("B2", 1, 1)]
    want = {(r["well"], int(r["timepoint"])): int(r["n_cells"]) for r in csv_rows(tmp_path) if r["experiment"] == "test"}
    assert {(r["well"], r["timepoint"]): r["n_cells"] for r in rows} == want
    assert pq.read_table(out / "plate_2.parquet").column("timepoint").to_pylist() == [7]


def test_parquet_export_refuses_a_file_as_the_folder(tmp_path, capsys):
    src = tmp_path / "c.csv"
    src.write_text("experiment,well,field,timepoint,n_cells\ne,A1,1,1,2\n")
    (tmp_path / "f").write_text("x")
    assert main(["export", str(src), "--out", str(tmp_path / "f"), "--format", "parquet"]) == 1
    assert "writes one file per experiment into a folder" in capsys.readouterr().err
