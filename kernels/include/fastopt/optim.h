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
#define FO_DEFINE_GRAD(T, SFX, SQRT, FABS)                                                \
    /* torch.clamp(x, -c, c): NaN passes */                                               \
    FO_HD T fo_clamp_##SFX(T x, T c) { return x < -c ? -c : (x > c ? c : x); }            \
    FO_HD T fo_grad_##SFX(T g, T clip, T gscale) { return gscale * fo_clamp_##SFX(g, clip); }
FO_DEFINE_FOR_REALS(FO_DEFINE_GRAD)
#undef FO_DEFINE_GRAD

/* torch.maximum: NaN in either operand propagates */
#define FO_DEFINE_MAXIMUM(T, SFX, SQRT, FABS)                                             \
    FO_HD T fo_maximum_##SFX(T a, T b) { return (a != a || a > b) ? a : b; }
FO_DEFINE_FOR_REALS(FO_DEFINE_MAXIMUM)
#undef FO_DEFINE_MAXIMUM

/*
 * The cautious option (C-Optim, Liang et al. 2024, as timm's caution=True), on Adam/AdamW,
 * ADOPT, Lion and AdEMAMix. With u the direction the rule steps along (the new first moment,
 * Lion's sign, AdEMAMix's numerator) and g the gradient after the prologue and L2 decay:
 *   K = 1[u g > 0];  k = 1 / max(mean(K), 1e-3) per tensor (the host's, from the count pass)
 *   the step uses u K k in place of u; the stored moment stays u.
 * The count pass (<rule>_caution kernels) writes K to the "param out" slot, a scratch buffer
 * whose per-tensor sum the host takes; the apply kernels (<rule>_cautious) read k as a
 * per-tensor operand after their state.
 */
#define FO_DEFINE_CAUTION(T, SFX, SQRT, FABS)                                             \
    FO_HD T fo_agrees_##SFX(T u, T g) { return u * g > (T)0 ? (T)1 : (T)0; }              \
    FO_HD T fo_cautious_##SFX(T u, T g, T k) { return u * (u * g > (T)0 ? k : (T)0); }
FO_DEFINE_FOR_REALS(FO_DEFINE_CAUTION)
#undef FO_DEFINE_CAUTION

/*
 * SGD (torch.optim.SGD):
 *   g <- gscale * clamp(g, -clip, clip) (+ wd * p)
 *   b <- g                              at the first step with momentum
 *   b <- momentum * b + (1 - dampening) * g   afterwards
 *   d <- g + momentum * b (nesterov) | b (momentum) | g (no momentum)
 *   p <- p - lr * d
 */
#define FO_DEFINE_SGD(T, SFX, SQRT, FABS)                                                       \
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
/* Adam, NAdam and RAdam share their first fields and these moment updates */
#define FO_ADAM_MOMENTS(SFX, p, g, m, v, a)                                               \
    fo_adam_moments_##SFX(p, g, m, v, (a)->clip, (a)->gscale, (a)->weight_decay,          \
                          (a)->decay, (a)->one_minus_beta1, (a)->beta2,                   \
                          (a)->one_minus_beta2, (a)->lerp_hi)

