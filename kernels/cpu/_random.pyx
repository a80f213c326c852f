# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""fastopt.init's random fills on the CPU: the Philox chunk functions of random_loops.h,
run over the array's chunks in one OpenMP loop. Arguments are validated by the caller."""

include "_plan.pxi"

cdef extern from "random_loops.h" nogil:
    const fo_chunk_fn *fo_cpu_random_fills


def fill(cnp.ndarray out, int kind, cnp.ndarray args, int n_threads):
    """Fill the C-contiguous `out` (float32, float64; uint32 for kind FO_RANDOM_BITS) with
    fill `kind`; `args` holds the bytes of a fo_random_args struct."""
    cdef Py_ssize_t itemsize = cnp.PyArray_ITEMSIZE(out)
    if not (0 <= kind <= 3) or itemsize not in (4, 8) or (kind == 3) != (out.dtype.kind == "u"):
        raise ValueError(f"no fill of kind {kind} for {out.dtype} arrays")
    if args.nbytes != 72 or not cnp.PyArray_IS_C_CONTIGUOUS(args):
        raise ValueError("args: expected the 72 bytes of a fo_random_args struct")
    run(fo_cpu_random_fills[2 * kind + (itemsize == 8)], ([out.reshape(-1)],), itemsize,
        cnp.PyArray_DATA(args), n_threads)
