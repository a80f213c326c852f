"""The comparison harness and the asv suite run: tiny sizes and budgets here; the numbers
are checked for consistency (each row's GB/s and % of limit follow from its time), and one
torch row is checked against the same step timed in a fresh process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastopt
from fastopt import bench
from fastopt.bench._timing import arrays

ROOT = Path(__file__).resolve().parents[1]


def test_parse_case():
    assert bench.parse_case("10M") == [10_000_000]
    assert bench.parse_case("1.5K") == [1500]
    sizes = bench.parse_case("200x50K")
    assert len(sizes) == 200 and sum(sizes) == 10_000_000
    assert min(sizes) < 30_000 < 70_000 < max(sizes)  # uneven, like a network's layers


@pytest.fixture
def quick(monkeypatch):
    """Smoke-test timing: a 1 MiB cache-eviction buffer instead of 64 MiB (the tiny cases
    here are in cache anyway; rewriting 64 MiB before every call was most of these tests'
    time)."""
    monkeypatch.setattr(bench._timing, "EVICT_BYTES", 1 << 20)


def assert_numbers(rows, traffic):
    """Every row has a positive time, its GB/s is its traffic (elements x 4 bytes x
    traffic(row)) over its time, and its % of limit is its GB/s over the stream limit's
    GB/s in the same rule and case (equivalently the limit's time over its own); a row
    timed in another process (the JAX rows) has the limit measured there as its
    'limit_ms'."""
    limits = {(r["rule"], r["case"]): r for r in rows
              if r["implementation"] == "stream limit (C kernel)"}
    assert limits
    for r in rows:
        assert r["median_ms"] > 0, r
        assert r["gbps"] == pytest.approx(
            r["elements"] * 4 * traffic(r) / (r["median_ms"] * 1e-3) / 1e9, rel=1e-9), r
        limit = limits[r["rule"], r["case"]]
        if "limit_ms" in r:
            assert r["pct_limit"] == pytest.approx(100 * r["limit_ms"] / r["median_ms"],
                                                   rel=1e-9), r
            continue
        assert r["pct_limit"] == pytest.approx(100 * r["gbps"] / limit["gbps"], rel=1e-9), r
        assert r["pct_limit"] == pytest.approx(
            100 * limit["median_ms"] / r["median_ms"], rel=1e-9), r
    for limit in limits.values():
        assert limit["pct_limit"] == pytest.approx(100)


def rule_traffic(row):
    return bench.RULES[row["rule"]].traffic


def test_harness_end_to_end(tmp_path, capsys, quick):
    out = tmp_path / "results.json"
    assert bench.main(["--cases", "20K,3x5K", "--budget", "0", "--no-check",
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["rule"] for r in rows} == set(bench.DEFAULT_RULES)
    assert {r["case"] for r in rows} == {"20K", "3x5K"}
    assert {(r["case"], r["tensors"], r["elements"]) for r in rows} == {
        ("20K", 1, 20_000), ("3x5K", 3, 15_000)}
    names = {r["implementation"] for r in rows}
    assert {"stream limit (C kernel)", "fastopt cython", "numpy reference"} <= names
    if bench._backends.available("numba"):
        assert "fastopt numba" in names
    if importlib.util.find_spec("torch") is not None:
        assert {"torch for-loop", "torch foreach", "torch fused"} <= names
    if all(importlib.util.find_spec(m) is not None for m in ("jax", "optax")):
        for rule in bench.DEFAULT_RULES:  # each has fastopt.jax's two rows and optax's two
            optax = f"optax.{bench.RULES[rule].cls.lower()}"
            assert {r["implementation"] for r in rows if r["rule"] == rule} >= {
                "fastopt.jax step", "fastopt.jax update, grads inside", optax,
                f"{optax}, grads inside"}, rule
    assert_numbers(rows, rule_traffic)
    # the printed table holds the same numbers
    for r in rows:
        assert (f"{r['rule']:<6} {r['case']:<9} {r['implementation']:<30} "
                f"{r['median_ms']:>10.2f} {r['gbps']:>7.1f} {r['pct_limit']:>7.0f}%") in printed
    assert result["fresh_process_check"] is None  # --no-check
    assert result["machine"]["threads"] >= 1 and result["machine"]["processor"]


def test_harness_every_rule(tmp_path, quick):
    out = tmp_path / "all.json"
    assert bench.main(["--rules", "all", "--cases", "3x3K", "--budget", "0", "--no-check",
                       "--no-jax", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["rule"] for r in rows} == set(bench.RULES)
    for rule in bench.RULES:  # every rule ran on fastopt's own backend
        assert any(r["rule"] == rule and r["implementation"] == "fastopt cython"
                   for r in rows), rule
    assert_numbers(rows, rule_traffic)


def test_prodigy_is_timed_on_alternating_gradients():
    """Under the harness's one fixed gradient Prodigy's parameters leave the data's scale
    within 200 steps (its d estimate grows without bound; later they overflow), so the
    harness times it on g, -g, g, ... (bench._table.ALTERNATING), where they stay."""
    rule = bench.RULES["prodigy"]
    assert rule.alternate and not bench.RULES["adam"].alternate
    for alternate in (True, False):
        params, grads = arrays([3000], np.float32, 1), arrays([3000], np.float32, 2)
        opt = fastopt.Prodigy(params, backend="cython", **rule.hyper)
        for i in range(200):
            opt.step([-g for g in grads] if alternate and i % 2 else grads)
        scale = np.abs(params[0]).max()
        assert scale < 10 if alternate else scale > 1e6, (alternate, scale)


def test_harness_agrees_with_a_fresh_process(tmp_path):
    """A torch.optim row timed inside the harness (the CLI's process: fastopt's OpenMP
    extensions and Numba's threading layer loaded before torch) agrees within 1.5x with
    the same step timed alone in a fresh process. It did not before the harness undid
    Numba's nested-parallelism setting: torch's for-loop Adam was 20-40x slower in the
    harness. 4 tensors of 50K-150K elements: large enough for torch to run its ops in
    parallel regions, where the difference was."""
    pytest.importorskip("torch")
    out = tmp_path / "check.json"
    # `python -m fastopt.bench`'s order of imports (fastopt.bench first, torch when the
    # torch rows are built), with the quick fixture's eviction buffer
    code = ("import sys, fastopt.bench as b; b._timing.EVICT_BYTES = 1 << 20; "
            "sys.exit(b.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "--rules", "adam", "--cases", "4x100K",
                           "--budget", "0", "--no-jax", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check = json.loads(out.read_text())["fresh_process_check"]
    assert check["rule"] == "adam" and check["case"] == "4x100K"
    assert check["implementation"] == "torch for-loop"
    assert check["harness_ms"] > 0 and check["fresh_ms"] > 0
    assert check["ratio"] == pytest.approx(check["harness_ms"] / check["fresh_ms"])
    assert check["agree"], proc.stdout
    assert "check: torch for-loop adam 4x100K" in proc.stdout
    assert "WARNING" not in proc.stdout


def test_fresh_check_reports_a_disagreement(capsys, monkeypatch):
    """The check's verdict and its warning line (the timings replaced: a 3x gap)."""
    monkeypatch.setattr(bench, "time_against_fresh",
                        lambda *a, **k: ([0.003, 0.004], [0.001, 0.002]))
    result = bench._fresh_check("adam", "4x100K", bench.RULES["adam"], [1], 1, 0,
                                lambda: None, 0.003, sys.stdout)
    printed = capsys.readouterr().out
    assert not result["agree"] and result["ratio"] == pytest.approx(3)
    assert printed.startswith("WARNING: torch for-loop adam 4x100K takes 3.00 ms here but "
                              "1.00 ms alone in a fresh process")
    assert "note:" not in printed  # the row's 3 ms is the step's median while checked
    # a row far from the step's time while checked: the load changed (a note, no warning)
    result = bench._fresh_check("adam", "4x100K", bench.RULES["adam"], [1], 1, 0,
                                lambda: None, 0.035, sys.stdout)
    printed = capsys.readouterr().out
    assert result["row_drift"] == pytest.approx(10)
    assert "note: the torch for-loop adam 4x100K row's median, 35.00 ms, is 10.00x" in printed


def test_harness_rejects_unknown_rule():
    with pytest.raises(SystemExit):
        bench.main(["--rules", "adamzz", "--json", ""])


@pytest.mark.parametrize("option, case", [("--cases", "all"), ("--cases", "200x"),
                                          ("--cases", "0"), ("--cases", "inf"),
                                          ("--cases", "0x5K"), ("--formats", "-5M"),
                                          ("--formats", "1e400"), ("--formats", "none"),
                                          ("--op-cases", "64xK"), ("--op-cases", "0x5K"),
                                          ("--muon", "4"), ("--muon", "0x8x8")])
def test_harness_rejects_bad_cases(option, case, capsys):
    """A case that is no size: argparse's usage error naming the option and the case, not a
    traceback (and nothing timed before it)."""
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--rules", "none", f"{option}={case}", "--json", ""])
    assert exit_.value.code == 2
    assert f"{option}: {case!r} is no case" in capsys.readouterr().err


def test_matrix_sizes():
    assert bench.matrix_sizes([10_000_000, 7, 5000]) == [9_999_360, 1024, 4096]


def test_asv_suite_is_valid(tmp_path):
    if importlib.util.find_spec("asv") is None:
        pytest.skip("asv is not installed (pip install 'fastopt[bench]')")
    env = dict(os.environ, HOME=str(tmp_path))  # asv's machine file goes to $HOME
    asv = [sys.executable, "-m", "asv", "--config", str(ROOT / "benchmarks" / "asv.conf.json")]
    subprocess.run(asv + ["machine", "--yes"], env=env, check=True, capture_output=True)
    proc = subprocess.run(asv + ["check", "--python=same"], env=env, capture_output=True,
                          text=True, cwd=ROOT / "benchmarks")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No problems found" in proc.stdout


def test_harness_operations(tmp_path, quick):
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
    assert_numbers(rows, lambda r: bench.ops.OPS[r["rule"]].traffic)
    with pytest.raises(SystemExit):
        bench.main(["--rules", "none", "--ops", "dropout", "--json", ""])


def test_harness_training_loop(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "train.json"
    assert bench.main(["--rules", "adamw,lion", "--cases", "none", "--train", "3x32",
                       "--budget", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    names = {rule: [r["implementation"] for r in rows if r["rule"] == rule]
             for rule in ("adamw", "lion")}
    assert names["adamw"] == list(bench.training.IMPLEMENTATIONS)
    assert names["lion"] == ["fastopt.torch", "fastopt array API"]  # torch has no Lion
    elements = 3 * 32 * 33
    foreach = next(r for r in rows if r["implementation"] == "torch foreach")["median_ms"]
    for r in rows:
        assert r["case"] == "train 3x32" and r["tensors"] == 6 and r["elements"] == elements
        assert r["fwd_bwd_ms"] > 0 and r["median_ms"] > 0
        assert r["gbps"] == pytest.approx(
            elements * 4 * rule_traffic(r) / (r["median_ms"] * 1e-3) / 1e9, rel=1e-9)
        if r["rule"] == "adamw":
            assert r["vs_foreach"] == pytest.approx(foreach / r["median_ms"], rel=1e-9)
    assert "training loop" in capsys.readouterr().out


def test_harness_muon_table(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "muon.json"
    assert bench.main(["--rules", "none", "--cases", "none", "--muon", "2x48x32,16x64",
                       "--budget", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["case"], r["implementation"]) for r in rows] == [
        (case, name) for case in ("2x48x32", "16x64")
        for name in ("fastopt (float32 NS)", "fastopt (bfloat16 NS)", "torch.optim.Muon")]
    torch_ms = {r["case"]: r["median_ms"] for r in rows if r["implementation"].startswith("torch")}
    for r in rows:
        assert r["elements"] == (2 * 48 * 32 if r["case"] == "2x48x32" else 16 * 64)
        assert r["median_ms"] > 0
        assert r["vs_torch"] == pytest.approx(torch_ms[r["case"]] / r["median_ms"], rel=1e-9)
        if r["implementation"].startswith("fastopt"):
            assert r["gemm_share"] == pytest.approx(1 - r["elementwise_ms"] / r["median_ms"],
                                                    rel=1e-9)
            assert r["gbps"] == pytest.approx(r["elements"] * 4 * 8 / r["elementwise_ms"] / 1e6,
                                              rel=1e-9)
    assert "GEMM share" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--rules", "none", "--cases", "none", "--muon", "4", "--json", ""])
