"""Constants that every backend must share for bit-identical results, with their one home
here. Each mirrors a constant of the C or CUDA sources (named in C_NAMES);
tests/test_kernels.py checks that they agree.

- CHUNK: elements per chunk of the norm partials and the reductions' fixed order
- LANES: float64 lanes of a chunk's norm sum (element i goes to lane i % LANES)
- COLS: columns per block of Adafactor's factored row sums
- BAND: rows per band of Adafactor's factored column sums
- SEGMENT: the most column blocks of a work item of Adafactor's factors pass on the CPU
- DIGIT_BITS: bits of the magnitude select's first digit (fastopt.prune)
- TILE: Philox groups per tile of the random fills (fastopt.init)
- KD_BLOCK: logits per partial sum of the distillation rows
- KD_ROWS: rows per CUDA block of the distillation kernel
- PRUNE_THREADS: threads per CUDA block of the magnitude select
- MIN_PER_THREAD: elements per thread below which a step uses fewer threads
- UNIFORM, NORMAL, TRUNC_NORMAL, BITS: the random fills' kinds (FO_RANDOM_*), and
  PER_GROUP: the values each Philox group gives, per (kind, dtype)
"""

CHUNK = 16384
LANES = 16
COLS = 512
BAND = 64
SEGMENT = 16
DIGIT_BITS = 16
TILE = 16
KD_BLOCK = 512
KD_ROWS = 8
PRUNE_THREADS = 256
MIN_PER_THREAD = 32768
UNIFORM, NORMAL, TRUNC_NORMAL, BITS = 0, 1, 2, 3
PER_GROUP = {
    (UNIFORM, "float32"): 4,
    (UNIFORM, "float64"): 2,
    (NORMAL, "float32"): 4,
    (NORMAL, "float64"): 2,
    (TRUNC_NORMAL, "float32"): 4,
    (TRUNC_NORMAL, "float64"): 2,
    (BITS, "uint32"): 4,
}

# the distillation's exponentials (kernels/include/fastopt/distill.h), which the NumPy
# reference, the Numba loops and the CUDA emulation's checks share

# log2 e and ln 2, the doubles nearest (FO_LOG2E, FO_LN2)
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453

# fo_exp2_neg's constants per dtype: the rounding constant 1.5 2^(mantissa bits), the input
# below which the result is 0, then the polynomial's coefficients of 2^f from degree 0
# (float32: a minimax fit, evaluated with fma; float64: Taylor's, ln2^n / n!, without)
EXP2_CONSTANTS = {
    "float32": (
        12582912.0,
        -125.0,
        1.0,
        6.931471825e-01,
        2.402264774e-01,
        5.550332367e-02,
        9.618436918e-03,
        1.339887502e-03,
        1.535336196e-04,
    ),
    "float64": (
        6755399441055744.0,
        -1021.0,
        1.0,
        0.6931471805599453,
        0.24022650695910072,
        0.05550410866482158,
        0.009618129107628477,
        0.0013333558146428443,
        0.0001540353039338161,
        1.5252733804059841e-05,
        1.321548679014431e-06,
        1.01780860092397e-07,
        7.054911620801123e-09,
        4.4455382718708116e-10,
        2.5678435993488206e-11,
        1.3691488853904128e-12,
    ),
}


# temperatures at which the cross entropy's exponentials 2^uc are es^T, by this many
# squarings (fastopt/distill.h)
CE_SQUARES = {2.0: 1, 4.0: 2, 8.0: 3}

# name here -> (source file under kernels/, its name there)
C_NAMES = {
    "CHUNK": ("include/fastopt/reduce.h", "FO_CHUNK"),
    "LANES": ("include/fastopt/reduce.h", "FO_NORM_LANES"),
    "COLS": ("include/fastopt/reduce.h", "FO_COLS"),
    "BAND": ("include/fastopt/reduce.h", "FO_BAND"),
    "SEGMENT": ("cpu/factored_loops.h", "FO_SEGMENT"),
    "DIGIT_BITS": ("include/fastopt/prune.h", "FO_DIGIT_BITS"),
    "TILE": ("include/fastopt/random.h", "FO_TILE"),
    "KD_BLOCK": ("include/fastopt/distill.h", "FO_KD_BLOCK"),
    "KD_ROWS": ("cuda/distill.cu", "FO_KD_ROWS"),
    "PRUNE_THREADS": ("cuda/prune.cu", "FO_PRUNE_THREADS"),
    "MIN_PER_THREAD": ("cpu/_plan.pxi", "MIN_PER_THREAD"),
    "UNIFORM": ("include/fastopt/random.h", "FO_RANDOM_UNIFORM"),
    "NORMAL": ("include/fastopt/random.h", "FO_RANDOM_NORMAL"),
    "TRUNC_NORMAL": ("include/fastopt/random.h", "FO_RANDOM_TRUNC_NORMAL"),
    "BITS": ("include/fastopt/random.h", "FO_RANDOM_BITS"),
}
