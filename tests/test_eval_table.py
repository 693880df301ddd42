"""scripts/run_eval_table.py builds eval/RESULTS.md from run JSON: recorded rows (the calibrated one included)
join the main table and the plot with their own dates, and a method that could not run here is listed with why."""

from __future__ import annotations

import json
import pathlib

import pytest

from conftest import _load_script

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_table_from_recorded_runs_with_reasons(tmp_path):
    pytest.importorskip("matplotlib")
    table = _load_script("run_eval_table")
    runs = ROOT / "eval" / "runs"
    results, plot = tmp_path / "R.md", tmp_path / "p.png"
    assert table.main([
        "--model", str(tmp_path / "unused"), "--methods", "ptqtp,ptqtp-calib,rtn-int3-offset,gptq-int3-g128",
        "--recorded", f"ptqtp={runs / 'smollm2-ptqtp-2026-11-23-eval.json'}",
        "--recorded", f"ptqtp-calib={runs / 'smollm2-ptqtp-calib128-eval.json'}",
        "--recorded", f"rtn-int3-offset={runs / 'smollm2-rtn-int3-offset-2026-11-23-eval.json'}",
        "--not-run", "gptq-int3-g128=needs a GPU here",
        "--work-dir", str(tmp_path / "work"), "--results", str(results), "--plot", str(plot),
        "--max-windows", "8", "--limit", "100",
    ]) == 0
    md = results.read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| ptqtp (default, calibration-free)", "| ptqtp --calib boolq (128 x 2048)",
        "| RTN int3 g128, fp16 offset, weaker variant (baseline)", "| GPTQ int3 g128 (gptqmodel)"]
    calib = json.loads((runs / "smollm2-ptqtp-calib128-eval.json").read_text())
    assert f"{calib['perplexity']['perplexity']:.2f}" in rows[1] and "1759.8" in rows[1]  # quantize s from its report
    assert "3.25*" in rows[2] and "not run here: needs a GPU here" in rows[3]
    assert calib["date"] in md and "smollm2-ptqtp-calib128-eval.json" in md
    assert plot.is_file() and plot.stat().st_size > 10_000


def test_recorded_row_keeps_its_quantize_time_machine_threads_and_load(tmp_path):
    """A row re-measured elsewhere and copied into runs/ keeps what its table cell and date line need: the
    quantize time from the `-quantize.json` beside it, the machine, threads and load it ran with."""
    pytest.importorskip("matplotlib")
    table = _load_script("run_eval_table")
    rec = json.loads((ROOT / "eval" / "runs" / "smollm2-rtn-int3-offset-2026-11-23-eval.json").read_text())
    rec.update(method="rtn-int4", machine="Test CPU, 2 cores", load_average_at_start="6.5 / 4.0 / 3.0",
               versions={**rec["versions"], "cpu_threads": 1})
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "smollm2-rtn-int4-x-eval.json").write_text(json.dumps(rec))
    (runs / "smollm2-rtn-int4-x-quantize.json").write_text(json.dumps({"wall_seconds": 12.34}))
    results = tmp_path / "R.md"
    assert table.main([
        "--model", str(tmp_path / "unused"), "--methods", "rtn-int4",
        "--recorded", f"rtn-int4={runs / 'smollm2-rtn-int4-x-eval.json'}",
        "--work-dir", str(tmp_path / "work"), "--results", str(results), "--plot", str(tmp_path / "p.png"),
        "--max-windows", "8", "--limit", "100",
    ]) == 0
    md = results.read_text()
    row = next(line for line in md.splitlines() if line.startswith("| RTN int4"))
    assert row.split(" | ")[-2] == "12.3"  # quantize s, from the -quantize.json
    assert "Machines: Test CPU, 2 cores" in md  # every row recorded: the machines are the rows' own
    assert "on Test CPU, 2 cores, 1 thread, load average 6.5 / 4.0 / 3.0 at its start" in md
