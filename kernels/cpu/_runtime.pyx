# cython: language_level=3, boundscheck=False, wraparound=False
"""What the CPU build can do, and cheap access to array addresses for the Numba backend."""

cimport numpy as cnp
cimport openmp

cnp.import_array()

cdef extern from *:
    """
    #if defined(__AVX512F__)
    #define FO_SIMD "AVX-512"
    #elif defined(__AVX2__)
    #define FO_SIMD "AVX2"
    #elif defined(__AVX__)
    #define FO_SIMD "AVX"
    #elif defined(__SSE2__)
    #define FO_SIMD "SSE2"
    #elif defined(__ARM_NEON)
    #define FO_SIMD "NEON"
    #else
    #define FO_SIMD "none"
    #endif
    """
    const char *FO_SIMD

cdef extern from "chunks.h":
    const char *FO_CLONES


def openmp_max_threads():
    """OpenMP's default team size in this process (OMP_NUM_THREADS or the core count)."""
    return openmp.omp_get_max_threads()


def compiled_simd():
    """The widest vector extension the CPU loops were compiled for."""
    return FO_SIMD.decode()


def multiversion():
    """The instruction sets the chunk functions are cloned for (picked at load time)."""
    return FO_CLONES.decode()


def data_pointers(tuple operands, Py_ssize_t itemsize, Py_ssize_t n_aux=0):
    """(addresses, sizes) of equally long lists of C-contiguous ndarrays: an int64 table
    [tensor, operand] of data addresses, and each tensor's element count.

    About 30x cheaper than `a.ctypes.data` per array; the Numba kernels read through it.
    Like the Cython driver, it checks sizes, itemsize and contiguity for memory safety; the
    last `n_aux` operands are per-tensor auxiliaries of any size (see _plan.pxi).
    """
    cdef Py_ssize_t n_ops = len(operands), n_t = len(operands[0]), t, op, size
    cdef cnp.npy_intp dims[2]
    dims[0] = n_t
    dims[1] = n_ops
    cdef cnp.ndarray ptrs = cnp.PyArray_EMPTY(2, dims, cnp.NPY_INT64, 0)
    cdef cnp.ndarray sizes = cnp.PyArray_EMPTY(1, dims, cnp.NPY_INT64, 0)
    cdef cnp.int64_t *pp = <cnp.int64_t *>cnp.PyArray_DATA(ptrs)
    cdef cnp.int64_t *ps = <cnp.int64_t *>cnp.PyArray_DATA(sizes)
    cdef cnp.ndarray a
    for op in range(n_ops):
        if len(<list?>operands[op]) != n_t:
            raise ValueError(f"operand {op} has {len(operands[op])} arrays, expected {n_t}")
    for t in range(n_t):
        size = cnp.PyArray_SIZE(<cnp.ndarray?>(<list>operands[0])[t])
        ps[t] = size
        for op in range(n_ops):
            a = <cnp.ndarray?>(<list>operands[op])[t]
            if op >= n_ops - n_aux:
                if cnp.PyArray_SIZE(a) == 0 or not cnp.PyArray_IS_C_CONTIGUOUS(a):
                    raise ValueError(f"operand {op}, tensor {t}: expected a C-contiguous, "
                                     f"non-empty array")
            elif (cnp.PyArray_SIZE(a) != size or cnp.PyArray_ITEMSIZE(a) != itemsize
                    or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
                raise ValueError(f"operand {op}, tensor {t}: expected a C-contiguous array "
                                 f"of {size} elements of {itemsize} bytes")
            pp[t * n_ops + op] = <cnp.int64_t>cnp.PyArray_DATA(a)
    return ptrs, sizes


def first_read_overlap(const cnp.int64_t[::1] los, const cnp.int64_t[::1] his, list arrays,
                       const cnp.int64_t[::1] allowed):
    """Index of the first of `arrays` (C-contiguous ndarrays a call only reads) whose bytes
    overlap one of the spans [los[j], his[j]) it writes (sorted, disjoint), other than
    span allowed[k] where array k is exactly that span (a gradient that is its own
    parameter); -1 if none. The C form of fastopt._interop.WrittenSpans._search."""
    cdef Py_ssize_t k, j, lo_j, hi_j, mid, n = los.shape[0]
    cdef cnp.int64_t lo, hi
    cdef cnp.ndarray a
    if allowed.shape[0] != len(arrays):
        raise ValueError(f"allowed has {allowed.shape[0]} entries for {len(arrays)} arrays")
    for k in range(len(arrays)):
        a = <cnp.ndarray?>arrays[k]
        if cnp.PyArray_SIZE(a) == 0:
            continue
        if not cnp.PyArray_IS_C_CONTIGUOUS(a):
            raise ValueError(f"array {k} is not C-contiguous")
        lo = <cnp.int64_t>cnp.PyArray_DATA(a)
        hi = lo + cnp.PyArray_NBYTES(a)
        lo_j, hi_j = 0, n  # j: the number of spans that start before hi
        while lo_j < hi_j:
            mid = (lo_j + hi_j) // 2
            if los[mid] < hi:
                lo_j = mid + 1
            else:
                hi_j = mid
        j = lo_j
        while j > 0 and his[j - 1] > lo:
            j -= 1
            if not (j == allowed[k] and los[j] == lo and his[j] == hi):
                return k
    return -1


def steady_grads(groups, tuple kept_groups, list grads, list expect, states, dict floats=None,
                 bint leaf=False):
    """The gradients of a step that can run as the previous one did (its plan kept: see
    fastopt.optim._base.Optimizer._steady_grads), in the order of the stepped parameters;
    None if anything the plan was made from changed, or a gradient is not of the kind the
    plan took (the step then plans anew, checking everything and naming what is wrong).
    Raises nothing.

    `groups`: the param groups, a list that must hold the `kept_groups` (the same dicts,
    in order). `expect`: one entry per parameter, flattened over groups: None where the
    plan skips the parameter (its gradient must be None), else a tuple whose first six
    items are (param, shape, dtype, grad dtype, flat index, state): the parameter the same
    object; ``states[flat index]`` (`states` a dict) that state, unchanged since it was
    checked (its ``checked`` attribute true).

    NumPy parameters (`floats` None): each still a C-contiguous, aligned and writable
    ndarray of that shape and dtype (the dtype object); its gradient an ndarray (not a
    subclass) of the parameter's shape and of the grad dtype object, C-contiguous. About
    0.05 us per parameter.

    torch CPU parameters (`floats`: {torch float32: False, torch float64: True}): entries
    end with (view, token), token (data_ptr, shape, stride, dtype) of the tensor when it
    was checked, which it still matches (and does not require grad, unless `leaf`); its
    gradient the common torch CPU tensor (_interop._plain_cpu_torch), whose NumPy view is
    returned: the checks of the Python loop, in its order, with less interpreter work
    (about 1.2 us per parameter instead of 2, most of it torch's attribute calls)."""
    cdef Py_ssize_t n = len(expect), flat = 0, gi
    cdef list out = []
    cdef tuple item
    if (type(groups) is not list or type(states) is not dict or len(grads) != n
            or len(<list>groups) != len(kept_groups)):
        return None
    try:
        for gi in range(len(kept_groups)):
            group = (<list>groups)[gi]
            if group is not kept_groups[gi]:
                return None
            params = (<dict>group).get("params")
            if type(params) is not list:
                return None
            for q in <list>params:
                if flat == n:
                    return None
                entry = expect[flat]
                g = grads[flat]
                flat += 1
                if entry is None:
                    if g is not None:
                        return None
                    continue
                item = <tuple>entry
                state = (<dict>states).get(item[4])
                if q is not item[0] or state is not item[5] or not state.checked:
                    return None
                g = _numpy_grad(q, g, item) if floats is None else _torch_grad(
                    q, g, item, floats, leaf)
                if g is None:
                    return None
                out.append(g)
    except (AttributeError, RuntimeError, TypeError):  # torch's attributes
        return None
    if flat != n:
        return None
    return out


cdef object _numpy_grad(q, gq, tuple item):
    """Gradient `gq` of NumPy parameter `q` if both are as steady_grads takes them, else
    None."""
    cdef cnp.ndarray p, g
    cdef tuple shape = <tuple>item[1]
    cdef Py_ssize_t d, ndim
    if not cnp.PyArray_CheckExact(q) or not cnp.PyArray_CheckExact(gq):
        return None
    p = <cnp.ndarray>q
    g = <cnp.ndarray>gq
    if (<object>cnp.PyArray_DESCR(p) is not item[2]
            or <object>cnp.PyArray_DESCR(g) is not item[3]
            or not cnp.PyArray_ISCARRAY(p) or not cnp.PyArray_IS_C_CONTIGUOUS(g)):
        return None
    ndim = cnp.PyArray_NDIM(p)
    if ndim != len(shape) or cnp.PyArray_NDIM(g) != ndim:
        return None
    for d in range(ndim):
        if cnp.PyArray_DIMS(p)[d] != <cnp.npy_intp>shape[d] \
                or cnp.PyArray_DIMS(g)[d] != cnp.PyArray_DIMS(p)[d]:
            return None
    return g


cdef object _torch_grad(q, g, tuple item, dict floats, bint leaf):
    """The NumPy view of gradient `g` of torch parameter `q` if both are as steady_grads
    takes them, else None (torch's attribute calls may raise)."""
    cdef tuple token = <tuple>item[7], shape
    if ((not leaf and q.requires_grad) or q.data_ptr() != token[0] or q.shape != token[1]
            or q.stride() != token[2] or q.dtype is not token[3]):
        return None
    # the gradient: a plain contiguous float CPU tensor of the kept kind
    if type(g).__module__ != "torch" or g.requires_grad or not g.is_cpu:
        return None
    f64 = floats.get(g.dtype)
    if f64 is None or not g.is_contiguous() or g.is_neg() or g.is_conj():
        return None
    shape = tuple(g.shape)
    ga = None if 0 in shape else tensor_view(g, f64, shape)
    if ga is None:
        ga = g.numpy()
    if <object>cnp.PyArray_DESCR(<cnp.ndarray>ga) is not item[3] or shape != item[1]:
        return None
    return ga


def tensor_view(x, bint f64, tuple shape):
    """A NumPy array over the memory of torch tensor `x`, which it keeps alive: x.numpy()
    without torch's checks, for a float32 (`f64` false) or float64 CPU tensor the caller
    found contiguous, of `shape` (its ``x.shape``) (0.2 us instead of 1); None where this
    does not apply (more than 32 dims, no data pointer), for the caller to take
    x.numpy(). Not for an array kept after the call that made it: a later
    ``x.data = ...`` moves the tensor but not the array."""
    cdef cnp.npy_intp dims[32]
    cdef Py_ssize_t nd = len(shape), d
    if nd > 32:
        return None
    for d in range(nd):
        dims[d] = shape[d]
    cdef size_t ptr = x.data_ptr()
    if ptr == 0:
        return None
    cdef cnp.ndarray arr = cnp.PyArray_SimpleNewFromData(
        nd, dims, cnp.NPY_FLOAT64 if f64 else cnp.NPY_FLOAT32, <void *>ptr)
    cnp.set_array_base(arr, x)
    return arr
