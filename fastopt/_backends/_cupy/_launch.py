"""What the CuPy backend's modules share: where the CUDA sources are, the NVRTC options, the
compiled modules (once per process; CuPy also caches them on disk: set CUPY_CACHE_DIR to move
that cache), the operand tables and the launch shapes."""

import functools
import importlib.util
from pathlib import Path

import numpy as np

BLOCK_CHUNK = 65536  # elements per thread block of the update kernels
THREADS = 256


def kernel_dir():
    """The kernels/ folder (CUDA sources and shared headers): package data of an installed
    fastopt, or the folder beside the package when it is imported from a source checkout."""
    # kernels/ holds no Python: it is a namespace package, whose importlib.resources handle
    # is no file-system path, so take its folder from the import spec
    spec = importlib.util.find_spec("fastopt.kernels")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[3] / "kernels"


def compile_options():
    """NVRTC options, shared with the compile test that runs without a GPU.

    --fmad=false keeps a*b+c as two roundings, as the CPU build does, so every backend
    computes the same numbers.
    """
    return ("-std=c++14", "--fmad=false", f"-I{kernel_dir() / 'include'}")


def source(name):
    return (kernel_dir() / "cuda" / name).read_text()


def unavailable_reason():
    import cupy
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return f"no CUDA device ({exc})"
    return None if count > 0 else "no CUDA device"


@functools.lru_cache(maxsize=None)
def module(name):
    import cupy
    return cupy.RawModule(code=source(name), options=compile_options())


def table(operands, chunk):
    """Host int64 table: operand addresses per tensor, then (tensor, offset, length) per
    chunk (see kernels/cuda/optim.cu); and the number of chunks."""
    n_t = len(operands[0])
    sizes = [int(a.size) for a in operands[0]]
    chunks = [(t, lo, min(chunk, size - lo))
              for t, size in enumerate(sizes) for lo in range(0, size, chunk)]
    table = np.empty(n_t * len(operands) + 3 * len(chunks), np.int64)
    table[:n_t * len(operands)] = [op[t].data.ptr for t in range(n_t) for op in operands]
    table[n_t * len(operands):] = np.ravel(chunks)
    return table, len(chunks)


def grid(n):
    """Blocks of THREADS for a grid-stride loop over n elements (at most 65536)."""
    return (min(-(-n // THREADS), 65536),)


def suffix(dtype):
    return "f64" if dtype == np.float64 else "f32"


def device(arrays, like):
    """Host arrays as device arrays beside `like`, in one transfer."""
    import cupy
    if not arrays:
        return []
    ends = np.cumsum([a.size for a in arrays])
    with like.device:
        flat = cupy.asarray(np.concatenate([a.reshape(-1) for a in arrays]))
    return [flat[end - a.size:end].reshape(a.shape) for a, end in zip(arrays, ends)]
