"""The draft-report tooling: table and plot of acceptance by epoch across training runs."""

from __future__ import annotations

import json

import pytest

from specvlm_hf.errors import UserFileNotFoundError, UserValueError
from specvlm_hf.pocket import cli as pocket_cli
from specvlm_hf.pocket.draft_report import acceptance_table, load_run


def _row(epoch, t0, t1=None):
    row = {"epoch": epoch, "step": int(epoch * 10),
           "T0": {"mean_accept_len": t0, "acceptance_per_depth": [t0 - 1.0, (t0 - 1.0) / 2]}}
    if t1 is not None:
        row["T1"] = {"mean_accept_len": t1, "acceptance_per_depth": [0.1]}
    return row


def test_table_lists_every_run_point_and_depth():
    table = acceptance_table({"small": [_row(0, 1.0, 1.0), _row(1, 2.5, 1.3)], "big": [_row(0.5, 3.25)]})
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Run | Epoch | Accept len, T=0 | Accept len, T=1 | Depth 1 (T0)")
    assert lines[3] == "| small | 1 | 2.50 | 1.30 | 1.50 | 0.75 | 0.00 | 0.00 |"
    assert lines[4] == "| big | 0.5 | 3.25 | – | 2.25 | 1.12 | 0.00 | 0.00 |"
    with pytest.raises(UserValueError, match="no acceptance"):
        acceptance_table({"empty": [{"epoch": 0}]})


def test_runs_load_from_jsonl_and_provenance_and_the_cli_writes_both_files(tmp_path):
    jsonl = tmp_path / "bench_acceptance.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in (_row(0, 1.0, 1.0), _row(1, 2.0, 1.2))))
    provenance = tmp_path / "draft_provenance.json"
    provenance.write_text(json.dumps({"bench_acceptance": [_row(4, 2.6, 1.24)]}))
    assert load_run(jsonl)[1]["T0"]["mean_accept_len"] == 2.0
    assert load_run(provenance)[0]["epoch"] == 4
    with pytest.raises(UserFileNotFoundError):
        load_run(tmp_path / "none.jsonl")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserValueError, match="no 'bench_acceptance'"):
        load_run(tmp_path / "bad.json")
    out = tmp_path / "report"
    assert pocket_cli.main(["draft-report", "--run", f"new={jsonl}", f"old={provenance}", "--out", str(out)]) == 0
    assert "| old | 4 | 2.60 | 1.24 |" in (out / "acceptance.md").read_text()
    assert (out / "acceptance.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserValueError, match="LABEL=PATH"):
        pocket_cli.main(["draft-report", "--run", str(jsonl), "--out", str(out)])
