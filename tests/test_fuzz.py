"""Crash-free fuzzing of the public API: optimizers (every rule of fastopt._rules.RULES, with
max_grad_norm, max_grad_value, skip_nonfinite, masks, set_masks, load_state_dict),
clipping, pruning masks, quantization and distillation, over dtypes, shapes, strides,
offsets, thread counts and frameworks.

The property (tests/fuzz_target.py): each call returns or raises TypeError/ValueError; an
optimizer step or load_state_dict that raises changes no parameter, state array or step
count. The Hypothesis targets run in a child process, one per family, so that a crash in
native code (SIGSEGV, abort) fails its test, naming the calls it happened in, instead of
killing the pytest run. Each run is deterministic (derandomize, a fixed number of
examples, no example database, no shrinking) and writes nothing into the repository.

To hunt for more failures than the first, run a target by hand, for example
``python tests/fuzz_target.py optimizers --torch --examples 3000 --seed 1 --survey``
(``--shrink`` instead of ``--survey`` shrinks the first failure to a minimal example).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_target import FAMILIES

TARGET = Path(__file__).with_name("fuzz_target.py")
# examples per target, so that this file runs in about a minute on 2 cores with Numba's
# cache warm (a cold cache first compiles the kernels a target reaches: up to a minute more)
EXAMPLES = {"optimizers": 600, "clip": 200, "prune": 300, "quant": 300, "distill": 200}
TIMEOUT = 600


def run_target(family, tmp_path, *extra, examples=None):
    """Run one fuzz target in a child; (passed, report)."""
    trace = tmp_path / "last_call.txt"
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p),  # the parent's imports
               PYTHONDONTWRITEBYTECODE="1",
               PYTHONFAULTHANDLER="1",
               HYPOTHESIS_STORAGE_DIRECTORY=str(tmp_path / "hypothesis"))
    cmd = [sys.executable, str(TARGET), family, "--trace", str(trace),
           "--examples", str(examples or EXAMPLES[family]), *extra]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        rc, out = None, (exc.stdout or b"").decode(errors="replace") + \
            (exc.stderr or b"").decode(errors="replace")
    else:
        rc, out = proc.returncode, proc.stdout + proc.stderr
    if rc == 0:
        return True, out
    calls = trace.read_text().strip() if trace.exists() else "(none)"
    if rc is None:
        how = f"timed out after {TIMEOUT} s"
    elif rc < 0:
        how = f"was killed by {signal.Signals(-rc).name}"
    else:
        how = f"failed (exit status {rc})"
    return False, (f"fuzz target {family!r} {how}\n"
                   f"command: {' '.join(cmd[1:])}\n"
                   f"the failing example's calls (the last one raised, crashed or hung):\n"
                   f"{calls}\n"
                   f"--- output (tail) ---\n{out[-12000:]}")


@pytest.mark.parametrize("family", FAMILIES)
def test_fuzz_numpy(family, tmp_path):
    passed, report = run_target(family, tmp_path)
    assert passed, report


@pytest.mark.parametrize("family", FAMILIES)
def test_fuzz_torch(family, tmp_path):
    """The same targets with torch tensors too: non-contiguous, expanded, negated or
    conjugated views, tensors that require grad, bfloat16, mixed with NumPy arrays."""
    pytest.importorskip("torch")
    passed, report = run_target(family, tmp_path, "--torch")
    assert passed, report


def test_harness_passes_refusals_and_fails_errors_and_crashes(tmp_path):
    """The harness itself: a TypeError/ValueError passes; another exception fails with its
    call; a segfault in the child fails, naming the signal and the call it was in."""
    passed, report = run_target("selftest-refused", tmp_path, examples=3)
    assert passed, report
    passed, report = run_target("selftest-error", tmp_path, examples=3)
    assert not passed
    assert "ZeroDivisionError" in report
    assert "fuzz calls (the last one raised it):\n    operator.truediv(" in report
    passed, report = run_target("selftest-crash", tmp_path, examples=1)
    assert not passed
    assert "killed by SIGSEGV" in report
    assert "crashed or hung):\nctypes.string_at(0)\n" in report
    assert "Fatal Python error: Segmentation fault" in report  # faulthandler's traceback
