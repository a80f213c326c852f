# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Optimizer update rules on the CPU: C loops from optim_loops.h, driven over many tensors.

Low-level entry points for fastopt._backends._cython: arguments are already validated, the
scalars already computed on the host (fastopt.optim._scalars). `f64` selects float64.
"""

include "_plan.pxi"

from cpython.pyport cimport PY_SSIZE_T_MAX

cdef extern from "reduce_loops.h" nogil:
    double fo_norm_chunk_f32(const float *g, Py_ssize_t n, int kind)
    double fo_norm_chunk_f64(const double *g, Py_ssize_t n, int kind)

cdef extern from "factored_loops.h" nogil:
    const Py_ssize_t COLS "FO_COLS"
    const Py_ssize_t BAND "FO_BAND"
    const Py_ssize_t SEGMENT "FO_SEGMENT"
    # the args pointer is a fo_adafactor_args_<sfx> struct
    void fo_cpu_adafactor_band_f32(const float *g, float *col, double *rowpart,
                                   double *colpart, Py_ssize_t R, Py_ssize_t C,
                                   Py_ssize_t band, Py_ssize_t k0, Py_ssize_t k1,
                                   const void *args)
    void fo_cpu_adafactor_band_f64(const double *g, double *col, double *rowpart,
                                   double *colpart, Py_ssize_t R, Py_ssize_t C,
                                   Py_ssize_t band, Py_ssize_t k0, Py_ssize_t k1,
                                   const void *args)
    void fo_cpu_adafactor_cols_f32(float *col, const double *colpart, Py_ssize_t R,
                                   Py_ssize_t C, Py_ssize_t k, const void *args)
    void fo_cpu_adafactor_cols_f64(double *col, const double *colpart, Py_ssize_t R,
                                   Py_ssize_t C, Py_ssize_t k, const void *args)
    void fo_cpu_adafactor_rows_f32(float *row, float *rmean, const double *rowpart,
                                   Py_ssize_t R, Py_ssize_t C, const void *args)
    void fo_cpu_adafactor_rows_f64(double *row, double *rmean, const double *rowpart,
                                   Py_ssize_t R, Py_ssize_t C, const void *args)

from libc.string cimport strcmp

cdef extern from "optim_loops.h" nogil:
    ctypedef struct fo_cpu_kernel:
        const char *name
        fo_chunk_fn f32
        fo_chunk_fn f64
        int n_state
    const fo_cpu_kernel *fo_cpu_kernels


ctypedef int (*fo_count_fn)(char **ptr, Py_ssize_t lo, Py_ssize_t n, const void *args,
                            const unsigned char *mask) noexcept nogil

cdef extern from "optim_loops.h" nogil:
    ctypedef struct fo_cpu_count:
        const char *name
        fo_count_fn f32
        fo_count_fn f64
        int n_state
    const fo_cpu_count *fo_cpu_counts


def caution_counts(str kernel, tuple operands, bint f64, cnp.ndarray args, int n_threads,
                   bint masked=False):
    """Per tensor (int64), how many elements the cautious count kernel `kernel` (a
    ``<rule>_caution`` of optim_loops.h's counting functions) finds agreeing, summed in one
    pass that writes nothing. `operands` as the kernel's (param, param out, grad, state...;
    param out is not touched), then with `masked` the pruning masks (uint8 per element, 0
    prunes: a pruned element is not counted); `args` its struct's bytes."""
    import numpy as np
    cdef bytes key = kernel.encode()
    cdef const fo_cpu_count *k = fo_cpu_counts
    cdef Plan pl
    cdef cnp.ndarray counts, out
    cdef cnp.int64_t *cs
    cdef fo_count_fn fn
    cdef const void *a
    cdef Py_ssize_t c, t, lo
    cdef char **p
    while k.name != NULL and strcmp(k.name, key) != 0:
        k += 1
    if k.name == NULL:
        raise ValueError(f"no CPU count kernel named {kernel!r}")
    if 3 + k.n_state + masked != len(operands):
        raise ValueError(f"count kernel {kernel!r} takes {3 + k.n_state + masked} operands, "
                         f"got {len(operands)}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(args):
        raise ValueError("args: expected a C-contiguous array")
    fn = k.f64 if f64 else k.f32
    a = cnp.PyArray_DATA(args)
    plan_init(&pl, operands, 8 if f64 else 4, 0, masked)
    try:
        counts = np.zeros(pl.n_chunks, np.int64)
        cs = <cnp.int64_t *>cnp.PyArray_DATA(counts)
        n_threads = plan_threads(&pl, n_threads)
        with nogil:
            for c in prange(pl.n_chunks, num_threads=max(n_threads, 1), schedule='static'):
                t = pl.chunk[3 * c]
                lo = pl.chunk[3 * c + 1]
                p = pl.ptr + t * pl.n_ops
                cs[c] = fn(p, lo, pl.chunk[3 * c + 2], a,
                           <const unsigned char *>p[pl.n_ops - 1] + lo if masked else NULL)
        out = np.zeros(len(operands[0]), np.int64)
        for c in range(pl.n_chunks):
            out[pl.chunk[3 * c]] += cs[c]
    finally:
        plan_free(&pl)
    return out


def kernels():
    """{name: number of state operands} of every chunk function in optim_loops.h."""
    cdef const fo_cpu_kernel *k = fo_cpu_kernels
    found = {}
    while k.name != NULL:
        found[k.name.decode()] = k.n_state
        k += 1
    return found


cdef const fo_cpu_kernel *_kernel(str name, Py_ssize_t n_operands) except NULL:
    """The chunk functions fo_cpu_<name>_<f32|f64> of optim_loops.h, checked to take
    `n_operands` operands (param in, param out, grad, state...)."""
    cdef bytes key = name.encode()
    cdef const fo_cpu_kernel *k = fo_cpu_kernels
    while k.name != NULL:
        if strcmp(k.name, key) == 0:
            if 3 + k.n_state != n_operands:
                raise ValueError(f"CPU kernel {name!r} takes {3 + k.n_state} operands, got "
                                 f"{n_operands}")
            return k
        k += 1
    raise ValueError(f"no CPU kernel named {name!r}")


def step(str kernel, tuple operands, bint f64, cnp.ndarray args, int n_threads,
         Py_ssize_t n_aux=0, Py_ssize_t n_mask=0, cnp.ndarray ema_args=None):
    """Run chunk function `kernel` over `operands` (a tuple of equally long lists of arrays:
    param in, param out, grad, state...). `args` (a C-contiguous array) holds the bytes of
    its fo_<rule>_args struct (fastopt._rules.Args.record). The last `n_aux` operands are per-tensor
    auxiliaries (any size: Lamb's trust ratio, Adafactor's factors; see _plan.pxi), followed,
    with `ema_args` (an fo_ema_args struct), by the weight EMA of each parameter, moved
    toward the written parameter chunk by chunk, and by the pruning masks when `n_mask` is 1
    (one byte per element; pruned entries of the written parameter, the state and the EMA
    become 0, see chunks.h)."""
    cdef bint with_ema = ema_args is not None
    if not cnp.PyArray_IS_C_CONTIGUOUS(args):
        raise ValueError("args: expected a C-contiguous array")
    cdef const fo_cpu_kernel *k = _kernel(kernel, len(operands) - n_mask - with_ema)
    cdef const fo_cpu_kernel *e = NULL
    if with_ema:
        if not cnp.PyArray_IS_C_CONTIGUOUS(ema_args):
            raise ValueError("ema_args: expected a C-contiguous array")
        e = _kernel("ema", 3)
    run(k.f64 if f64 else k.f32, operands, 8 if f64 else 4, cnp.PyArray_DATA(args), n_threads,
        n_aux, n_mask, NULL if e == NULL else (e.f64 if f64 else e.f32),
        NULL if e == NULL else cnp.PyArray_DATA(ema_args))


# step_sums: the most partials per chunk, and operands with `discard`
DEF MAX_SUMS = 4
DEF MAX_OPS = 16

from cython.parallel cimport threadid


cdef void _sums_chunk(const Plan *pl, fo_chunk_fn fn, const void *args, Py_ssize_t c,
                      char *scratch, const int *ops, const int *kinds, int n_sums,
                      bint f64, double *out) noexcept nogil:
    """Chunk c of step_sums: plan_chunk, with operand 1 in `scratch` when it is not NULL
    (the pointers shifted to the chunk), then the partial of each summed operand."""
    cdef char **ptr = pl.ptr + pl.chunk[3 * c] * pl.n_ops
    cdef Py_ssize_t lo = pl.chunk[3 * c + 1], n = pl.chunk[3 * c + 2], op
    cdef char *local[MAX_OPS]
    cdef int j
    if scratch != NULL:
        for op in range(pl.n_ops):
            local[op] = ptr[op] + lo * (1 if op >= pl.n_ops - pl.n_mask else pl.itemsize)
        local[1] = scratch
        ptr = local
        lo = 0
    plan_chunk_at(pl, fn, args, ptr, lo, n)
    for j in range(n_sums):
        if f64:
            out[j] = fo_norm_chunk_f64(<double *>ptr[ops[j]] + lo, n, kinds[j])
        else:
            out[j] = fo_norm_chunk_f32(<float *>ptr[ops[j]] + lo, n, kinds[j])


def step_sums(str kernel, tuple operands, bint f64, cnp.ndarray args, int n_threads,
              tuple sums, bint discard=False, Py_ssize_t n_aux=0, Py_ssize_t n_mask=0):
    """step() of `kernel` (no EMA) that also sums some of its operands as
    each chunk leaves them, while the chunk is in cache: `sums` holds (operand, kind)
    pairs, and the result, float64 of shape (chunks, len(sums)), the partials that
    norm_partials (fastopt/reduce.h's fixed order, kind 0 to 3) gives of those operands
    after the pass, pruned entries zeroed. With `discard`, the written operand 1 is not
    stored: each thread writes its chunks into a scratch chunk of its own, summed there
    (operand 1's arrays are not touched; pass any of the right sizes; not with auxiliaries,
    which chunk functions may index by the chunk's position)."""
    import numpy as np
    cdef const fo_cpu_kernel *k
    cdef Plan pl
    cdef int n_sums = len(sums), j
    cdef int ops[MAX_SUMS]
    cdef int kinds[MAX_SUMS]
    cdef Py_ssize_t c, itemsize = 8 if f64 else 4
    cdef fo_chunk_fn fn
    cdef const void *a
    cdef char *scratch = NULL
    cdef cnp.ndarray out
    cdef double *o
    if not cnp.PyArray_IS_C_CONTIGUOUS(args):
        raise ValueError("args: expected a C-contiguous array")
    k = _kernel(kernel, len(operands) - n_mask)
    if not 1 <= n_sums <= MAX_SUMS:
        raise ValueError(f"sums: expected 1 to {MAX_SUMS} (operand, kind) pairs, got {n_sums}")
    if discard and (len(operands) > MAX_OPS or n_aux):
        raise ValueError(f"discard: at most {MAX_OPS} operands, no auxiliaries")
    for j, (op, kind) in enumerate(sums):
        if not 0 <= op < len(operands) - n_mask - n_aux or not 0 <= kind <= 3:
            raise ValueError(f"sums[{j}]: expected (one of the kernel's "
                             f"{len(operands) - n_mask - n_aux} element operands, a kind 0 to "
                             f"3), got {(op, kind)}")
        ops[j] = op
        kinds[j] = kind
    fn = k.f64 if f64 else k.f32
    a = cnp.PyArray_DATA(args)
    plan_init(&pl, operands, itemsize, n_aux, n_mask)
    try:
        out = np.empty((pl.n_chunks, n_sums), np.float64)
        o = <double *>cnp.PyArray_DATA(out)
        n_threads = max(plan_threads(&pl, n_threads), 1)
        if pl.n_chunks == 1:
            n_threads = 1
        if discard:
            scratch = <char *>PyMem_Malloc(n_threads * CHUNK * itemsize)
            if scratch == NULL:
                raise MemoryError()
        with nogil:
            if n_threads == 1:
                for c in range(pl.n_chunks):
                    _sums_chunk(&pl, fn, a, c, scratch, ops, kinds, n_sums, f64,
                                o + c * n_sums)
            else:
                for c in prange(pl.n_chunks, num_threads=n_threads, schedule='static'):
                    _sums_chunk(&pl, fn, a, c,
                                scratch + threadid() * CHUNK * itemsize if discard else NULL,
                                ops, kinds, n_sums, f64, o + c * n_sums)
    finally:
        PyMem_Free(scratch)
        plan_free(&pl)
    return out


cdef extern from "format_loops.h" nogil:
    enum: FORMAT_OPS "FO_FORMAT_OPS"
    enum: _Q8_BLOCK "FO_Q8_BLOCK"
    enum: Q8_TABLE "FO_Q8_TABLE"
    ctypedef struct fo_format_args:
        fo_chunk_fn fn
        const void *args
        const cnp.uint32_t *keys
        cnp.uint64_t step
        const float *qmaps
        const cnp.uint32_t *qtables
        int n_ops, n_aux, shadow, mask, stochastic, vbmi
        int code[FORMAT_OPS + 1]
        int scales[FORMAT_OPS]
    void fo_cpu_format_chunk(char **ptr, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t n,
                             const fo_format_args *fa)
    int fo_q8_table(const float *qmap, cnp.uint32_t *table)
    void fo_q8_planes(fo_format_args *fa)
    bint fo_q8_vbmi()

# storage formats (fastopt._backends._formats.CODES, Q8S, Q8U) -> bytes per element
_ITEMSIZE = {0: 4, 2: 2, 3: 2, 4: 1, 5: 1}
_Q8 = (4, 5)
Q8_BLOCK = _Q8_BLOCK  # elements per block scale of 8-bit state
# whether 8-bit state runs its AVX-512 paths: loads with VBMI byte permutes, codes by gathers
VBMI = fo_q8_vbmi()


def q8_table(const float[::1] qmap):
    """The quantizer's lookup table (fo_q8_table in format_loops.h) of a dynamic map of
    8-bit state (256 increasing float32 values), as uint32."""
    if qmap.shape[0] != 256:
        raise ValueError(f"qmap: expected 256 values, got {qmap.shape[0]}")
    table = cnp.PyArray_EMPTY(1, [Q8_TABLE], cnp.NPY_UINT32, 0)
    if fo_q8_table(&qmap[0], <cnp.uint32_t *>cnp.PyArray_DATA(table)) != 0:
        raise ValueError("qmap: expected increasing values, at most one code step in each "
                         "bucket of the lookup (a dynamic map)")
    return table


def step_formats(str kernel, tuple operands, cnp.ndarray args, int n_threads, tuple storage,
                 bint shadow, bint stochastic, cnp.uint64_t step_count,
                 const cnp.uint32_t[:, ::1] keys, list masks=None, tuple scales=(),
                 const float[:, ::1] qmaps=None, const cnp.uint32_t[:, ::1] qtables=None,
                 bint vbmi=True):
    """Run elementwise kernel `kernel` in float32 over `operands` (param in, param out, grad,
    state..., then the shadow when `shadow`) stored in the formats `storage` (a code per
    operand: 0 float32, 2 bfloat16, 3 float16, and for state 4 or 5, blockwise 8-bit with
    the signed or unsigned map; see format_loops.h). `args` holds its fo_<rule>_args_f32
    struct; written operands in a low format are rounded stochastically (the bits of tensor
    t from its key keys[t] and `step_count`) or to nearest even; the pruned entries
    (`masks`) of the written ones become 0 before they are rounded or quantized. With 8-bit
    state, `scales` holds each 8-bit operand's list of block scales (float32, one per
    Q8_BLOCK elements), `qmaps` the two maps (signed, unsigned: 256 increasing float32
    each) and `qtables` their q8_table; `vbmi`: load it with AVX-512 VBMI and quantize it
    with AVX-512 gathers where the CPU has them (VBMI), else (tests) with the portable
    loops, to the same bits."""
    cdef Py_ssize_t n_conv = len(operands), n_ops = n_conv - shadow, op, c, n_q8 = 0
    cdef Py_ssize_t itemsizes[FORMAT_OPS + 1]
    cdef fo_format_args fa
    cdef Plan pl
    if not cnp.PyArray_IS_C_CONTIGUOUS(args):
        raise ValueError("args: expected a C-contiguous array")
    cdef const fo_cpu_kernel *k = _kernel(kernel, n_ops)
    if len(storage) != n_conv:
        raise ValueError(f"expected a storage format per operand ({n_conv}), got {len(storage)}")
    if n_ops > FORMAT_OPS:
        raise ValueError(f"kernel {kernel!r}: at most {FORMAT_OPS} operands take formats")
    if keys.shape[0] < len(operands[0]) or keys.shape[1] != 2:
        raise ValueError(f"keys: expected ({len(operands[0])}, 2) uint32, got "
                         f"({keys.shape[0]}, {keys.shape[1]})")
    for op in range(n_conv):
        if storage[op] not in _ITEMSIZE:
            raise ValueError(f"operand {op}: no storage format {storage[op]!r} in float32 "
                             f"kernels")
        fa.code[op] = storage[op]
        itemsizes[op] = _ITEMSIZE[storage[op]]
        if storage[op] in _Q8:
            if not 3 <= op < n_ops:
                raise ValueError(f"operand {op}: 8-bit storage is for state only")
            fa.scales[op] = n_conv + n_q8
            n_q8 += 1
    if shadow and storage[n_ops] == 0:
        raise ValueError("the shadow: expected bfloat16 or float16 storage, not float32")
    if len(scales) != n_q8:
        raise ValueError(f"scales: expected block scales for each of the {n_q8} 8-bit "
                         f"operands, got {len(scales)}")
    if n_q8 and (qmaps is None or qmaps.shape[0] != 2 or qmaps.shape[1] != 256
                 or qtables is None or qtables.shape[0] != 2 or qtables.shape[1] != Q8_TABLE):
        raise ValueError(f"qmaps, qtables: expected (2, 256) float32 and (2, {Q8_TABLE}) "
                         f"uint32 arrays with 8-bit state")
    fa.fn = k.f32
    fa.args = cnp.PyArray_DATA(args)
    fa.keys = &keys[0, 0] if keys.shape[0] else NULL
    fa.step = step_count
    fa.qmaps = &qmaps[0, 0] if n_q8 else NULL
    fa.qtables = &qtables[0, 0] if n_q8 else NULL
    fa.n_ops = n_ops
    fa.n_aux = 0
    fa.shadow = shadow
    fa.mask = n_conv + n_q8 if masks is not None else 0
    fa.stochastic = stochastic
    fa.vbmi = vbmi and VBMI
    if n_q8:
        fo_q8_planes(&fa)
    try:
        plan_init(&pl, operands + scales + ((masks,) if fa.mask else ()), 4, 0, fa.mask != 0,
                  itemsizes, n_q8, _Q8_BLOCK)
        with nogil:
            n_threads = plan_threads(&pl, n_threads)
            if n_threads <= 1 or pl.n_chunks <= 1:
                for c in range(pl.n_chunks):
                    _format_chunk(&pl, &fa, c)
            else:
                for c in prange(pl.n_chunks, num_threads=n_threads, schedule='static'):
                    _format_chunk(&pl, &fa, c)
    finally:
        plan_free(&pl)


cdef inline void _format_chunk(const Plan *pl, const fo_format_args *fa,
                               Py_ssize_t c) noexcept nogil:
    cdef Py_ssize_t t = pl.chunk[3 * c]
    fo_cpu_format_chunk(pl.ptr + t * pl.n_ops, t, pl.chunk[3 * c + 1], pl.chunk[3 * c + 2], fa)


def norm_partials(list grads, bint f64, int kind, int n_threads):
    """Each chunk's partial of the gradient norm (fastopt/reduce.h), as float64 array."""
    import numpy as np
    cdef Plan pl
    cdef cnp.ndarray out
    cdef double *o
    cdef Py_ssize_t c, t, lo
    plan_init(&pl, (grads,), 8 if f64 else 4)
    try:
        out = np.empty(pl.n_chunks, np.float64)
        o = <double *>cnp.PyArray_DATA(out)
        n_threads = plan_threads(&pl, n_threads)
        with nogil:
            for c in prange(pl.n_chunks, num_threads=max(n_threads, 1), schedule='static'):
                t = pl.chunk[3 * c]
                lo = pl.chunk[3 * c + 1]
                if f64:
                    o[c] = fo_norm_chunk_f64(<double *>pl.ptr[t] + lo, pl.chunk[3 * c + 2], kind)
                else:
                    o[c] = fo_norm_chunk_f32(<float *>pl.ptr[t] + lo, pl.chunk[3 * c + 2], kind)
    finally:
        plan_free(&pl)
    return out


cdef char *_data(object a, Py_ssize_t size, Py_ssize_t itemsize, str what) except NULL:
    cdef cnp.ndarray arr = <cnp.ndarray?>a
    if (cnp.PyArray_SIZE(arr) != size or cnp.PyArray_ITEMSIZE(arr) != itemsize
            or not cnp.PyArray_IS_C_CONTIGUOUS(arr)):
        raise ValueError(f"{what}: expected a C-contiguous array of {size} elements of "
                         f"{itemsize} bytes")
    return <char *>cnp.PyArray_DATA(arr)


def adafactor_factors(list grads, list rows, list cols, list rmeans,
                      const cnp.int64_t[:, ::1] shape, const cnp.int64_t[:, ::1] bands,
                      const cnp.int64_t[:, ::1] blocks, const cnp.int64_t[:, ::1] slices,
                      bint f64, cnp.ndarray args, int n_threads):
    """Adafactor's factors pass (factored_loops.h) over every factored tensor at once.

    Gradient t is `shape[t]` = (B, R, C): B slices of R x C. Its row factors `rows[t]`
    (B R elements), column factors `cols[t]` (B C) and clamped row means `rmeans[t]` (B)
    move in place. The work (fastopt._backends._twopass.factor_work): `bands` (tensor,
    slice, band, first block, end block: at most FO_SEGMENT blocks), which must cover each
    slice's bands and blocks once, then `blocks` (tensor, slice, column block) of the
    slices of several bands and `slices` (tensor, slice); each item is checked against the
    shapes. The float64 row and column partials are scratch of
    this call."""
    cdef Py_ssize_t n_t = len(grads), t, i, B, R, C, total = 0, n_row = 0, n_col = 0
    cdef Py_ssize_t itemsize = 8 if f64 else 4
    if not cnp.PyArray_IS_C_CONTIGUOUS(args):
        raise ValueError("args: expected a C-contiguous array")
    if (shape.shape[0] != n_t or shape.shape[1] != 3 or bands.shape[1] != 5
            or blocks.shape[1] != 3 or slices.shape[1] != 2):
        raise ValueError("shape, bands, blocks, slices: expected (n_tensors, 3), (n, 5), "
                         "(n, 3), (n, 2) arrays")
    for operand in (rows, cols, rmeans):
        if len(operand) != n_t:
            raise ValueError(f"expected {n_t} arrays per operand, got {len(operand)}")
    # per tensor: g, row, col, rmean, its row partials and its column partials
    ptr_array = cnp.PyArray_EMPTY(2, [n_t, 6], cnp.NPY_INTP, 0)
    cdef Py_ssize_t[:, ::1] ptr = ptr_array
    for t in range(n_t):
        B, R, C = shape[t, 0], shape[t, 1], shape[t, 2]
        if B < 1 or R < 1 or C < 1 or B > PY_SSIZE_T_MAX // R // C // 8:
            raise ValueError(f"shape[{t}]: expected sizes >= 1 (empty tensors have no "
                             f"factors pass) of at most PY_SSIZE_T_MAX // 8 elements")
        ptr[t, 0] = <Py_ssize_t>_data(grads[t], B * R * C, itemsize, f"grads[{t}]")
        ptr[t, 1] = <Py_ssize_t>_data(rows[t], B * R, itemsize, f"rows[{t}]")
        ptr[t, 2] = <Py_ssize_t>_data(cols[t], B * C, itemsize, f"cols[{t}]")
        ptr[t, 3] = <Py_ssize_t>_data(rmeans[t], B, itemsize, f"rmeans[{t}]")
        ptr[t, 4], ptr[t, 5] = n_row, n_col  # offsets, until the scratch exists
        n_row += B * R * ((C + COLS - 1) // COLS)
        n_col += B * ((R + BAND - 1) // BAND) * C
        total += B * R * C
    for i in range(bands.shape[0]):
        t = bands[i, 0]
        if not (0 <= t < n_t and 0 <= bands[i, 1] < shape[t, 0]
                and 0 <= bands[i, 2] < (shape[t, 1] + BAND - 1) // BAND
                and 0 <= bands[i, 3] < bands[i, 4] <= (shape[t, 2] + COLS - 1) // COLS
                and bands[i, 4] - bands[i, 3] <= SEGMENT):
            raise ValueError(f"bands[{i}] is outside the tensors' shapes")
    for i in range(blocks.shape[0]):
        t = blocks[i, 0]
        if not (0 <= t < n_t and 0 <= blocks[i, 1] < shape[t, 0] and shape[t, 1] > BAND
                and 0 <= blocks[i, 2] < (shape[t, 2] + COLS - 1) // COLS):
            raise ValueError(f"blocks[{i}] is outside the tensors' shapes")
    for i in range(slices.shape[0]):
        t = slices[i, 0]
        if not (0 <= t < n_t and 0 <= slices[i, 1] < shape[t, 0]):
            raise ValueError(f"slices[{i}] is outside the tensors' shapes")
    rowparts = cnp.PyArray_EMPTY(1, [n_row], cnp.NPY_FLOAT64, 0)
    colparts = cnp.PyArray_EMPTY(1, [n_col], cnp.NPY_FLOAT64, 0)
    for t in range(n_t):
        ptr[t, 4] = <Py_ssize_t>(<double *>cnp.PyArray_DATA(rowparts) + ptr[t, 4])
        ptr[t, 5] = <Py_ssize_t>(<double *>cnp.PyArray_DATA(colparts) + ptr[t, 5])
    _factors(shape, ptr, bands, blocks, slices, f64, cnp.PyArray_DATA(args),
             max(1, min(n_threads, total // MIN_PER_THREAD)))


cdef void _factors(const cnp.int64_t[:, ::1] shape, const Py_ssize_t[:, ::1] ptr,
                   const cnp.int64_t[:, ::1] bands, const cnp.int64_t[:, ::1] blocks,
                   const cnp.int64_t[:, ::1] slices, bint f64, const void *args,
                   int n_threads) noexcept:
    cdef Py_ssize_t i, t, b, R, C, rp, cp
    with nogil:
        for i in prange(bands.shape[0], num_threads=n_threads, schedule='guided'):
            t, b = bands[i, 0], bands[i, 1]
            R, C = shape[t, 1], shape[t, 2]
            rp = b * R * ((C + COLS - 1) // COLS)
            cp = b * ((R + BAND - 1) // BAND) * C
            if f64:
                fo_cpu_adafactor_band_f64(<double *>ptr[t, 0] + b * R * C,
                                          <double *>ptr[t, 2] + b * C,
                                          <double *>ptr[t, 4] + rp, <double *>ptr[t, 5] + cp,
                                          R, C, bands[i, 2], bands[i, 3], bands[i, 4], args)
            else:
                fo_cpu_adafactor_band_f32(<float *>ptr[t, 0] + b * R * C,
                                          <float *>ptr[t, 2] + b * C,
                                          <double *>ptr[t, 4] + rp, <double *>ptr[t, 5] + cp,
                                          R, C, bands[i, 2], bands[i, 3], bands[i, 4], args)
        for i in prange(blocks.shape[0], num_threads=n_threads, schedule='guided'):
            t, b = blocks[i, 0], blocks[i, 1]
            R, C = shape[t, 1], shape[t, 2]
            cp = b * ((R + BAND - 1) // BAND) * C
            if f64:
                fo_cpu_adafactor_cols_f64(<double *>ptr[t, 2] + b * C, <double *>ptr[t, 5] + cp,
                                          R, C, blocks[i, 2], args)
            else:
                fo_cpu_adafactor_cols_f32(<float *>ptr[t, 2] + b * C, <double *>ptr[t, 5] + cp,
                                          R, C, blocks[i, 2], args)
        for i in prange(slices.shape[0], num_threads=n_threads, schedule='guided'):
            t, b = slices[i, 0], slices[i, 1]
            R, C = shape[t, 1], shape[t, 2]
            rp = b * R * ((C + COLS - 1) // COLS)
            if f64:
                fo_cpu_adafactor_rows_f64(<double *>ptr[t, 1] + b * R, <double *>ptr[t, 3] + b,
                                          <double *>ptr[t, 4] + rp, R, C, args)
            else:
                fo_cpu_adafactor_rows_f32(<float *>ptr[t, 1] + b * R, <float *>ptr[t, 3] + b,
                                          <double *>ptr[t, 4] + rp, R, C, args)
