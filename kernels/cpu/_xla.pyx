# cython: language_level=3
"""XLA FFI custom-call handlers (xla_loops.h, xla_factored.h), handed to jax by
fastopt._jax_ffi.

The handlers speak XLA's FFI C interface through fastopt's own declarations
(fastopt/xla_ffi.h), so this module builds and imports without jax. Its only entry points
are the handlers' addresses, as the PyCapsules jax.ffi.register_ffi_target takes, and the
list of kernels they run.
"""

from cpython.pycapsule cimport PyCapsule_New

cdef extern from "xla_loops.h" nogil:
    const char *ELEMENTWISE_TARGET "FO_XLA_ELEMENTWISE_TARGET"
    ctypedef struct fo_xla_call_frame:
        pass
    ctypedef struct fo_xla_error:
        pass
    ctypedef struct fo_xla_kernel:
        const char *name
        int n_state
        int n_aux
    const fo_xla_kernel *fo_xla_kernels
    const fo_xla_kernel *fo_xla_counts
    fo_xla_error *fo_xla_elementwise(fo_xla_call_frame *call)

cdef extern from "xla_factored.h" nogil:
    const char *FACTORED_TARGET "FO_XLA_FACTORED_TARGET"
    fo_xla_error *fo_xla_factored(fo_xla_call_frame *call)


cdef dict _kernels(const fo_xla_kernel *k):
    found = {}
    while k.name != NULL:
        found[k.name.decode()] = k.n_state + k.n_aux
        k += 1
    return found


# the custom-call target of the elementwise handler
ELEMENTWISE = ELEMENTWISE_TARGET.decode()
# {kernel name: number of state operands} of every kernel the elementwise handler runs: the
# elementwise kernels of fastopt/optim.h (FO_ELEMENTWISE_KERNELS), the cautious steps
# (FO_CAUTIOUS_KERNELS) and scaled_apply (Lamb's apply pass), whose last operand is the
# tensor's factor
KERNELS = _kernels(fo_xla_kernels)
# the same of the cautious count kernels (FO_CAUTION_COUNTS) it counts with (count=1)
COUNTS = _kernels(fo_xla_counts)
# the custom-call target of optax's Adafactor passes (xla_factored.h)
FACTORED = FACTORED_TARGET.decode()


def targets():
    """{target name: PyCapsule of its XLA FFI handler (a bare function pointer, as
    jax.ffi.pycapsule makes them)} for jax.ffi.register_ffi_target(name, capsule,
    platform="cpu", api_version=1)."""
    return {ELEMENTWISE: PyCapsule_New(<void *>fo_xla_elementwise, NULL, NULL),
            FACTORED: PyCapsule_New(<void *>fo_xla_factored, NULL, NULL)}
