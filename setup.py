"""Build of fastopt's compiled parts.

- Cython extensions fastopt._cpu._optim, _random, _wnorm, _prune, _quant, _distill,
  _stream, _runtime and _xla from kernels/cpu, with OpenMP, for any x86-64 CPU (no -march:
  the loops are memory-bound, and a baseline build reaches the streaming limit; see README).
  _xla holds the optimizer loops as XLA FFI handlers for jax.jit; it declares the FFI's C
  interface itself (kernels/include/fastopt/xla_ffi.h), so it is built with or without jax.
- kernels/ (CUDA sources and shared headers) as the package data fastopt.kernels, so the
  CuPy backend finds them with importlib.resources, from a wheel as from a checkout.
"""

import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -fno-math-errno lets sqrt vectorize; -ffp-contract=off keeps a*b+c as two roundings on
# every CPU and in every backend, so results do not depend on which machine built them.
# -fno-trapping-math lets GCC compute an arithmetic operation on both sides of a branch and
# keep one (nothing here reads the floating-point exception flags; no value changes):
# without it, ADOPT's loop, whose division sits behind its first-step flag, did not
# vectorize and ran at 28% of the streaming limit.
# -g0: no debug information (Python's own flags ask for -g), as release wheels ship; it was
# a fifth to a quarter of the build's compile time (_optim 46 -> 37 s, _xla 43 -> 31 s).
# It comes after CFLAGS: for a debug build, take it out here.
COMPILE_ARGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                "-fopenmp", "-g0"]
LINK_ARGS = ["-fopenmp"]
# GCC does not take the chunk functions' restrict pointers (loaded from an operand table)
# as proof that they do not overlap, so it checks at run time, and it gives up on loops
# that would need more than 10 checks (its default): Adan's 7 streams ran 3.5x slower,
# unvectorized. A compiler without the parameter (clang) does not get it.
GCC_ARGS = ["--param", "vect-max-version-for-alias-checks=40"]
# the CPUs this process may use (a container's limit, where the OS says), for parallel builds
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class BuildExt(build_ext):
    """build_ext, adding GCC_ARGS where the compiler accepts them, and compiling the
    extensions in parallel (threads, one per CPU) unless told otherwise
    (``--parallel``/``-j``): pip and ``python -m build`` pass no -j, and a serial build of
    the nine took 1.6x as long on 2 cores."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = CPUS

    def build_extensions(self):
        extra = GCC_ARGS if self._accepts(GCC_ARGS) else []
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args) + extra
        super().build_extensions()

    def _accepts(self, args):
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "probe.c")
            with open(source, "w") as f:
                f.write("int main(void) { return 0; }\n")
            try:
                self.compiler.compile([source], output_dir=tmp, extra_postargs=args)
            except Exception:
                return False
        return True


def cpu_extension(name):
    return Extension(
        f"fastopt._cpu.{name}",
        [f"kernels/cpu/{name}.pyx"],
        include_dirs=["kernels/include", "kernels/cpu", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=LINK_ARGS,
    )


setup(
    packages=[
        "fastopt",
        "fastopt._backends",
        "fastopt._backends._numpy",
        "fastopt._backends._cython",
        "fastopt._backends._numba",
        "fastopt._backends._cupy",
        "fastopt._cpu",
        "fastopt.optim",
        "fastopt.bench",
        # kernels/ as data folders (no Python inside); only the CUDA sources and the headers
        # they include are installed, the CPU sources are compiled into fastopt._cpu
        "fastopt.kernels",
        "fastopt.kernels.cpu",
        "fastopt.kernels.cuda",
        "fastopt.kernels.include",
        "fastopt.kernels.include.fastopt",
    ],
    package_dir={"fastopt.kernels": "kernels"},
    package_data={"fastopt.kernels.cuda": ["*.cu"], "fastopt.kernels.include.fastopt": ["*.h"]},
    include_package_data=False,
    ext_modules=cythonize(
        [cpu_extension(name) for name in ("_optim", "_random", "_wnorm", "_prune", "_quant",
                                           "_distill", "_stream", "_runtime", "_xla")],
        compiler_directives={"language_level": "3"},
        include_path=["kernels/cpu"],
    ),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
