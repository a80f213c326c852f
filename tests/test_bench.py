"""The comparison harness and the asv suite run (tiny sizes here; speed is not asserted)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastopt import bench

ROOT = Path(__file__).resolve().parents[1]


def test_parse_case():
    assert bench.parse_case("10M") == [10_000_000]
    assert bench.parse_case("1.5K") == [1500]
    sizes = bench.parse_case("200x50K")
    assert len(sizes) == 200 and sum(sizes) == 10_000_000
    assert min(sizes) < 30_000 < 70_000 < max(sizes)  # uneven, like a network's layers


def test_harness_end_to_end(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert bench.main(["--cases", "20K,3x5K", "--budget", "0", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["rule"] for r in rows} == set(bench.DEFAULT_RULES)
    assert {r["case"] for r in rows} == {"20K", "3x5K"}
    names = {r["implementation"] for r in rows}
    assert {"stream limit (C kernel)", "fastopt cython", "numpy reference"} <= names
    if bench._backends.available("numba"):
        assert "fastopt numba" in names
    if importlib.util.find_spec("torch") is not None:
        assert {"torch for-loop", "torch foreach", "torch fused"} <= names
    for r in rows:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["pct_limit"] > 0
        if r["implementation"].startswith("stream limit"):
            assert r["pct_limit"] == pytest.approx(100)
    assert "% limit" in printed and "fastopt cython" in printed


def test_harness_every_rule(tmp_path):
    out = tmp_path / "all.json"
    assert bench.main(["--rules", "all", "--cases", "3x3K", "--budget", "0",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["rule"] for r in rows} == set(bench.RULES)
    assert all(r["median_ms"] > 0 for r in rows)


def test_harness_rejects_unknown_rule():
    with pytest.raises(SystemExit):
        bench.main(["--rules", "adamzz", "--json", ""])


def test_matrix_sizes():
    assert bench.matrix_sizes([10_000_000, 7, 5000]) == [9_999_360, 1024, 4096]


def test_asv_suite_is_valid(tmp_path):
    if shutil.which("asv") is None and not os.environ.get("CI"):
        pytest.skip("asv is not installed (pip install 'fastopt[bench]')")
    env = dict(os.environ, HOME=str(tmp_path))  # asv's machine file goes to $HOME
    asv = [sys.executable, "-m", "asv", "--config", str(ROOT / "benchmarks" / "asv.conf.json")]
    subprocess.run(asv + ["machine", "--yes"], env=env, check=True, capture_output=True)
    proc = subprocess.run(asv + ["check", "--python=same"], env=env, capture_output=True,
                          text=True, cwd=ROOT / "benchmarks")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No problems found" in proc.stdout


def test_harness_operations(tmp_path, capsys):
    out = tmp_path / "ops.json"
    assert bench.main(["--rules", "none", "--ops", "all", "--op-cases", "64x96,2K",
                       "--budget", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["rule"] for r in rows} == set(bench.ops.OPS)
    assert {r["case"] for r in rows} == {"64x96", "2K"}
    assert "fastopt cython" in {r["implementation"] for r in rows}
    # kd_loss's arithmetic alone: its first 32 rows (all 64 of the matrix in two calls)
    assert "fastopt cython, 32 rows in cache" in {
        r["implementation"] for r in rows if r["rule"] == "kd_loss" and r["case"] == "64x96"}
    if importlib.util.find_spec("torch") is not None:
        assert "torch" in {r["implementation"] for r in rows}
    assert all(r["median_ms"] > 0 and r["pct_limit"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        bench.main(["--rules", "none", "--ops", "dropout", "--json", ""])
