"""A real build from the source tree: sdist -> wheel -> install into a fresh folder -> use.

This is what `pip install fastopt` does on a user's machine: the wheel must carry the
compiled extensions and the CUDA sources and headers as package data (the development
install used by the other tests reads them from the checkout instead).
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# building the sdist and the wheel takes a minute or more, and both tests need the wheel
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(out),
                    str(ROOT)], check=True, capture_output=True)
    (sdist,) = out.glob("fastopt-*.tar.gz")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(sdist)], check=True, capture_output=True)
    (whl,) = out.glob("fastopt-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("_optim", "_stream", "_runtime"):
        assert any(n.startswith(f"fastopt/_cpu/{module}.") and n.endswith(".so") for n in names)
    assert "fastopt/kernels/cuda/optim.cu" in names
    assert "fastopt/kernels/include/fastopt/optim.h" in names
    assert "fastopt/kernels/include/fastopt/common.h" in names
    assert not [n for n in names if n.endswith((".pyx", ".pxi", ".c"))]


def test_installed_wheel_works(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    code = (
        "import numpy as np, fastopt\n"
        "from fastopt import _backends\n"
        "from fastopt._backends import _cupy\n"
        f"assert fastopt.__file__.startswith({str(target)!r}), fastopt.__file__\n"
        f"assert str(_cupy.kernel_dir()).startswith({str(target)!r})\n"
        "assert (_cupy.kernel_dir() / 'cuda' / 'optim.cu').is_file()\n"
        "import pathlib\n"
        "inc = [o[2:] for o in _cupy.compile_options() if o.startswith('-I')][0]\n"
        "assert (pathlib.Path(inc) / 'fastopt' / 'optim.h').is_file(), inc\n"
        "assert _backends.available('cython')\n"
        "w = np.ones(4, np.float32)\n"
        "fastopt.SGD([w], lr=0.5).step([np.ones(4, np.float32)])\n"
        "assert (w == 0.5).all()\n"
    )
    # -S: no site hooks, so a development (editable) install of fastopt cannot interfere;
    # numpy comes from its own folder, after the fresh install
    numpy_home = Path(np.__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": f"{target}:{numpy_home}",
                                             "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
