"""The reference math that the NumPy reference and the Numba backend share, written once:
Philox-4x32-10 (fastopt/random.h) and the polynomials of the logarithm, the sine and
cosine and the inverse normal CDF that the C and CUDA code evaluate (fastopt/random.h).

Every function here uses only +, -, *, / and integer operations on its arguments, so the
same code runs on NumPy arrays (the reference, vectorized) and on scalars inside Numba
kernels (compiled with ``njit``), with the same result bit for bit. What the two write
differently (taking a double's exponent, picking a quadrant or a branch of the inverse CDF)
stays in each backend.
"""

import numpy as np

M32 = np.uint64(0xFFFFFFFF)
PHILOX_M0, PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # the round multipliers
PHILOX_W0, PHILOX_W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # the key's Weyl steps
SHIFT32 = np.uint64(32)

# fo_log: ln x = e ln 2 + 2 atanh(s), s = (m - 1) / (m + 1), m in [sqrt(1/2), sqrt(2));
# 2 atanh(s) = t + t z P(z) with t = 2 s, z = s^2, P's coefficients 1 / (2k + 1), k = 1..10;
# ln 2 split into a high and a low part
SQRT_HALF = 0.7071067811865476
LOG_COEFFICIENTS = tuple(1 / (2 * k + 1) for k in range(1, 11))
LN2_HI, LN2_LO = 0.6931471803691238, 1.9082149292705877e-10

# sin(a) = a + a z S(z) and cos(a) = 1 + z C(z), z = a^2, |a| <= pi / 4 (Taylor's
# coefficients, from degree 0 of S and C)
SIN_COEFFICIENTS = (-0.16666666666666666, 0.008333333333333333, -0.0001984126984126984,
                    2.7557319223985893e-06, -2.505210838544172e-08, 1.6059043836821613e-10,
                    -7.647163731819816e-13, 2.8114572543455206e-15)
COS_COEFFICIENTS = (-0.5, 0.041666666666666664, -0.001388888888888889, 2.48015873015873e-05,
                    -2.755731922398589e-07, 2.08767569878681e-09, -1.1470745597729725e-11,
                    4.779477332387385e-14)
HALF_PI = 1.5707963267948966

# Acklam's inverse normal CDF: the central rational function of z = (p - 1/2)^2 (times
# p - 1/2), used for NDTRI_LOW <= p <= 1 - NDTRI_LOW, and the tails' rational function of
# t = sqrt(-2 ln p) (coefficients from degree 0)
NDTRI_LOW = 0.02425
NDTRI_CENTRAL_NUM = (2.506628277459239e+00, -3.066479806614716e+01, 1.383577518672690e+02,
                     -2.759285104469687e+02, 2.209460984245205e+02, -3.969683028665376e+01)
NDTRI_CENTRAL_DEN = (1.0, -1.328068155288572e+01, 6.680131188771972e+01,
                     -1.556989798598866e+02, 1.615858368580409e+02, -5.447609879822406e+01)
NDTRI_TAIL_NUM = (2.938163982698783e+00, 4.374664141464968e+00, -2.549732539343734e+00,
                  -2.400758277161838e+00, -3.223964580411365e-01, -7.784894002430293e-03)
NDTRI_TAIL_DEN = (1.0, 3.754408661907416e+00, 2.445134137142996e+00, 3.224671290700398e-01,
                  7.784695709041462e-03)


def philox_rounds(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 of counter (c0, c1, c2, c3) and key (k0, k1), all uint64 holding
    32-bit words (arrays or scalars): the four output words."""
    for _ in range(10):
        p0, p1 = c0 * PHILOX_M0, c2 * PHILOX_M1
        c0, c1, c2, c3 = ((p1 >> SHIFT32) ^ c1 ^ k0, p1 & M32,
                          (p0 >> SHIFT32) ^ c3 ^ k1, p0 & M32)
        k0, k1 = (k0 + PHILOX_W0) & M32, (k1 + PHILOX_W1) & M32
    return c0, c1, c2, c3


def horner(z, coefficients):
    """The polynomial with `coefficients` (from degree 0) at z, highest degree first:
    c0 + z (c1 + z (c2 + ...))."""
    n = len(coefficients)
    acc = coefficients[n - 1]
    for k in range(n - 2, -1, -1):
        acc = coefficients[k] + z * acc
    return acc


def log_reduced(m, e):
    """ln(m 2^e) for m in [sqrt(1/2), sqrt(2)) and e an integer-valued double."""
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    t = s + s
    return e * LN2_HI + ((t + t * (z * horner(z, LOG_COEFFICIENTS))) + e * LN2_LO)


def sin_cos_reduced(a):
    """(sin a, cos a) for |a| <= pi / 4."""
    z = a * a
    return a + a * (z * horner(z, SIN_COEFFICIENTS)), 1.0 + z * horner(z, COS_COEFFICIENTS)


def ndtri_central(p):
    """The inverse normal CDF at p, for NDTRI_LOW <= p <= 1 - NDTRI_LOW."""
    r = p - 0.5
    z = r * r
    return horner(z, NDTRI_CENTRAL_NUM) * r / horner(z, NDTRI_CENTRAL_DEN)


def ndtri_tail(t):
    """The inverse normal CDF's lower tail at p, given t = sqrt(-2 ln p)."""
    return horner(t, NDTRI_TAIL_NUM) / horner(t, NDTRI_TAIL_DEN)
