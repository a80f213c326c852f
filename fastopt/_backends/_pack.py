"""The bytes of fastopt/random.h's fo_random_args struct, shared by the Cython and CuPy
backends, whose kernels read the very same struct."""

import numpy as np


def random_args(reals, seed, stream):
    """The 72 bytes of a fo_random_args struct (fastopt/random.h): r0..r6, then the key
    (seed's low and high 32 bits), the stream and padding."""
    buf = np.zeros(9, np.float64)
    buf[:7] = reals
    buf[7:].view(np.uint32)[:] = [seed & 0xFFFFFFFF, seed >> 32, stream, 0]
    return buf
