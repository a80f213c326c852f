# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Streaming-bandwidth yardstick (stream.h): the ceiling for an in-place optimizer step."""

include "_plan.pxi"

cdef extern from "stream.h" nogil:
    void fo_stream_w_f32(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_stream_rw1_f32(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_stream_rw2_f32(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_stream_rw3_f32(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_stream_rw4_f32(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_stream_rw5_f32(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_stream_rw1_f64(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_stream_rw2_f64(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_stream_rw3_f64(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_stream_rw4_f64(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_stream_rw5_f64(char **, Py_ssize_t, Py_ssize_t, const void *)

cdef fo_chunk_fn[5] _F32 = [fo_stream_rw1_f32, fo_stream_rw2_f32, fo_stream_rw3_f32,
                            fo_stream_rw4_f32, fo_stream_rw5_f32]
cdef fo_chunk_fn[5] _F64 = [fo_stream_rw1_f64, fo_stream_rw2_f64, fo_stream_rw3_f64,
                            fo_stream_rw4_f64, fo_stream_rw5_f64]


def stream_rw(list src, list rw, bint f64, int n_threads):
    """x += 0 * src for each list x in `rw` (1 to 5 lists of arrays shaped like `src`).

    Reads len(rw) + 1 streams and writes len(rw) in place, like an optimizer step with
    len(rw) - 1 state buffers; values are left as they were.
    """
    cdef float c32 = 0
    cdef double c64 = 0
    cdef Py_ssize_t k = len(rw)
    if not 1 <= k <= 5:
        raise ValueError(f"rw: expected 1 to 5 read-write operands, got {k}")
    ops = (src,) + tuple(rw)
    if f64:
        run(_F64[k - 1], ops, 8, &c64, n_threads)
    else:
        run(_F32[k - 1], ops, 4, &c32, n_threads)


def stream_w(list dst, int n_threads):
    """x[:] = 0 for each float32 array x in `dst`: the write-only pattern of an initializer."""
    cdef float c32 = 0
    run(fo_stream_w_f32, (dst,), 4, &c32, n_threads)
