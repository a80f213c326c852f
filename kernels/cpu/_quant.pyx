# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Quantization on the CPU: the loops of quant_loops.h (fastopt/quant.h) over one array,
cut into FO_CHUNK chunks run in parallel. Arguments are validated by fastopt.quant."""

include "_plan.pxi"

from libc.stdint cimport int32_t, uint8_t

cdef extern from "quant_loops.h" nogil:
    ctypedef struct fo_quant_args:
        const void *inv
        const void *zp
        const void *scale
        const int32_t *zp_int
        const double *scale_f64
        Py_ssize_t B
        Py_ssize_t C
        double qmin
        double qmax
        int fused
        int is_signed
    Py_ssize_t fo_cpu_quantize_f32(const float *x, uint8_t *q, Py_ssize_t lo, Py_ssize_t n,
                                   const fo_quant_args *a)
    Py_ssize_t fo_cpu_quantize_f64(const double *x, uint8_t *q, Py_ssize_t lo, Py_ssize_t n,
                                   const fo_quant_args *a)
    Py_ssize_t fo_cpu_dequantize_f32(const uint8_t *q, float *y, Py_ssize_t lo, Py_ssize_t n,
                                     const fo_quant_args *a)
    Py_ssize_t fo_cpu_dequantize_f64(const uint8_t *q, double *y, Py_ssize_t lo, Py_ssize_t n,
                                     const fo_quant_args *a)
    Py_ssize_t fo_cpu_fake_quantize_f32(const float *x, float *y, Py_ssize_t lo, Py_ssize_t n,
                                        const fo_quant_args *a)
    Py_ssize_t fo_cpu_fake_quantize_f64(const double *x, double *y, Py_ssize_t lo,
                                        Py_ssize_t n, const fo_quant_args *a)
    Py_ssize_t fo_cpu_fake_quantize_grad_f32(const float *x, float *gx, const float *gy,
                                             Py_ssize_t lo, Py_ssize_t n, const fo_quant_args *a)
    Py_ssize_t fo_cpu_fake_quantize_grad_f64(const double *x, double *gx, const double *gy,
                                             Py_ssize_t lo, Py_ssize_t n,
                                             const fo_quant_args *a)

# which loop: the operation and the float dtype
DEF QUANTIZE = 0
DEF DEQUANTIZE = 1
DEF FAKE = 2
DEF FAKE_GRAD = 3
_KINDS = {"quantize": QUANTIZE, "dequantize": DEQUANTIZE, "fake_quantize": FAKE,
          "fake_quantize_grad": FAKE_GRAD}


cdef void _need(cnp.ndarray a, Py_ssize_t size, Py_ssize_t itemsize, str name) except *:
    if (a is None or cnp.PyArray_SIZE(a) != size or cnp.PyArray_ITEMSIZE(a) != itemsize
            or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
        raise ValueError(f"{name}: expected a C-contiguous array of {size} elements of "
                         f"{itemsize} bytes")


def loop(str op, cnp.ndarray x, cnp.ndarray out, object gy, Py_ssize_t B, Py_ssize_t C,
         object inv, object zp, object scale, double qmin, double qmax, bint fused,
         bint is_signed, int n_threads):
    """One quantization loop over the flat arrays viewed as (A, B, C); returns the number
    of NaN in x (the float array: `x` for quantize and the fake ops, `out` for dequantize).

    quantize: x float -> out codes (1 byte); dequantize: x codes -> out float (zp int32,
    scale float64 per slice); fake_quantize: x -> out; fake_quantize_grad: gy, x -> out.
    inv, zp, scale: B values per slice in the float dtype (zp int32, scale float64 for
    dequantize)."""
    cdef int kind = _KINDS[op]
    cdef cnp.ndarray floats = out if kind == DEQUANTIZE else x
    cdef Py_ssize_t size = cnp.PyArray_SIZE(floats), itemsize = cnp.PyArray_ITEMSIZE(floats)
    cdef bint f64 = itemsize == 8
    cdef fo_quant_args a
    cdef Py_ssize_t c, n_chunks = (size + CHUNK - 1) // CHUNK, lo, n, nan = 0
    cdef char *px
    cdef char *po
    cdef char *pg = NULL
    if B < 1 or C < 1 or size % (B * C):
        raise ValueError("B, C: the array's size is not a multiple of B * C")
    if kind == DEQUANTIZE:
        _need(x, size, 1, "x")
        _need(<cnp.ndarray?>zp, B, 4, "zp")
        _need(<cnp.ndarray?>scale, B, 8, "scale")
        a.zp_int = <const int32_t *>cnp.PyArray_DATA(zp)
        a.scale_f64 = <const double *>cnp.PyArray_DATA(scale)
    else:
        _need(x, size, itemsize, "x")
        _need(out, size, 1 if kind == QUANTIZE else itemsize, "out")
        _need(<cnp.ndarray?>inv, B, itemsize, "inv")
        _need(<cnp.ndarray?>zp, B, itemsize, "zp")
        a.inv = cnp.PyArray_DATA(inv)
        a.zp = cnp.PyArray_DATA(zp)
        if kind == FAKE:
            _need(<cnp.ndarray?>scale, B, itemsize, "scale")
            a.scale = cnp.PyArray_DATA(scale)
        if kind == FAKE_GRAD:
            _need(<cnp.ndarray?>gy, size, itemsize, "gy")
            pg = <char *>cnp.PyArray_DATA(gy)
    a.B, a.C, a.qmin, a.qmax, a.fused, a.is_signed = B, C, qmin, qmax, fused, is_signed
    px = <char *>cnp.PyArray_DATA(x)
    po = <char *>cnp.PyArray_DATA(out)
    n_threads = max(1, min(n_threads, size // MIN_PER_THREAD))
    with nogil:
        for c in prange(n_chunks, num_threads=n_threads, schedule='static'):
            lo = c * CHUNK
            n = min(CHUNK, size - lo)
            nan += _chunk(kind, f64, px, po, pg, lo, n, &a)
    return nan


cdef inline Py_ssize_t _chunk(int kind, bint f64, char *x, char *out, char *gy, Py_ssize_t lo,
                              Py_ssize_t n, const fo_quant_args *a) noexcept nogil:
    if kind == QUANTIZE:
        if f64:
            return fo_cpu_quantize_f64(<double *>x, <uint8_t *>out, lo, n, a)
        return fo_cpu_quantize_f32(<float *>x, <uint8_t *>out, lo, n, a)
    if kind == DEQUANTIZE:
        if f64:
            return fo_cpu_dequantize_f64(<uint8_t *>x, <double *>out, lo, n, a)
        return fo_cpu_dequantize_f32(<uint8_t *>x, <float *>out, lo, n, a)
    if kind == FAKE:
        if f64:
            return fo_cpu_fake_quantize_f64(<double *>x, <double *>out, lo, n, a)
        return fo_cpu_fake_quantize_f32(<float *>x, <float *>out, lo, n, a)
    if f64:
        return fo_cpu_fake_quantize_grad_f64(<double *>x, <double *>out, <double *>gy, lo, n, a)
    return fo_cpu_fake_quantize_grad_f32(<float *>x, <float *>out, <float *>gy, lo, n, a)
