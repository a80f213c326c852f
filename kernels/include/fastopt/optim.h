/*
 * fastopt/optim.h - one element's update for each optimizer rule, shared by the Cython
 * loops (kernels/cpu) and the CUDA kernels (kernels/cuda).
 *
 * Every value that is the same for all elements (learning rate, bias corrections, decay
 * factors) is computed once per step on the host, in float64, and arrives here cast to the
 * parameter's dtype in an fo_<rule>_args_<sfx> struct. The operation order follows
 * torch.optim's single-tensor (for-loop) implementation, so that float64 agrees with torch
 * to rounding and float32 to a few ulps per step.
 */
#ifndef FASTOPT_OPTIM_H
#define FASTOPT_OPTIM_H

#include "fastopt/common.h"

/*
 * Every rule starts from the same gradient prologue: clip_grad_value_ (clamp to
 * [-clip, clip]; clip = inf when off; NaN passes through, as torch.clamp), then the
 * clip_grad_norm_ coefficient and maximize folded into one factor, gscale = +-coefficient.
 */
#define FO_DEFINE_GRAD(T, SFX, SQRT)                                                      \
    FO_HD T fo_grad_##SFX(T g, T clip, T gscale)                                          \
    {                                                                                     \
        g = g < -clip ? -clip : (g > clip ? clip : g);                                    \
        return gscale * g;                                                                \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_GRAD)
#undef FO_DEFINE_GRAD

/*
 * SGD (torch.optim.SGD):
 *   g <- gscale * clamp(g, -clip, clip) (+ wd * p)
 *   b <- g                              at the first step with momentum
 *   b <- momentum * b + (1 - dampening) * g   afterwards
 *   d <- g + momentum * b (nesterov) | b (momentum) | g (no momentum)
 *   p <- p - lr * d
 */
#define FO_DEFINE_SGD(T, SFX, SQRT)                                                       \
    typedef struct {                                                                      \
        T clip;           /* clip_grad_value_ bound, inf when off */                      \
        T gscale;         /* clip_grad_norm_ coefficient, negated when maximizing */      \
        T weight_decay;   /* L2 coefficient added to the gradient */                      \
        T momentum;                                                                       \
        T one_minus_dampening;                                                            \
        T neg_lr;                                                                         \
        int first;        /* momentum buffer starts as a copy of the gradient */          \
        int nesterov;                                                                     \
    } fo_sgd_args_##SFX;                                                                  \
                                                                                          \
    FO_HD T fo_sgd_##SFX(T p, T g, const fo_sgd_args_##SFX *a)                            \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        if (a->weight_decay != (T)0) g = g + a->weight_decay * p;                         \
        return p + a->neg_lr * g;                                                         \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_sgd_momentum_##SFX(T p, T g, T *buf, const fo_sgd_args_##SFX *a)           \
    {                                                                                     \
        T b;                                                                              \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        if (a->weight_decay != (T)0) g = g + a->weight_decay * p;                         \
        b = a->first ? g : *buf * a->momentum + a->one_minus_dampening * g;               \
        *buf = b;                                                                         \
        if (a->nesterov) b = g + a->momentum * b;                                         \
        return p + a->neg_lr * b;                                                         \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_SGD)
#undef FO_DEFINE_SGD

/*
 * Adam / AdamW (torch.optim.Adam, torch.optim.AdamW), step t:
 *   g <- gscale * clamp(g, -clip, clip) (+ wd * p for Adam's L2 form)
 *   p <- p * (1 - lr * wd) for AdamW
 *   m <- lerp(m, g, 1 - beta1)
 *   v <- beta2 * v + (1 - beta2) * g * g
 *   vhat <- max(vhat, v) with amsgrad, else v
 *   p <- p - (lr / (1 - beta1^t)) * m / (sqrt(vhat) / sqrt(1 - beta2^t) + eps)
 */
#define FO_DEFINE_ADAM(T, SFX, SQRT)                                                      \
    typedef struct {                                                                      \
        T clip;                                                                           \
        T gscale;                                                                         \
        T weight_decay;   /* L2 coefficient (Adam); 0 for AdamW */                        \
        T decay;          /* 1 - lr * wd (AdamW); 1 for Adam */                           \
        T one_minus_beta1;                                                                \
        T beta2;                                                                          \
        T one_minus_beta2;                                                                \
        T bias_correction2_sqrt;                                                          \
        T eps;                                                                            \
        T neg_step_size;  /* -lr / (1 - beta1^t) */                                       \
        int lerp_hi;      /* 1 - beta1 >= 0.5: torch's second lerp formula */             \
    } fo_adam_args_##SFX;                                                                 \
                                                                                          \
    /* the moments; returns the gradient after maximize and weight decay */               \
    FO_HD T fo_adam_moments_##SFX(T *p, T g, T *m, T *v, const fo_adam_args_##SFX *a)     \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        *p = *p * a->decay;                                                               \
        if (a->weight_decay != (T)0) g = g + a->weight_decay * *p;                        \
        *m = fo_lerp_##SFX(*m, g, a->one_minus_beta1, a->lerp_hi);                        \
        *v = *v * a->beta2 + a->one_minus_beta2 * g * g;                                  \
        return g;                                                                         \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_adam_apply_##SFX(T p, T m, T vhat, const fo_adam_args_##SFX *a)            \
    {                                                                                     \
        T denom = SQRT(vhat) / a->bias_correction2_sqrt + a->eps;                         \
        return p + a->neg_step_size * m / denom;                                          \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_adam_##SFX(T p, T g, T *m, T *v, const fo_adam_args_##SFX *a)              \
    {                                                                                     \
        fo_adam_moments_##SFX(&p, g, m, v, a);                                            \
        return fo_adam_apply_##SFX(p, *m, *v, a);                                         \
    }                                                                                     \
                                                                                          \
    /* torch.maximum semantics: NaN in either operand propagates */                       \
    FO_HD T fo_adam_amsgrad_##SFX(T p, T g, T *m, T *v, T *vmax,                          \
                                  const fo_adam_args_##SFX *a)                            \
    {                                                                                     \
        T old, vhat;                                                                      \
        fo_adam_moments_##SFX(&p, g, m, v, a);                                            \
        old = *vmax;                                                                      \
        vhat = (old > *v || old != old) ? old : *v;                                       \
        *vmax = vhat;                                                                     \
        return fo_adam_apply_##SFX(p, *m, vhat, a);                                       \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_ADAM)
#undef FO_DEFINE_ADAM

#endif /* FASTOPT_OPTIM_H */