#define FO_DEFINE_ADAM(T, SFX, SQRT, FABS)                                                      \
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
    /* the gradient after the prologue and L2 decay; p decayed (AdamW) */                \
    FO_HD T fo_adam_grad_##SFX(T *p, T g, T clip, T gscale, T weight_decay, T decay)      \
    {                                                                                     \
        g = fo_grad_##SFX(g, clip, gscale);                                               \
        *p = *p * decay;                                                                  \
        if (weight_decay != (T)0) g = g + weight_decay * *p;                              \
        return g;                                                                         \
    }                                                                                     \
                                                                                          \
    /* the moments; returns the gradient after the prologue and weight decay */          \
    FO_HD T fo_adam_moments_##SFX(T *p, T g, T *m, T *v, T clip, T gscale,                \
                                  T weight_decay, T decay, T one_minus_beta1, T beta2,    \
                                  T one_minus_beta2, int lerp_hi)                         \
    {                                                                                     \
        g = fo_adam_grad_##SFX(p, g, clip, gscale, weight_decay, decay);                  \
        *m = fo_lerp_##SFX(*m, g, one_minus_beta1, lerp_hi);                              \
        *v = *v * beta2 + one_minus_beta2 * g * g;                                        \
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
        FO_ADAM_MOMENTS(SFX, &p, g, m, v, a);                                             \
        return fo_adam_apply_##SFX(p, *m, *v, a);                                         \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_adam_amsgrad_##SFX(T p, T g, T *m, T *v, T *vmax,                          \
                                  const fo_adam_args_##SFX *a)                            \
    {                                                                                     \
        T vhat;                                                                           \
        FO_ADAM_MOMENTS(SFX, &p, g, m, v, a);                                             \
        vhat = fo_maximum_##SFX(*vmax, *v);                                               \
        *vmax = vhat;                                                                     \
        return fo_adam_apply_##SFX(p, *m, vhat, a);                                       \
    }                                                                                     \
                                                                                          \
    /* cautious: the count pass (K of the new m; nothing written) and the step */         \
    FO_HD T fo_adam_caution_##SFX(T p, T g, T *m, const fo_adam_args_##SFX *a)            \
    {                                                                                     \
        g = fo_adam_grad_##SFX(&p, g, a->clip, a->gscale, a->weight_decay, a->decay);     \
        return fo_agrees_##SFX(fo_lerp_##SFX(*m, g, a->one_minus_beta1, a->lerp_hi), g);  \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_adam_cautious_##SFX(T p, T g, T *m, T *v, T k,                             \
                                   const fo_adam_args_##SFX *a)                           \
    {                                                                                     \
        g = FO_ADAM_MOMENTS(SFX, &p, g, m, v, a);                                         \
        return fo_adam_apply_##SFX(p, fo_cautious_##SFX(*m, g, k), *v, a);               \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_adam_amsgrad_cautious_##SFX(T p, T g, T *m, T *v, T *vmax, T k,            \
                                           const fo_adam_args_##SFX *a)                   \
    {                                                                                     \
        T vhat;                                                                           \
        g = FO_ADAM_MOMENTS(SFX, &p, g, m, v, a);                                         \
        vhat = fo_maximum_##SFX(*vmax, *v);                                               \
        *vmax = vhat;                                                                     \
        return fo_adam_apply_##SFX(p, fo_cautious_##SFX(*m, g, k), vhat, a);              \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_ADAM)
#undef FO_DEFINE_ADAM

/*
 * Adagrad (torch.optim.Adagrad), step t:
 *   s <- s + g^2;  p <- p - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s + eps_root) + eps)
 * torch's has eps_root = 0; optax.adagrad's eps is eps_root (under the square root), eps 0.
 */
#define FO_DEFINE_ADAGRAD(T, SFX, SQRT, FABS)                                             \
    typedef struct {                                                                      \
        T clip, gscale, weight_decay;                                                     \
        T neg_clr;        /* -lr / (1 + (t - 1) lr_decay) */                              \
        T eps, eps_root;                                                                  \
    } fo_adagrad_args_##SFX;                                                              \
                                                                                          \
    FO_HD T fo_adagrad_##SFX(T p, T g, T *sum, const fo_adagrad_args_##SFX *a)            \
    {                                                                                     \
        T s;                                                                              \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        if (a->weight_decay != (T)0) g = g + a->weight_decay * p;                         \
        s = *sum + g * g;                                                                 \
        *sum = s;                                                                         \
        return p + a->neg_clr * g / (SQRT(s + a->eps_root) + a->eps);                     \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_ADAGRAD)
#undef FO_DEFINE_ADAGRAD

/*
 * RMSprop (torch.optim.RMSprop):
 *   v <- alpha v + (1 - alpha) g^2
 *   centered: gbar <- lerp(gbar, g, 1 - alpha);  r = sqrt(v - gbar^2 + eps_root) + eps,
 *             else sqrt(v + eps_root) + eps
 *   momentum > 0: b <- momentum b + trace_scale g / r;  p <- p + neg_lr b
 *   else p <- p + neg_lr g / r
 * torch's: eps_root = 0, trace_scale = 1, neg_lr = -lr. optax.rmsprop's: eps under the
 * square root by default (eps_root), and its trace after the learning rate (trace_scale =
 * -lr, neg_lr = 1 with momentum).
 * One element function per set of state arrays (rmsprop, _centered, _momentum,
 * _centered_momentum), each calling fo_rmsprop_any with its flags as constants, so that
 * every loop is branch-free.
 */
#define FO_DEFINE_RMSPROP(T, SFX, SQRT, FABS)                                             \
    typedef struct {                                                                      \
        T clip, gscale, weight_decay;                                                     \
        T alpha, one_minus_alpha, eps, momentum, neg_lr, eps_root, trace_scale;           \
        int lerp_hi;                                                                      \
    } fo_rmsprop_args_##SFX;                                                              \
                                                                                          \
    FO_HD T fo_rmsprop_any_##SFX(T p, T g, T *sq, T *gavg, T *buf, int centered,          \
                                 int use_momentum, const fo_rmsprop_args_##SFX *a)        \
    {                                                                                     \
        T s, r;                                                                           \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        if (a->weight_decay != (T)0) g = g + a->weight_decay * p;                         \
        s = *sq * a->alpha + a->one_minus_alpha * g * g;                                  \
        *sq = s;                                                                          \
        if (centered) {                                                                   \
            T m = fo_lerp_##SFX(*gavg, g, a->one_minus_alpha, a->lerp_hi);                \
            *gavg = m;                                                                    \
            r = SQRT(s + (T)(-1) * m * m + a->eps_root);                                  \
        } else {                                                                          \
            r = SQRT(s + a->eps_root);                                                    \
        }                                                                                 \
        r = r + a->eps;                                                                   \
        if (use_momentum) {                                                               \
            T b = *buf * a->momentum + g / r * a->trace_scale;                            \
            *buf = b;                                                                     \
            return p + a->neg_lr * b;                                                     \
        }                                                                                 \
        return p + a->neg_lr * g / r;                                                     \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_rmsprop_##SFX(T p, T g, T *sq, const fo_rmsprop_args_##SFX *a)             \
    {                                                                                     \
        return fo_rmsprop_any_##SFX(p, g, sq, NULL, NULL, 0, 0, a);                       \
    }                                                                                     \
    FO_HD T fo_rmsprop_centered_##SFX(T p, T g, T *sq, T *gavg,                           \
                                      const fo_rmsprop_args_##SFX *a)                     \
    {                                                                                     \
        return fo_rmsprop_any_##SFX(p, g, sq, gavg, NULL, 1, 0, a);                       \
    }                                                                                     \
    FO_HD T fo_rmsprop_momentum_##SFX(T p, T g, T *sq, T *buf,                            \
                                      const fo_rmsprop_args_##SFX *a)                     \
    {                                                                                     \
        return fo_rmsprop_any_##SFX(p, g, sq, NULL, buf, 0, 1, a);                        \
    }                                                                                     \
    FO_HD T fo_rmsprop_centered_momentum_##SFX(T p, T g, T *sq, T *gavg, T *buf,          \
                                               const fo_rmsprop_args_##SFX *a)            \
    {                                                                                     \
        return fo_rmsprop_any_##SFX(p, g, sq, gavg, buf, 1, 1, a);                        \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_RMSPROP)
#undef FO_DEFINE_RMSPROP

/*
 * Adadelta (torch.optim.Adadelta):
 *   v <- rho v + (1 - rho) g^2;  d = sqrt(u + eps) / sqrt(v + eps) * g
 *   u <- rho u + (1 - rho) d^2;  p <- p - lr d
 */
#define FO_DEFINE_ADADELTA(T, SFX, SQRT, FABS)                                            \
    typedef struct {                                                                      \
        T clip, gscale, weight_decay;                                                     \
        T rho, one_minus_rho, eps, neg_lr;                                                \
    } fo_adadelta_args_##SFX;                                                             \
                                                                                          \
    FO_HD T fo_adadelta_##SFX(T p, T g, T *sq, T *acc, const fo_adadelta_args_##SFX *a)   \
    {                                                                                     \
        T s, d;                                                                           \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        if (a->weight_decay != (T)0) g = g + a->weight_decay * p;                         \
        s = *sq * a->rho + a->one_minus_rho * g * g;                                      \
        *sq = s;                                                                          \
        d = SQRT(*acc + a->eps) / SQRT(s + a->eps) * g;                                   \
        *acc = *acc * a->rho + a->one_minus_rho * d * d;                                  \
        return p + a->neg_lr * d;                                                         \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_ADADELTA)
#undef FO_DEFINE_ADADELTA

/*
 * Adamax (torch.optim.Adamax), step t:
 *   m <- lerp(m, g, 1 - beta1);  u <- max(beta2 u, |g| + eps)
 *   p <- p - lr / (1 - beta1^t) * m / u
 */
#define FO_DEFINE_ADAMAX(T, SFX, SQRT, FABS)                                              \
    typedef struct {                                                                      \
        T clip, gscale, weight_decay;                                                     \
        T one_minus_beta1, beta2, eps, neg_clr;                                           \
        int lerp_hi;                                                                      \
    } fo_adamax_args_##SFX;                                                               \
                                                                                          \
    FO_HD T fo_adamax_##SFX(T p, T g, T *m, T *u, const fo_adamax_args_##SFX *a)          \
    {                                                                                     \
        T mm, uu;                                                                         \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        if (a->weight_decay != (T)0) g = g + a->weight_decay * p;                         \
        mm = fo_lerp_##SFX(*m, g, a->one_minus_beta1, a->lerp_hi);                        \
        uu = fo_maximum_##SFX(*u * a->beta2, FABS(g) + a->eps);                           \
        *m = mm;                                                                          \
        *u = uu;                                                                          \
        return p + a->neg_clr * mm / uu;                                                  \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_ADAMAX)
#undef FO_DEFINE_ADAMAX

/*
 * NAdam (torch.optim.NAdam), step t, mu_t = beta1 (1 - 0.5 * 0.96^(t psi)):
 *   m, v as Adam;  d = sqrt(v / (1 - beta2^t)) + eps
 *   p <- p - lr (1 - mu_t) / (1 - prod mu_1..t) g / d
 *          - lr mu_{t+1} / (1 - prod mu_1..t+1) m / d
 */
#define FO_DEFINE_NADAM(T, SFX, SQRT, FABS)                                               \
    typedef struct {                                                                      \
        T clip, gscale, weight_decay, decay;                                              \
        T one_minus_beta1, beta2, one_minus_beta2, bias_correction2, eps;                 \
        T grad_coef, avg_coef;                                                            \
        int lerp_hi;                                                                      \
    } fo_nadam_args_##SFX;                                                                \
                                                                                          \
    FO_HD T fo_nadam_##SFX(T p, T g, T *m, T *v, const fo_nadam_args_##SFX *a)            \
    {                                                                                     \
        T d;                                                                              \
        g = FO_ADAM_MOMENTS(SFX, &p, g, m, v, a);                                         \
        d = SQRT(*v / a->bias_correction2) + a->eps;                                      \
        p = p + a->grad_coef * g / d;                                                     \
        return p + a->avg_coef * *m / d;                                                  \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_NADAM)
#undef FO_DEFINE_NADAM

/*
 * RAdam (torch.optim.RAdam), step t: m, v as Adam;  mhat = m / (1 - beta1^t)
 *   rho_t > 5:  p <- p - mhat lr sqrt(1 - beta2^t) / (sqrt(v) + eps) r_t   (r_t: rectification)
 *   otherwise:  p <- p - mhat lr
 */
#define FO_DEFINE_RADAM(T, SFX, SQRT, FABS)                                               \
    typedef struct {                                                                      \
        T clip, gscale, weight_decay, decay;                                              \
        T one_minus_beta1, beta2, one_minus_beta2, bias_correction1, lr;                  \
        T bias_correction2_sqrt, eps, rect;                                               \
        int lerp_hi, rectify;                                                             \
    } fo_radam_args_##SFX;                                                                \
                                                                                          \
    FO_HD T fo_radam_##SFX(T p, T g, T *m, T *v, const fo_radam_args_##SFX *a)            \
    {                                                                                     \
        T u;                                                                              \
        FO_ADAM_MOMENTS(SFX, &p, g, m, v, a);                                             \
        u = *m / a->bias_correction1 * a->lr;                                             \
        if (a->rectify) u = u * (a->bias_correction2_sqrt / (SQRT(*v) + a->eps)) * a->rect; \
        return p + (T)(-1) * u;                                                           \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_RADAM)
#undef FO_DEFINE_RADAM

/*
 * ADOPT (Taniguchi et al. 2024, as the authors' torch-adopt ADOPT), step t:
 *   g <- gscale * clamp(g, -clip, clip) (+ wd * p for the L2 form)
 *   t = 1:  v <- v + g^2, and nothing else (p and m stay)
 *   t > 1:  p <- p + (-lr wd) p             (decoupled weight decay)
 *           n = clamp(g / max(sqrt(v), eps), -c, c),  c = clip_lambda(t - 1) (inf: none)
 *           m <- lerp(m, n, 1 - beta1);  p <- p - lr m
 *           v <- beta2 v + (1 - beta2) g^2   (after the parameter, from the old v above)
 */
#define FO_DEFINE_ADOPT(T, SFX, SQRT, FABS)                                               \
    typedef struct {                                                                      \
        T clip, gscale;                                                                   \
        T weight_decay;   /* L2 coefficient; 0 when decoupled */                          \
        T neg_lr_wd;      /* -lr * wd, decoupled */                                       \
        T eps;                                                                            \
        T clamp;          /* c = clip_lambda(t - 1), inf for none */                      \
        T one_minus_beta1, neg_lr, beta2, one_minus_beta2;                                \
        int lerp_hi;      /* 1 - beta1 >= 0.5: torch's second lerp formula */             \
        int first;        /* step 1: only v <- v + g^2 */                                 \
        int decoupled;    /* decoupled weight decay (wd != 0) */                          \
    } fo_adopt_args_##SFX;                                                                \
                                                                                          \
    /* the step; with `cautious`, m K k (per-tensor k) in place of m. Both results     \
       computed and one kept, m and v stored on every path: a store behind the           \
       first-step flag kept GCC from vectorizing the loop (4x slower) */                  \
    FO_HD T fo_adopt_any_##SFX(T p, T g, T *m, T *v, T k, int cautious,                   \
                               const fo_adopt_args_##SFX *a)                              \
    {                                                                                     \
        T n, mm, q;                                                                       \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        if (a->weight_decay != (T)0) g = g + a->weight_decay * p;                         \
        q = a->decoupled ? p + a->neg_lr_wd * p : p;                                      \
        n = fo_clamp_##SFX(g / fo_maximum_##SFX(SQRT(*v), a->eps), a->clamp);              \
        mm = fo_lerp_##SFX(*m, n, a->one_minus_beta1, a->lerp_hi);                        \
        q = q + a->neg_lr * (cautious ? fo_cautious_##SFX(mm, g, k) : mm);                \
        *m = a->first ? *m : mm;                                                          \
        *v = a->first ? *v + g * g : *v * a->beta2 + a->one_minus_beta2 * g * g;          \
        return a->first ? p : q;                                                          \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_adopt_##SFX(T p, T g, T *m, T *v, const fo_adopt_args_##SFX *a)            \
    {                                                                                     \
        return fo_adopt_any_##SFX(p, g, m, v, (T)1, 0, a);                                \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_adopt_cautious_##SFX(T p, T g, T *m, T *v, T k,                            \
                                    const fo_adopt_args_##SFX *a)                         \
    {                                                                                     \
        return fo_adopt_any_##SFX(p, g, m, v, k, 1, a);                                   \
    }                                                                                     \
                                                                                          \
    /* the count pass: K of the new m (unused at the first step) */                       \
    FO_HD T fo_adopt_caution_##SFX(T p, T g, T *m, T *v, const fo_adopt_args_##SFX *a)    \
    {                                                                                     \
        T n;                                                                              \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        if (a->weight_decay != (T)0) g = g + a->weight_decay * p;                         \
        n = fo_clamp_##SFX(g / fo_maximum_##SFX(SQRT(*v), a->eps), a->clamp);              \
        return fo_agrees_##SFX(fo_lerp_##SFX(*m, n, a->one_minus_beta1, a->lerp_hi), g);  \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_ADOPT)
#undef FO_DEFINE_ADOPT

/*
 * Lion (Chen et al. 2023, as optax.lion):
 *   u = sign((1 - beta1) g + beta1 m) + wd p;  m <- (1 - beta2) g + beta2 m;  p <- p - lr u
 */
#define FO_DEFINE_LION(T, SFX, SQRT, FABS)                                                \
    typedef struct {                                                                      \
        T clip, gscale;                                                                   \
        T beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, neg_lr;           \
    } fo_lion_args_##SFX;                                                                 \
                                                                                          \
    /* sign((1 - beta1) g + beta1 m): 0 and NaN stay */                                 \
    FO_HD T fo_lion_sign_##SFX(T g, T m, const fo_lion_args_##SFX *a)                     \
    {                                                                                     \
        const T c = a->one_minus_beta1 * g + a->beta1 * m;                                \
        return c > (T)0 ? (T)1 : (c < (T)0 ? (T)(-1) : c);                                \
    }                                                                                     \
                                                                                          \
    /* the step; with `cautious`, the sign times K k (per-tensor k) */                    \
    FO_HD T fo_lion_any_##SFX(T p, T g, T *m, T k, int cautious,                          \
                              const fo_lion_args_##SFX *a)                                \
    {                                                                                     \
        T u;                                                                              \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        u = fo_lion_sign_##SFX(g, *m, a);                                                 \
        if (cautious) u = fo_cautious_##SFX(u, g, k);                                     \
        *m = a->one_minus_beta2 * g + a->beta2 * *m;                                      \
        return p + a->neg_lr * (u + a->weight_decay * p);                                 \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_lion_##SFX(T p, T g, T *m, const fo_lion_args_##SFX *a)                    \
    {                                                                                     \
        return fo_lion_any_##SFX(p, g, m, (T)1, 0, a);                                    \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_lion_cautious_##SFX(T p, T g, T *m, T k, const fo_lion_args_##SFX *a)      \
    {                                                                                     \
        return fo_lion_any_##SFX(p, g, m, k, 1, a);                                       \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_lion_caution_##SFX(T p, T g, T *m, const fo_lion_args_##SFX *a)            \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        return fo_agrees_##SFX(fo_lion_sign_##SFX(g, *m, a), g);                          \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_LION)
#undef FO_DEFINE_LION

/*
 * Rprop (torch.optim.Rprop, its single-tensor path), with torch.sign (0 for zeros and NaN):
 *   f = etaplus, etaminus or 1 as sign(g * prev) is 1, -1 or 0
 *   step_size <- clamp(step_size * f, step_size_min, step_size_max)
 *   g <- 0 where f == etaminus;  p <- p + (-1 * sign(g)) * step_size;  prev <- g
 */
#define FO_DEFINE_RPROP(T, SFX, SQRT, FABS)                                               \
    typedef struct {                                                                      \
        T clip, gscale;                                                                   \
        T etaminus, etaplus, step_size_min, step_size_max;                                \
    } fo_rprop_args_##SFX;                                                                \
                                                                                          \
    FO_HD T fo_rprop_##SFX(T p, T g, T *prev, T *step_size, const fo_rprop_args_##SFX *a) \
    {                                                                                     \
        T t, f, h;                                                                        \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        t = g * *prev;                                                                    \
        f = t > (T)0 ? a->etaplus : (t < (T)0 ? a->etaminus : (T)1);                      \
        h = *step_size * f; /* torch.clamp: NaN passes */                                 \
        h = h < a->step_size_min ? a->step_size_min                                       \
                                 : (h > a->step_size_max ? a->step_size_max : h);         \
        *step_size = h;                                                                   \
        if (f == a->etaminus) g = (T)0;                                                   \
        *prev = g;                                                                        \
        return p + ((T)(-1) * (g > (T)0 ? (T)1 : (g < (T)0 ? (T)(-1) : (T)0))) * h;       \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_RPROP)
#undef FO_DEFINE_RPROP

/*
 * ASGD (torch.optim.ASGD, its single-tensor path); eta and mu are the step's host scalars:
 *   g <- g + wd * p;  p <- p * (1 - lambd * eta);  p <- p + (-eta) * g
 *   ax <- ax + (p - ax) * mu   (ax <- p while mu is 1)
 */
#define FO_DEFINE_ASGD(T, SFX, SQRT, FABS)                                                \
    typedef struct {                                                                      \
        T clip, gscale;                                                                   \
        T weight_decay, decay, neg_eta, mu;                                               \
        int average;      /* mu != 1: average into ax, else copy the parameter */         \
    } fo_asgd_args_##SFX;                                                                 \
                                                                                          \
    FO_HD T fo_asgd_##SFX(T p, T g, T *ax, const fo_asgd_args_##SFX *a)                   \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        if (a->weight_decay != (T)0) g = g + a->weight_decay * p;                         \
        p = p * a->decay;                                                                 \
        p = p + a->neg_eta * g;                                                           \
        *ax = a->average ? *ax + (p - *ax) * a->mu : p;                                   \
        return p;                                                                         \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_ASGD)
#undef FO_DEFINE_ASGD

/*
 * AdEMAMix (Pagliardini et al. 2024, as the authors' apple/ml-ademamix pytorch/ademamix.py):
 *   m1 <- beta1 m1 + (1 - beta1) g   (m1 = g, no state, when beta1 = 0)
 *   m2 <- beta3 m2 + (1 - beta3) g;  v <- beta2 v + (1 - beta2) g g
 *   u = (m1 / bc1 + alpha m2) / (sqrt(v) / sqrt(bc2) + eps) + wd p;  p <- p + (-lr) u
 */
#define FO_DEFINE_ADEMAMIX(T, SFX, SQRT, FABS)                                            \
    typedef struct {                                                                      \
        T clip, gscale;                                                                   \
        T beta1, one_minus_beta1, beta3, one_minus_beta3, beta2, one_minus_beta2;         \
        T bias_correction1, bias_correction2_sqrt, alpha, eps, weight_decay, neg_lr;      \
    } fo_ademamix_args_##SFX;                                                             \
                                                                                          \
    FO_HD T fo_ademamix_fast_##SFX(T m1, T g, const fo_ademamix_args_##SFX *a)            \
    {                                                                                     \
        return m1 * a->beta1 + a->one_minus_beta1 * g;                                    \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_ademamix_slow_##SFX(T m2, T g, const fo_ademamix_args_##SFX *a)            \
    {                                                                                     \
        return m2 * a->beta3 + a->one_minus_beta3 * g;                                    \
    }                                                                                     \
                                                                                          \
    /* the numerator m1 / bc1 + alpha m2 */                                               \
    FO_HD T fo_ademamix_mix_##SFX(T m1, T m2, const fo_ademamix_args_##SFX *a)            \
    {                                                                                     \
        return m1 / a->bias_correction1 + a->alpha * m2;                                  \
    }                                                                                     \
                                                                                          \
    /* the step after m1; with `cautious`, the numerator times K k (per-tensor k) */      \
    FO_HD T fo_ademamix_tail_##SFX(T p, T g, T m1, T *m2, T *v, T k, int cautious,        \
                                   const fo_ademamix_args_##SFX *a)                       \
    {                                                                                     \
        T u;                                                                              \
        *m2 = fo_ademamix_slow_##SFX(*m2, g, a);                                          \
        *v = *v * a->beta2 + a->one_minus_beta2 * g * g;                                  \
        u = fo_ademamix_mix_##SFX(m1, *m2, a);                                            \
        if (cautious) u = fo_cautious_##SFX(u, g, k);                                     \
        u = u / (SQRT(*v) / a->bias_correction2_sqrt + a->eps);                           \
        u = u + a->weight_decay * p;                                                      \
        return p + a->neg_lr * u;                                                         \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_ademamix_##SFX(T p, T g, T *m1, T *m2, T *v,                               \
                              const fo_ademamix_args_##SFX *a)                            \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        *m1 = fo_ademamix_fast_##SFX(*m1, g, a);                                          \
        return fo_ademamix_tail_##SFX(p, g, *m1, m2, v, (T)1, 0, a);                      \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_ademamix_nofast_##SFX(T p, T g, T *m2, T *v,                               \
                                     const fo_ademamix_args_##SFX *a)                     \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        return fo_ademamix_tail_##SFX(p, g, g, m2, v, (T)1, 0, a);                        \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_ademamix_cautious_##SFX(T p, T g, T *m1, T *m2, T *v, T k,                 \
                                       const fo_ademamix_args_##SFX *a)                   \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        *m1 = fo_ademamix_fast_##SFX(*m1, g, a);                                          \
        return fo_ademamix_tail_##SFX(p, g, *m1, m2, v, k, 1, a);                         \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_ademamix_nofast_cautious_##SFX(T p, T g, T *m2, T *v, T k,                 \
                                              const fo_ademamix_args_##SFX *a)            \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        return fo_ademamix_tail_##SFX(p, g, g, m2, v, k, 1, a);                           \
    }                                                                                     \
                                                                                          \
    /* the count passes: K of the new numerator */                                        \
    FO_HD T fo_ademamix_caution_##SFX(T p, T g, T *m1, T *m2,                             \
                                      const fo_ademamix_args_##SFX *a)                    \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        return fo_agrees_##SFX(fo_ademamix_mix_##SFX(fo_ademamix_fast_##SFX(*m1, g, a),   \
                                                     fo_ademamix_slow_##SFX(*m2, g, a),   \
                                                     a), g);                              \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_ademamix_nofast_caution_##SFX(T p, T g, T *m2,                             \
                                             const fo_ademamix_args_##SFX *a)             \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        return fo_agrees_##SFX(fo_ademamix_mix_##SFX(g, fo_ademamix_slow_##SFX(*m2, g, a), \
                                                     a), g);                              \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_ADEMAMIX)
#undef FO_DEFINE_ADEMAMIX

/*
 * Adan (Xie et al. 2022, as the authors' sail-sg/Adan adan.py, its single-tensor path); the
 * state keeps -g_prev (at the first step -g: the difference is 0, NaN for inf):
 *   d = g - g_prev;  m <- b1 m + (1 - b1) g;  diff <- b2 diff + (1 - b2) d
 *   d <- b2 d + g;   n <- b3 n + (1 - b3) d d;  den = sqrt(n) / sqrt(bc3) + eps
 *   p <- p decay + ((-lr / bc1) m) / den + ((-lr b2 / bc2) diff) / den, then p / prox
 *   with decay = 1, prox = 1 + lr wd (no_prox: decay = 1 - lr wd, prox = 1: a factor of 1
 *   changes no bit, and the loop has no branch to keep it from vectorizing)
 *   -g_prev <- 0 + (-1) g
 */
#define FO_DEFINE_ADAN(T, SFX, SQRT, FABS)                                                \
    typedef struct {                                                                      \
        T clip, gscale;                                                                   \
        T beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3;         \
        T bias_correction3_sqrt, eps, neg_step_size, neg_step_size_diff, decay, prox;     \
        int first;        /* the previous gradient is this one */                         \
    } fo_adan_args_##SFX;                                                                 \
                                                                                          \
    FO_HD T fo_adan_##SFX(T p, T g, T *m, T *n, T *diff, T *neg_prev,                     \
                          const fo_adan_args_##SFX *a)                                    \
    {                                                                                     \
        T d, den, prev = *neg_prev;                                                       \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        d = (a->first ? -g : prev) + g;                                                   \
        *m = *m * a->beta1 + a->one_minus_beta1 * g;                                      \
        *diff = *diff * a->beta2 + a->one_minus_beta2 * d;                                \
        d = d * a->beta2 + g;                                                             \
        *n = *n * a->beta3 + a->one_minus_beta3 * d * d;                                  \
        den = SQRT(*n) / a->bias_correction3_sqrt + a->eps;                               \
        p = p * a->decay;                                                                 \
        p = p + a->neg_step_size * *m / den;                                              \
        p = p + a->neg_step_size_diff * *diff / den;                                      \
        p = p / a->prox;                                                                  \
        *neg_prev = (T)0 + (T)(-1) * g;                                                   \
        return p;                                                                         \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_ADAN)
#undef FO_DEFINE_ADAN

/*
 * Schedule-Free AdamW and SGD (Defazio et al. 2024, as facebookresearch/schedule_free's
 * AdamWScheduleFree and SGDScheduleFree): the parameter holds y, the state z (and v for
 * AdamW); c (the weight of this step in the average) and lr_k (the warmed-up learning rate)
 * are the step's host scalars:
 *   AdamW only:  v <- b2 v + (1 - b2) g g;  g <- g / (sqrt(v / bc2) + eps)
 *   g <- g + wd y;  y <- lerp(y, z, c);  y <- y + (lr_k (b1 (1 - c) - 1)) g;  z <- z + (-lr_k) g
 */
#define FO_DEFINE_SCHEDULEFREE(T, SFX, SQRT, FABS)                                        \
    typedef struct {                                                                      \
        T clip, gscale, weight_decay, ckp1, y_coef, neg_lr;                               \
        int lerp_hi;      /* c >= 0.5: torch's second lerp formula */                     \
    } fo_sgd_schedulefree_args_##SFX;                                                     \
                                                                                          \
    typedef struct {                                                                      \
        T clip, gscale, weight_decay, ckp1, y_coef, neg_lr;                               \
        T beta2, one_minus_beta2, bias_correction2, eps;                                  \
        int lerp_hi;                                                                      \
    } fo_adamw_schedulefree_args_##SFX;                                                   \
                                                                                          \
    FO_HD T fo_schedulefree_tail_##SFX(T y, T g, T *z, T weight_decay, T ckp1, T y_coef,  \
                                       T neg_lr, int lerp_hi)                             \
    {                                                                                     \
        T zz = *z;                                                                        \
        if (weight_decay != (T)0) g = g + weight_decay * y;                               \
        y = fo_lerp_##SFX(y, zz, ckp1, lerp_hi);                                          \
        y = y + y_coef * g;                                                               \
        *z = zz + neg_lr * g;                                                             \
        return y;                                                                         \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_sgd_schedulefree_##SFX(T p, T g, T *z,                                     \
                                      const fo_sgd_schedulefree_args_##SFX *a)            \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        return fo_schedulefree_tail_##SFX(p, g, z, a->weight_decay, a->ckp1, a->y_coef,   \
                                          a->neg_lr, a->lerp_hi);                         \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_adamw_schedulefree_##SFX(T p, T g, T *z, T *v,                             \
                                        const fo_adamw_schedulefree_args_##SFX *a)        \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        *v = *v * a->beta2 + a->one_minus_beta2 * g * g;                                  \
        g = g / (SQRT(*v / a->bias_correction2) + a->eps);                                \
        return fo_schedulefree_tail_##SFX(p, g, z, a->weight_decay, a->ckp1, a->y_coef,   \
                                          a->neg_lr, a->lerp_hi);                         \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_SCHEDULEFREE)
#undef FO_DEFINE_SCHEDULEFREE

/*
 * Muon (torch.optim.Muon), its elementwise passes around the Newton-Schulz iteration (which
 * runs on the array library's BLAS):
 *   momentum pass:  B <- lerp(B, g, 1 - mu);  O = lerp(g, B, mu) (nesterov) | B, written out
 *   apply pass:     p <- p (1 - lr wd) + (-lr ratio) NS(O)  (fo_scaled_apply: scale 1)
 */
#define FO_DEFINE_MUON(T, SFX, SQRT, FABS)                                                \
    typedef struct {                                                                      \
        T clip, gscale, one_minus_momentum, momentum;                                     \
        int lerp_hi;      /* 1 - mu >= 0.5: torch's second lerp formula */                \
        int nesterov_hi;  /* mu >= 0.5: the same for the Nesterov lerp */                 \
        int nesterov;                                                                     \
    } fo_muon_args_##SFX;                                                                 \
                                                                                          \
    /* returns the update to orthogonalize; the momentum buffer updated */               \
    FO_HD T fo_muon_momentum_##SFX(T p, T g, T *buf, const fo_muon_args_##SFX *a)         \
    {                                                                                     \
        T b;                                                                              \
        (void)p;                                                                          \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        b = fo_lerp_##SFX(*buf, g, a->one_minus_momentum, a->lerp_hi);                    \
        *buf = b;                                                                         \
        return a->nesterov ? fo_lerp_##SFX(g, b, a->momentum, a->nesterov_hi) : b;        \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_MUON)
#undef FO_DEFINE_MUON

/*
 * Prodigy (Mishchenko & Defazio 2023, as konstmish/prodigy, prodigyopt 1.1.2), in two passes
 * with a reduction over every tensor between them (the host then updates d; lambda_c is the
 * coupled weight decay, 0 when decoupled):
 *   update pass:  g <- g + lambda_c p;  t = g (p0 - p), written out for the sum of g . (p0 - p)
 *                 m <- b1 m + (d (1 - b1)) g;  v <- b2 v + (d^2 (1 - b2)) g g
 *                 s <- b3 s + (d / d0 * dlr) g     (sum |s| reduced after the pass)
 *   apply pass:   p <- p + (-lambda dlr) p (decoupled);  p <- p + (-dlr) m / (sqrt(v) + d eps)
 *                 (without m, beta1 = 0: p <- p + (-dlr d) g / (sqrt(v) + d eps))
 * with dlr from the step's old d and d eps from its new one, as the reference computes them.
 * With moves 0 the apply pass returns p as it is: a step without progress (sum |s| = 0),
 * which the reference ends before its apply, where a caller cannot skip the pass on the
 * host (inside jax.jit, fastopt/jax.py; the array API skips it and passes 1).
 */
#define FO_DEFINE_PRODIGY(T, SFX, SQRT, FABS)                                             \
    typedef struct {                                                                      \
        T clip, gscale, weight_decay;                                                     \
        T beta1, m_coef, beta2, v_coef, beta3, s_coef;                                    \
        T neg_decay, d_eps, neg_dlr, neg_dlr_d;                                           \
        int moves;        /* 0: the apply pass leaves p as it is */                       \
    } fo_prodigy_args_##SFX;                                                              \
                                                                                          \
    FO_HD T fo_prodigy_grad_##SFX(T p, T g, const fo_prodigy_args_##SFX *a)               \
    {                                                                                     \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        return a->weight_decay != (T)0 ? g + a->weight_decay * p : g;                     \
    }                                                                                     \
                                                                                          \
    /* the update pass after the gradient: v and s updated; returns the dot's term */     \
    FO_HD T fo_prodigy_tail_##SFX(T p, T g, T *s, T p0, T *v,                             \
                                  const fo_prodigy_args_##SFX *a)                         \
    {                                                                                     \
        *v = *v * a->beta2 + a->v_coef * g * g;                                           \
        *s = *s * a->beta3 + a->s_coef * g;                                               \
        return g * (p0 - p);                                                              \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_prodigy_update_nom_##SFX(T p, T g, T *s, T *p0, T *v,                      \
                                        const fo_prodigy_args_##SFX *a)                   \
    {                                                                                     \
        return fo_prodigy_tail_##SFX(p, fo_prodigy_grad_##SFX(p, g, a), s, *p0, v, a);    \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_prodigy_update_##SFX(T p, T g, T *s, T *p0, T *m, T *v,                    \
                                    const fo_prodigy_args_##SFX *a)                       \
    {                                                                                     \
        g = fo_prodigy_grad_##SFX(p, g, a);                                               \
        *m = *m * a->beta1 + a->m_coef * g;                                               \
        return fo_prodigy_tail_##SFX(p, g, s, *p0, v, a);                                 \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_prodigy_apply_##SFX(T p, T g, T *m, T *v, const fo_prodigy_args_##SFX *a)  \
    {                                                                                     \
        const T denom = SQRT(*v) + a->d_eps;                                              \
        (void)g;                                                                          \
        if (!a->moves) return p;                                                          \
        if (a->neg_decay != (T)0) p = p + a->neg_decay * p;                               \
        return p + a->neg_dlr * (*m / denom);                                             \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_prodigy_apply_nom_##SFX(T p, T g, T *v, const fo_prodigy_args_##SFX *a)    \
    {                                                                                     \
        const T denom = SQRT(*v) + a->d_eps;                                              \
        if (!a->moves) return p;                                                          \
        g = fo_prodigy_grad_##SFX(p, g, a);                                               \
        if (a->neg_decay != (T)0) p = p + a->neg_decay * p;                               \
        return p + a->neg_dlr_d * (g / denom);                                            \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_PRODIGY)
#undef FO_DEFINE_PRODIGY

/*
 * Weight EMA (torch.optim.swa_utils.get_ema_multi_avg_fn): e <- lerp(e, p, 1 - decay), run
 * as an elementwise kernel with the average in the parameter slots and the parameter in the
 * gradient slot.
 */
#define FO_DEFINE_EMA(T, SFX, SQRT, FABS)                                                 \
    typedef struct {                                                                      \
        T weight;         /* 1 - decay */                                                 \
        int lerp_hi;                                                                      \
    } fo_ema_args_##SFX;                                                                  \
                                                                                          \
    FO_HD T fo_ema_##SFX(T e, T p, const fo_ema_args_##SFX *a)                            \
    {                                                                                     \
        return fo_lerp_##SFX(e, p, a->weight, a->lerp_hi);                                \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_EMA)
#undef FO_DEFINE_EMA

/*
 * Lamb (You et al. 2019, as optax.lamb), step t, in two passes with a per-tensor reduction
 * between them:
 *   update pass:  m <- (1 - beta1) g + beta1 m;  v <- (1 - beta2) g^2 + beta2 v
 *                 u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + wd p
 *   (host)        r = ||p|| / ||u|| per tensor, 1 when either norm is 0
 *   apply pass:   p <- p - lr (u r)            (fo_scaled_apply: decay 1, scale -lr)
 */
#define FO_DEFINE_LAMB(T, SFX, SQRT, FABS)                                                \
    typedef struct {                                                                      \
        T clip, gscale;                                                                   \
        T beta1, one_minus_beta1, beta2, one_minus_beta2;                                 \
        T bias_correction1, bias_correction2, eps, weight_decay;                          \
    } fo_lamb_args_##SFX;                                                                 \
                                                                                          \
    /* returns u; m and v updated */                                                      \
    FO_HD T fo_lamb_update_##SFX(T p, T g, T *m, T *v, const fo_lamb_args_##SFX *a)       \
    {                                                                                     \
        T mm, vv;                                                                         \
        g = fo_grad_##SFX(g, a->clip, a->gscale);                                         \
        mm = a->one_minus_beta1 * g + a->beta1 * *m;                                      \
        vv = a->one_minus_beta2 * (g * g) + a->beta2 * *v;                                \
        *m = mm;                                                                          \
        *v = vv;                                                                          \
        return mm / a->bias_correction1 / (SQRT(vv / a->bias_correction2) + a->eps)       \
               + a->weight_decay * p;                                                     \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_LAMB)
#undef FO_DEFINE_LAMB

/*
 * Adafactor (torch.optim.Adafactor), step t, w = t^beta2_decay. A parameter of 2+ dims is
 * B slices of R x C; each slice keeps a row factor r (R) and a column factor c (C):
 *   factors pass: r <- lerp(r, rowsum(g^2) / C, w);  c <- lerp(c, colsum(g^2) / R, w)
 *                 (sums in float64, in fastopt/reduce.h's factored order);
 *                 rmean = max(mean(r), eps1) per slice
 *   update pass:  u = 1 / sqrt(max(r_i c_j / rmean, eps1^2)) * g      (factored)
 *                 v <- lerp(v, g^2, w);  u = 1 / sqrt(max(v, eps1^2)) * g   (vectors)
 *   (host)        alpha = max(eps2, ||p|| / sqrt(n)) min(lr, 1 / sqrt(t));
 *                 k = -alpha / max(1, ||u|| / (sqrt(n) d)) per tensor
 *   apply pass:   p <- p (1 - lr wd) + u k     (fo_scaled_apply: scale 1)
 */
#define FO_DEFINE_ADAFACTOR(T, SFX, SQRT, FABS)                                           \
    typedef struct {                                                                      \
        T clip, gscale;                                                                   \
        T w;              /* t^beta2_decay */                                             \
        T eps1, eps1_sq;                                                                  \
        int lerp_hi;      /* |w| >= 0.5: torch's lerp formula */                          \
    } fo_adafactor_args_##SFX;                                                            \
                                                                                          \
    /* one term of the factor sums */                                                     \
    FO_HD double fo_adafactor_sq_##SFX(T g, const fo_adafactor_args_##SFX *a)             \
    {                                                                                     \
        const double x = (double)fo_grad_##SFX(g, a->clip, a->gscale);                   \
        return x * x;                                                                     \
    }                                                                                     \
                                                                                          \
    /* a factor moved toward the mean of its `count` squares summing to `sum` */          \
    FO_HD T fo_adafactor_factor_##SFX(T factor, double sum, double count,                 \
                                      const fo_adafactor_args_##SFX *a)                   \
    {                                                                                     \
        return fo_lerp_##SFX(factor, (T)(sum / count), a->w, a->lerp_hi);                 \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_adafactor_rmean_##SFX(double sum, double count,                            \
                                     const fo_adafactor_args_##SFX *a)                    \
    {                                                                                     \
        return fo_maximum_##SFX((T)(sum / count), a->eps1);                               \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_adafactor_factored_##SFX(T g, T row, T col, T rmean,                       \
                                        const fo_adafactor_args_##SFX *a)                 \
    {                                                                                     \
        const T v = fo_maximum_##SFX(row * col / rmean, a->eps1_sq);                      \
        return (T)1 / SQRT(v) * fo_grad_##SFX(g, a->clip, a->gscale);                     \
    }                                                                                     \
                                                                                          \
    FO_HD T fo_adafactor_vector_##SFX(T g, T *var, const fo_adafactor_args_##SFX *a)      \
    {                                                                                     \
        const T d = fo_grad_##SFX(g, a->clip, a->gscale);                                 \
        const T v = fo_lerp_##SFX(*var, d * d, a->w, a->lerp_hi);                         \
        *var = v;                                                                         \
        return (T)1 / SQRT(fo_maximum_##SFX(v, a->eps1_sq)) * d;                          \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_ADAFACTOR)
#undef FO_DEFINE_ADAFACTOR

/*
 * The apply pass of the rules that scale an update per tensor (Lamb, Adafactor):
 *   p <- p decay + scale (u k),   k the tensor's factor (an operand, one per tensor)
 */
#define FO_DEFINE_SCALED_APPLY(T, SFX, SQRT, FABS)                                        \
    typedef struct {                                                                      \
        T decay, scale;                                                                   \
    } fo_scaled_apply_args_##SFX;                                                         \
                                                                                          \
    FO_HD T fo_scaled_apply_##SFX(T p, T u, T k, const fo_scaled_apply_args_##SFX *a)     \
    {                                                                                     \
        return p * a->decay + a->scale * (u * k);                                         \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_SCALED_APPLY)
#undef FO_DEFINE_SCALED_APPLY

/*
 * The elementwise kernels: X(T, SFX, NAME, ARGS, N) for each, with N state arrays after the
 * gradient. The element function is fo_NAME_<sfx>(p, g, state pointers..., args) with args a
 * const fo_ARGS_args_<sfx> *; it returns the new parameter. kernels/cpu/optim_loops.h and
 * kernels/cuda/optim.cu make a loop over many tensors of each; fastopt/_rules.py lists the
 * same kernels with their state (tests/test_kernels.py checks that they agree).
 */
#define FO_ELEMENTWISE_KERNELS(X, T, SFX)                                                 \
    X(T, SFX, sgd, sgd, 0)                                                                \
    X(T, SFX, sgd_momentum, sgd, 1)                                                       \
    X(T, SFX, adam, adam, 2)                                                              \
    X(T, SFX, adam_amsgrad, adam, 3)                                                      \
    X(T, SFX, adagrad, adagrad, 1)                                                        \
    X(T, SFX, rmsprop, rmsprop, 1)                                                        \
    X(T, SFX, rmsprop_centered, rmsprop, 2)                                               \
    X(T, SFX, rmsprop_momentum, rmsprop, 2)                                               \
    X(T, SFX, rmsprop_centered_momentum, rmsprop, 3)                                      \
    X(T, SFX, adadelta, adadelta, 2)                                                      \
    X(T, SFX, adamax, adamax, 2)                                                          \
    X(T, SFX, nadam, nadam, 2)                                                            \
    X(T, SFX, radam, radam, 2)                                                            \
    X(T, SFX, adopt, adopt, 2)                                                            \
    X(T, SFX, lion, lion, 1)                                                              \
    X(T, SFX, lamb_update, lamb, 2)                                                       \
    X(T, SFX, rprop, rprop, 2)                                                            \
    X(T, SFX, asgd, asgd, 1)                                                              \
    X(T, SFX, ademamix, ademamix, 3)                                                      \
    X(T, SFX, ademamix_nofast, ademamix, 2)                                               \
    X(T, SFX, adan, adan, 4)                                                              \
    X(T, SFX, sgd_schedulefree, sgd_schedulefree, 1)                                      \
    X(T, SFX, adamw_schedulefree, adamw_schedulefree, 2)                                  \
    X(T, SFX, muon_momentum, muon, 1)                                                     \
    X(T, SFX, ema, ema, 0)                                                                \
    X(T, SFX, prodigy_update, prodigy, 4)                                                 \
    X(T, SFX, prodigy_update_nom, prodigy, 3)                                             \
    X(T, SFX, prodigy_apply, prodigy, 2)                                                  \
    X(T, SFX, prodigy_apply_nom, prodigy, 1)                                              \
    FO_CAUTION_COUNTS(X, T, SFX)

/*
 * The cautious steps: X(T, SFX, NAME, ARGS, N) as above, the element function taking the
 * tensor's factor k after the N state pointers (fo_NAME_<sfx>(p, g, state..., k, args)); the
 * loops read k from the operand after the state, one value per tensor.
 */
#define FO_CAUTIOUS_KERNELS(X, T, SFX)                                                    \
    X(T, SFX, adam_cautious, adam, 2)                                                     \
    X(T, SFX, adam_amsgrad_cautious, adam, 3)                                             \
    X(T, SFX, adopt_cautious, adopt, 2)                                                   \
    X(T, SFX, lion_cautious, lion, 1)                                                     \
    X(T, SFX, ademamix_cautious, ademamix, 3)                                             \
    X(T, SFX, ademamix_nofast_cautious, ademamix, 2)

/* The cautious count kernels, elementwise kernels of the list above (which expands this
   one); the CPU loops also sum their K per chunk in the pass, without writing it
   (kernels/cpu/optim_loops.h) */
#define FO_CAUTION_COUNTS(X, T, SFX)                                                      \
    X(T, SFX, adam_caution, adam, 1)                                                      \
    X(T, SFX, adopt_caution, adopt, 2)                                                    \
    X(T, SFX, lion_caution, lion, 1)                                                      \
    X(T, SFX, ademamix_caution, ademamix, 2)                                              \
    X(T, SFX, ademamix_nofast_caution, ademamix, 1)

#endif /* FASTOPT_OPTIM_H */
