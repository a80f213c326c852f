"""The CuPy backend's kernels for fastopt.prune (kernels/cuda/prune.cu: the select's
passes, which fastopt._backends._select drives), fastopt.quant (quant.cu) and
fastopt.distill (distill.cu)."""

import numpy as np

from fastopt._backends import _select
from fastopt._backends._cupy import _launch
from fastopt._backends._layout import CE_SQUARES, CHUNK, DIGIT_BITS, KD_ROWS, LANES, PRUNE_THREADS


def _key(dtype):
    return np.uint64 if dtype == np.float64 else np.uint32


def _prune_launch(kernel, operands, *args):
    """One launch of fo_cuda_prune_<kernel>: a block per CHUNK chunk of the
    tensors."""
    import cupy
    table, n_chunks = _launch.table(operands, CHUNK)
    if n_chunks:
        name = f"fo_cuda_prune_{kernel}_{_launch.suffix(operands[0][0].dtype)}"
        _launch.module("prune.cu").get_function(name)(
            (n_chunks,), (PRUNE_THREADS,),
            (cupy.asarray(table), np.int64(len(operands[0]))) + args)


def prune_hist(arrays, shift, pmask, prefix, n_threads):
    import cupy
    key = _key(arrays[0].dtype)
    with arrays[0].device:
        counts = cupy.zeros(2 ** DIGIT_BITS, np.uint64)
        maxkey = cupy.zeros(1, key)
        _prune_launch("hist", (arrays,), np.int32(shift), key(pmask), key(prefix), counts,
                      maxkey)
        return counts.get().astype(np.int64), int(maxkey.get()[0])


def prune_ties(arrays, thr, n_threads):
    import cupy
    with arrays[0].device:
        out = cupy.zeros(_select.n_chunks(arrays), np.int64)
        _prune_launch("ties", (arrays,), _key(arrays[0].dtype)(thr), out)
        return out.get()


def prune_mask(arrays, masks, thr, tie_modes, n_threads):
    import cupy
    with arrays[0].device:
        _prune_launch("mask", (arrays, masks), _key(arrays[0].dtype)(thr),
                      cupy.asarray(np.asarray(tie_modes, np.int64)))


# -- fastopt.quant's loops (kernels/cuda/quant.cu)

_QUANT_KINDS = {"quantize": 0, "fake_quantize": 2, "fake_quantize_grad": 3}  # FO_CUDA_*


def quant_loop(op, x, out, gy, B, C, inv, zp, scale, qmin, qmax, fused, is_signed, *,
               n_threads):
    """The loops of kernels/cpu/_quant.pyx (same arguments) on device arrays; the
    per-slice parameters come from the host."""
    import cupy
    x, out = x.reshape(-1), out.reshape(-1)
    module = _launch.module("quant.cu")
    with x.device:
        if op == "dequantize":
            n = out.size
            module.get_function(f"fo_cuda_dequant_{_launch.suffix(out.dtype)}")(
                _launch.grid(n), (_launch.THREADS,),
                (x, out, np.int64(n), np.int64(B), np.int64(C), cupy.asarray(zp, np.int32),
                 cupy.asarray(scale, np.float64), np.int32(is_signed)))
            return 0
        dtype, n = x.dtype, x.size
        inv, zp, scale = _launch.device([np.asarray(v, dtype) for v in
                                 (inv, zp, inv if scale is None else scale)], x)
        nan = cupy.zeros(1, np.uint64)
        module.get_function(f"fo_cuda_quant_{_launch.suffix(dtype)}")(
            _launch.grid(n), (_launch.THREADS,),
            (np.int32(_QUANT_KINDS[op]), x, out, x if gy is None else gy.reshape(-1),
             np.int64(n), np.int64(B), np.int64(C), inv, zp, scale, dtype.type(qmin),
             dtype.type(qmax), np.int32(fused), nan))
        return int(nan.get()[0])


# -- fastopt.distill's rows (kernels/cuda/distill.cu)

def kd_rows(s, t, g, labels, temperature, wk, wc, *, n_threads):
    """Per row: the weighted gradient into g, and (KL_b, CE_b) as a host (B, 2) float64
    array; LANES threads per row, KD_ROWS rows per block."""
    import cupy
    B, C = s.shape
    f = s.dtype.type
    temp = f(temperature)
    with s.device:
        rows = cupy.zeros((B, 2), np.float64)
        labels = np.uint64(0) if labels is None else cupy.asarray(labels, np.int64)
        _launch.module("distill.cu").get_function(f"fo_cuda_kd_rows_{_launch.suffix(s.dtype)}")(
            (-(-B // KD_ROWS),), (KD_ROWS * LANES,),
            (s, t, g, np.int64(B), np.int64(C), labels, temp, f(wk), f(wc),
             np.int32(CE_SQUARES.get(float(temp), 0)), rows))
        return rows.get()
