"""Host scalars -> the bytes of a kernel's fo_<rule>_args struct (fastopt/optim.h), shared
by the Cython and CuPy backends, whose kernels read the very same struct."""

import numpy as np


def pack(dtype, scalars):
    """The bytes of an fo_<rule>_args struct: the real fields as `dtype`, then the flags as
    C ints, in struct order (the order of `scalars`, floats before flags), zero-padded to a
    multiple of 8 bytes so that copying the whole struct never reads past the buffer."""
    dtype = np.dtype(dtype)
    floats = [v for v in scalars.values() if not isinstance(v, bool)]
    flags = [v for v in scalars.values() if isinstance(v, bool)]
    size = len(floats) * dtype.itemsize + len(flags) * 4
    buf = np.zeros(size + -size % 8, np.uint8)
    buf[:len(floats) * dtype.itemsize].view(dtype)[:] = floats
    buf[len(floats) * dtype.itemsize:size].view(np.int32)[:] = flags
    return buf


def random_args(reals, seed, stream):
    """The 72 bytes of a fo_random_args struct (fastopt/random.h): r0..r6, then the key
    (seed's low and high 32 bits), the stream and padding."""
    buf = np.zeros(9, np.float64)
    buf[:7] = reals
    buf[7:].view(np.uint32)[:] = [seed & 0xFFFFFFFF, seed >> 32, stream, 0]
    return buf
