/*
 * fastopt/wnorm.h - weight normalization (Salimans & Kingma 2016) as torch's
 * _weight_norm: w = v * (g / ||v||), the norm over every dim but `dim`.
 *
 * A weight is seen as (A, B, C): B = its size along `dim` (1 for dim=None), A the product
 * of the dims before it, C of those after. Slice sums s[b] = sum over a, c of x * y (x = y
 * = v for the norm; grad_w and v for the backward) are float64 and in a fixed order: each
 * row (a, b) is cut into chunks of FO_CHUNK elements, a chunk's products are summed in
 * FO_NORM_LANES lanes like a norm chunk (fastopt/reduce.h); for chunk k, the rows' chunk
 * sums are added in a order into the partial P[k][b]; the host adds the partials in k order.
 * The host turns the sums into per-slice factors (in the weight's dtype), and the
 * elementwise passes below apply them:
 *   forward   w = k1[b] * v                       k1 = g / ||v||
 *   backward  grad_v = k1[b] * (grad_w - v * k3[b])  k1 = g / ||v||, k3 = (grad_w . v) / ||v||^2
 * (torch's order of operations); grad_g = (grad_w . v) / ||v|| stays on the host.
 */
#ifndef FASTOPT_WNORM_H
#define FASTOPT_WNORM_H

#include "fastopt/reduce.h"

#define FO_DEFINE_WNORM(T, SFX, SQRT, FABS)                                                     \
    FO_HD double fo_dot_term_##SFX(T x, T y) { return (double)x * (double)y; }            \
    FO_HD T fo_wnorm_scale_##SFX(T v, T k1) { return k1 * v; }                            \
    FO_HD T fo_wnorm_grad_##SFX(T v, T gw, T k1, T k3) { return k1 * (gw - v * k3); }
FO_DEFINE_FOR_REALS(FO_DEFINE_WNORM)
#undef FO_DEFINE_WNORM

#endif /* FASTOPT_WNORM_H */
