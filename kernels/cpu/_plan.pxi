# The many-tensor driver shared by the CPU kernel modules (included, not imported).
#
# A Plan gathers, for each tensor, the data pointers of all operands of a rule (param in,
# param out, grad, state...) and cuts the tensors into chunks of at most CHUNK elements.
# plan_run() runs one chunk function over every chunk in a single OpenMP parallel loop,
# so a step over any number of tensors crosses into native code once.

cimport numpy as cnp
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cython.parallel cimport prange

cnp.import_array()

cdef extern from "chunks.h" nogil:
    ctypedef void (*fo_chunk_fn)(char **ptr, Py_ssize_t lo, Py_ssize_t n, const void *args) noexcept
    void fo_cpu_mask_chunk(char **ptr, Py_ssize_t lo, Py_ssize_t n, Py_ssize_t itemsize,
                           Py_ssize_t n_state, const unsigned char *mask)

# FO_CHUNK = 16384 elements: 64 KiB of float32 per operand, small enough to balance two
# threads over a few uneven tensors, large enough that the per-chunk call costs nothing.
# The norm reduction's fixed summation order is defined on these chunks.
cdef extern from "fastopt/reduce.h" nogil:
    const Py_ssize_t CHUNK "FO_CHUNK"
# Each thread gets at least this many elements: waking a thread and joining it costs about
# as much as updating ~30K elements, so a small step runs on fewer threads.
DEF MIN_PER_THREAD = 32768

cdef struct Plan:
    Py_ssize_t n_ops
    Py_ssize_t n_mask       # trailing operands of one byte per element (masks)
    Py_ssize_t n_ema        # 0 or 1: the weight EMA before the masks (see plan_chunk)
    Py_ssize_t n_aux        # per-tensor auxiliaries before those
    fo_chunk_fn ema_fn      # the EMA's chunk function (fo_cpu_ema_<sfx>) and its struct
    const void *ema_args
    Py_ssize_t itemsize
    Py_ssize_t n_chunks
    Py_ssize_t n_elements
    char **ptr              # ptr[t * n_ops + op]
    Py_ssize_t *chunk       # (tensor, lo, n) per chunk


