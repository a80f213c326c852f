"""Constants that every backend must share for bit-identical results, with their one home
here. Each mirrors a constant of the C or CUDA sources (named in C_NAMES);
tests/test_kernels.py checks that they agree.

- CHUNK: elements per chunk of the norm partials and the reductions' fixed order
- LANES: float64 lanes of a chunk's norm sum (element i goes to lane i % LANES)
- COLS: columns per block of Adafactor's factored row sums
- DIGIT_BITS: bits of the magnitude select's first digit (fastopt.prune)
- TILE: Philox groups per tile of the random fills (fastopt.init)
- KD_BLOCK: logits per partial sum of the distillation rows
- KD_ROWS: rows per CUDA block of the distillation kernel
- PRUNE_THREADS: threads per CUDA block of the magnitude select
- MIN_PER_THREAD: elements per thread below which a step uses fewer threads
"""

CHUNK = 16384
LANES = 16
COLS = 512
DIGIT_BITS = 16
TILE = 16
KD_BLOCK = 512
KD_ROWS = 8
PRUNE_THREADS = 256
MIN_PER_THREAD = 32768

# name here -> (source file under kernels/, its name there)
C_NAMES = {
    "CHUNK": ("include/fastopt/reduce.h", "FO_CHUNK"),
    "LANES": ("include/fastopt/reduce.h", "FO_NORM_LANES"),
    "COLS": ("include/fastopt/reduce.h", "FO_COLS"),
    "DIGIT_BITS": ("include/fastopt/prune.h", "FO_DIGIT_BITS"),
    "TILE": ("include/fastopt/random.h", "FO_TILE"),
    "KD_BLOCK": ("include/fastopt/distill.h", "FO_KD_BLOCK"),
    "KD_ROWS": ("cuda/distill.cu", "FO_KD_ROWS"),
    "PRUNE_THREADS": ("cuda/prune.cu", "FO_PRUNE_THREADS"),
    "MIN_PER_THREAD": ("cpu/_plan.pxi", "MIN_PER_THREAD"),
}
