"""Importing fastopt stays light, and the installation reports what it can do."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CPU_BACKENDS

import fastopt
from fastopt import _backends


def test_import_loads_no_framework():
    code = ("import sys, fastopt\n"
            "heavy = ('torch', 'jax', 'tensorflow', 'cupy', 'numba')\n"
            "print(','.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api():
    for name in fastopt.__all__:
        assert hasattr(fastopt, name), name
    assert {"SGD", "Adam", "AdamW", "show_config"} <= set(fastopt.__all__)


def test_show_config_lists_every_backend():
    buf = io.StringIO()
    fastopt.show_config(file=buf)
    text = buf.getvalue()
    for name in _backends.BACKENDS:
        assert f"  {name} " in text
    assert "threads:" in text and "SIMD:" in text and "CUDA device:" in text


def test_ci_has_every_cpu_backend():
    """In CI every optional CPU backend must be installed, or its tests would be skipped."""
    missing = [name for name in CPU_BACKENDS if not _backends.available(name)]
    if os.environ.get("CI"):
        assert missing == []
    assert _backends.available("numpy") and _backends.available("cython")


def test_threads_setting():
    before = fastopt.get_num_threads()
    try:
        fastopt.set_num_threads(1)
        assert fastopt.get_num_threads() == 1
    finally:
        fastopt.set_num_threads(before)
    for bad, exc in ((0, ValueError), (-1, ValueError), (2**31, ValueError), (1.5, TypeError),
                     (True, TypeError), ("2", TypeError)):
        with pytest.raises(exc, match="n must be an integer >= 1"):
            fastopt.set_num_threads(bad)
        assert fastopt.get_num_threads() == before
    fastopt.set_num_threads(np.int64(1))  # NumPy integers are integers
    try:
        assert fastopt.get_num_threads() == 1 and type(fastopt.get_num_threads()) is int
    finally:
        fastopt.set_num_threads(before)


def test_kernel_sources_installed_as_package_data():
    from fastopt._backends import _cupy
    root = _cupy.kernel_dir()
    assert (root / "cuda" / "optim.cu").is_file()
    assert (root / "include" / "fastopt" / "optim.h").is_file()
    assert (root / "include" / "fastopt" / "common.h").is_file()