cdef int plan_init(Plan *pl, tuple operands, Py_ssize_t itemsize,
                   Py_ssize_t n_aux=0, Py_ssize_t n_mask=0,
                   const Py_ssize_t *itemsizes=NULL, Py_ssize_t n_scale=0,
                   Py_ssize_t scale_block=1, Py_ssize_t n_ema=0) except -1:
    """Fill `pl` from a tuple of equally long lists of C-contiguous ndarrays.

    Every array of tensor t must hold as many elements as operands[0][t] and have the given
    itemsize (operand op: itemsizes[op] when `itemsizes` is given, for operands stored in
    formats of their own), except the last `n_mask` operands, of one byte per element
    (masks), the `n_ema` before those (the weight EMA: elements as the parameter's), the
    `n_aux` operands before those: per-tensor auxiliaries of any size and
    itemsize (a per-tensor scalar such as Lamb's trust ratio, Adafactor's factors), which
    chunk functions index themselves; the backend that builds them guarantees their sizes,
    and the `n_scale` operands before those: block scales (8-bit state's absmax), a float32
    per `scale_block` elements (the last block may be partial).
    The Python wrappers validate user input; this guards memory safety where it can.
    """
    cdef list first = operands[0]
    cdef Py_ssize_t n_ops = len(operands), n_t = len(first), t, op, size, n_chunks = 0
    cdef Py_ssize_t lo, k = 0, want = itemsize, n_blocks
    cdef cnp.ndarray a
    pl.ptr = NULL
    pl.chunk = NULL
    pl.n_ops = n_ops
    pl.n_mask = n_mask
    pl.n_ema = n_ema
    pl.ema_fn = NULL
    pl.ema_args = NULL
    pl.n_aux = n_aux
    pl.itemsize = itemsize
    for op in range(n_ops):
        if len(<list?>operands[op]) != n_t:
            raise ValueError(f"operand {op} has {len(operands[op])} arrays, expected {n_t}")
    pl.ptr = <char **>PyMem_Malloc(max(n_t * n_ops, 1) * sizeof(char *))
    if pl.ptr == NULL:
        raise MemoryError()
    for t in range(n_t):
        size = cnp.PyArray_SIZE(<cnp.ndarray?>first[t])
        n_chunks += (size + CHUNK - 1) // CHUNK
        for op in range(n_ops):
            a = <cnp.ndarray?>(<list>operands[op])[t]
            if op >= n_ops - n_mask:
                if cnp.PyArray_SIZE(a) != size or cnp.PyArray_ITEMSIZE(a) != 1 \
                        or not cnp.PyArray_IS_C_CONTIGUOUS(a):
                    raise ValueError(f"operand {op}, tensor {t}: expected a C-contiguous "
                                     f"array of {size} one-byte elements")
            elif op >= n_ops - n_mask - n_ema:
                if (cnp.PyArray_SIZE(a) != size or cnp.PyArray_ITEMSIZE(a) != itemsize
                        or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
                    raise ValueError(f"operand {op}, tensor {t}: expected a C-contiguous "
                                     f"array of {size} elements of {itemsize} bytes")
            elif op >= n_ops - n_mask - n_ema - n_aux:
                if cnp.PyArray_SIZE(a) == 0 or not cnp.PyArray_IS_C_CONTIGUOUS(a):
                    raise ValueError(f"operand {op}, tensor {t}: expected a C-contiguous, "
                                     f"non-empty array")
            elif op >= n_ops - n_mask - n_ema - n_aux - n_scale:
                n_blocks = (size + scale_block - 1) // scale_block
                if cnp.PyArray_SIZE(a) != n_blocks or cnp.PyArray_ITEMSIZE(a) != 4 \
                        or not cnp.PyArray_IS_C_CONTIGUOUS(a):
                    raise ValueError(f"operand {op}, tensor {t}: expected a C-contiguous "
                                     f"array of {n_blocks} block scales of 4 bytes")
            else:
                if itemsizes != NULL:
                    want = itemsizes[op]
                if (cnp.PyArray_SIZE(a) != size or cnp.PyArray_ITEMSIZE(a) != want
                        or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
                    raise ValueError(f"operand {op}, tensor {t}: expected a C-contiguous "
                                     f"array of {size} elements of {want} bytes")
            pl.ptr[t * n_ops + op] = <char *>cnp.PyArray_DATA(a)
    pl.n_chunks = n_chunks
    pl.n_elements = 0
    pl.chunk = <Py_ssize_t *>PyMem_Malloc(max(3 * n_chunks, 1) * sizeof(Py_ssize_t))
    if pl.chunk == NULL:
        raise MemoryError()
    for t in range(n_t):
        size = cnp.PyArray_SIZE(<cnp.ndarray>first[t])
        pl.n_elements += size
        lo = 0
        while lo < size:
            pl.chunk[3 * k] = t
            pl.chunk[3 * k + 1] = lo
            pl.chunk[3 * k + 2] = min(CHUNK, size - lo)
            lo += CHUNK
            k += 1
    return 0


cdef void plan_free(Plan *pl) noexcept:
    PyMem_Free(pl.ptr)
    PyMem_Free(pl.chunk)
    pl.ptr = NULL
    pl.chunk = NULL


cdef inline void plan_chunk_at(const Plan *pl, fo_chunk_fn fn, const void *args, char **ptr,
                               Py_ssize_t lo, Py_ssize_t n) noexcept nogil:
    """Elements lo .. lo + n - 1 of the tensor whose operand pointers are `ptr` (the plan's,
    or a copy of them shifted to the chunk, lo 0: see _optim.step_sums); with a mask operand
    (an optimizer step with pruning masks), the entries it prunes are then zeroed in the
    written parameter and the state, still in cache; with an EMA operand, the average then
    moves toward the written parameter (pl.ema_fn over (average, average, parameter)), its
    pruned entries zeroed too: the same values as a pass of the EMA after the step, without
    reading the parameter from memory again."""
    cdef char *ema[3]
    cdef const unsigned char *mask = NULL
    fn(ptr, lo, n, args)
    if pl.n_mask:
        mask = <const unsigned char *>ptr[pl.n_ops - 1] + lo
        fo_cpu_mask_chunk(ptr, lo, n, pl.itemsize,
                          pl.n_ops - 3 - pl.n_aux - pl.n_ema - pl.n_mask, mask)
    if pl.n_ema:
        ema[0] = ema[1] = ptr[pl.n_ops - pl.n_mask - 1]
        ema[2] = ptr[1]
        pl.ema_fn(ema, lo, n, pl.ema_args)
        if pl.n_mask:
            fo_cpu_mask_chunk(ema, lo, n, pl.itemsize, 0, mask)


cdef inline void plan_chunk(const Plan *pl, fo_chunk_fn fn, const void *args,
                            Py_ssize_t c) noexcept nogil:
    """Chunk c of the plan (plan_chunk_at)."""
    plan_chunk_at(pl, fn, args, pl.ptr + pl.chunk[3 * c] * pl.n_ops, pl.chunk[3 * c + 1],
                  pl.chunk[3 * c + 2])


cdef inline int plan_threads(const Plan *pl, int n_threads) noexcept nogil:
    """The threads a run of the plan gets (fewer for small steps)."""
    return min(n_threads, pl.n_elements // MIN_PER_THREAD)


cdef void plan_run(const Plan *pl, fo_chunk_fn fn, const void *args, int n_threads) noexcept nogil:
    cdef Py_ssize_t c
    if pl.n_chunks == 0:
        return
    n_threads = plan_threads(pl, n_threads)
    if n_threads <= 1 or pl.n_chunks == 1:
        for c in range(pl.n_chunks):
            plan_chunk(pl, fn, args, c)
        return
    for c in prange(pl.n_chunks, num_threads=n_threads, schedule='static'):
        plan_chunk(pl, fn, args, c)


cdef int run(fo_chunk_fn fn, tuple operands, Py_ssize_t itemsize, const void *args,
             int n_threads, Py_ssize_t n_aux=0, Py_ssize_t n_mask=0,
             fo_chunk_fn ema_fn=NULL, const void *ema_args=NULL) except -1:
    """Run `fn` over the plan of `operands`; with `ema_fn`, the operand before the masks
    is the weight EMA (see plan_chunk)."""
    cdef Plan pl
    try:
        plan_init(&pl, operands, itemsize, n_aux, n_mask, NULL, 0, 1, ema_fn != NULL)
        pl.ema_fn = ema_fn
        pl.ema_args = ema_args
        with nogil:
            plan_run(&pl, fn, args, n_threads)
    finally:
        plan_free(&pl)
    return 0
