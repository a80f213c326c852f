"""The README's code blocks and the docstring examples run as written."""

import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastopt import _rules

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_quickstarts():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    block = BLOCKS[index]
    for framework in ("torch", "jax", "tensorflow"):
        if re.search(rf"^import {framework}\b", block, re.M):
            pytest.importorskip(framework)
    proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("module", ["fastopt", "fastopt.optim._clip", "fastopt.init",
                                    "fastopt.prune", "fastopt.quant", "fastopt.distill"]
                         + sorted({rule.module for rule in _rules.RULES}))
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
