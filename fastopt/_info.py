"""fastopt.show_config(): what this installation can do, on this machine."""

import platform
import sys
from importlib import metadata

from fastopt import _backends
from fastopt._config import get_num_threads
from fastopt._version import __version__


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_simd():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return platform.machine()
    for level, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx"),
                        ("SSE2", "sse2")):
        if flag in flags:
            return level
    return platform.machine()


def config():
    """show_config()'s facts as a dict."""
    info = {
        "fastopt": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": _version("numpy"),
        "frameworks": {name: _version(dist) for name, dist in (
            ("torch", "torch"), ("jax", "jax"), ("tensorflow", "tensorflow-cpu"),
            ("numba", "numba"), ("cupy", "cupy-cuda12x"))},
        "threads": get_num_threads(),
        "cpu_simd": _cpu_simd(),
        "backends": {},
    }
    if not info["frameworks"]["tensorflow"]:
        info["frameworks"]["tensorflow"] = _version("tensorflow")
    for name, spec in _backends.BACKENDS.items():
        module, reason = _backends.load(name)
        info["backends"][name] = {"available": module is not None, "device": spec.device,
                                  "summary": spec.summary,
                                  "note": reason and f"{reason}; {spec.install}"}
    if _backends.available("cython"):
        from fastopt._cpu import _runtime
        info["openmp_threads"] = _runtime.openmp_max_threads()
        info["compiled_simd"] = f"{_runtime.compiled_simd()} baseline; loops cloned for " \
                                f"{_runtime.multiversion()}"
    if _backends.available("cupy"):
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["cuda_device"] = f"{props['name'].decode()} (cc {props['major']}.{props['minor']})"
    return info


def show_config(file=None):
    """Print versions, backends, CPU threads, SIMD level and CUDA device."""
    info = config()
    out = file or sys.stdout
    print(f"fastopt {info['fastopt']} on Python {info['python']}, {info['platform']}", file=out)
    print(f"numpy {info['numpy']}; " + ", ".join(
        f"{k} {v or 'not installed'}" for k, v in info["frameworks"].items()), file=out)
    print("backends:", file=out)
    for name, b in info["backends"].items():
        state = "available" if b["available"] else f"unavailable ({b['note']})"
        print(f"  {name:<7} [{b['device']}] {state}: {b['summary']}", file=out)
    print(f"threads: {info['threads']} (OpenMP default {info.get('openmp_threads', 'n/a')})",
          file=out)
    print(f"SIMD: CPU supports {info['cpu_simd']}; build: {info.get('compiled_simd', 'n/a')}",
          file=out)
    print(f"CUDA device: {info.get('cuda_device', 'none')}", file=out)
