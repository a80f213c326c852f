"""CUDA kernels: compiled on every run (no GPU needed), executed where there is a GPU.

The compile tests use the same NVRTC options as the CuPy backend at run time, and nvcc as a
second compiler, so a syntax or template error in kernels/cuda fails CI, which has no GPU.
CI installs both compilers; these tests fail there rather than skip if one is missing.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest

import fastopt
from fastopt._backends import _cupy

CU_FILES = sorted(p.name for p in (_cupy.kernel_dir() / "cuda").iterdir() if p.name.endswith(".cu"))


def _need(tool_ok, what):
    if not tool_ok:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing in CI")
        pytest.skip(f"{what} is not installed")


def test_there_are_cuda_sources():
    assert {"optim.cu", "reduce.cu", "factored.cu", "random.cu", "wnorm.cu", "prune.cu",
            "quant.cu", "distill.cu"} <= set(CU_FILES)


@pytest.mark.parametrize("name", CU_FILES)
def test_compiles_with_nvrtc(name):
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception:
        nvrtc = None
    _need(nvrtc is not None, "CuPy's NVRTC (pip install 'fastopt[cuda]')")
    prog = nvrtc.createProgram(_cupy.source(name), name, [], [])
    try:
        nvrtc.compileProgram(prog, list(_cupy.compile_options()) + ["-arch=compute_90"])
    except nvrtc.NVRTCError:
        pytest.fail(f"NVRTC failed on {name}:\n{nvrtc.getProgramLog(prog)}")
    ptx = nvrtc.getPTX(prog).decode()
    assert ".entry fo_cuda_" in ptx
    nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("name", CU_FILES)
def test_compiles_with_nvcc(name, tmp_path):
    nvcc = shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
    _need(nvcc is not None, "nvcc")
    include = _cupy.kernel_dir() / "include"
    out = tmp_path / (name + ".ptx")
    proc = subprocess.run([nvcc, "--ptx", "-arch=sm_90", "--fmad=false", f"-I{include}",
                           "-x", "cu", str(_cupy.kernel_dir() / "cuda" / name), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().count(".entry fo_cuda_") >= 2  # a float32 and a float64 kernel


# -- on a GPU -------------------------------------------------------------------------

from cases import CASES, config_id, spread, tiered  # noqa: E402
from conftest import kd_case  # noqa: E402
from test_optim_parity import CONFIGS, gradients, reference  # noqa: E402

DTYPES = [np.float32, np.float64]


def _reference_grid():
    """Full: every config in each dtype. Fast: every config in one dtype, each rule in
    both."""
    rows = [dict(config=(name, kw), rule=name) for name, kw in CONFIGS]
    full = [dict(row, dtype=dtype) for dtype in DTYPES for row in rows]
    fast = spread(rows, "dtype", DTYPES, against=["rule"])
    return tiered(full, fast, ["config", "dtype"],
                  lambda r: f"{np.dtype(r['dtype']).name}-{config_id(*r['config'])}")


@pytest.mark.gpu
@pytest.mark.parametrize("config, dtype", _reference_grid())
def test_cupy_matches_reference(config, dtype):
    import cupy
    name, kw = config
    ref_params, ref_state = reference(name, kw, dtype)
    shapes = CASES[name].parity_shapes(large=True)  # the reference trajectory's
    rng = np.random.default_rng(0)  # the same stream as test_optim_parity.run_trajectory
    params = [cupy.asarray(np.asarray(rng.standard_normal(n), dtype)) for n in shapes]
    opt = getattr(fastopt, name)(params, **kw)  # auto -> cupy for GPU arrays
    for step in range(100):
        grads = [cupy.asarray(g) for g in gradients(rng, shapes, dtype)]
        if step == 50:
            opt.param_groups[0]["lr"] *= 0.5
        opt.step(grads)
    for i, (got, want) in enumerate(zip(params, ref_params)):
        np.testing.assert_array_equal(cupy.asnumpy(got), want, err_msg=f"params[{i}]")
        for key, value in ref_state[i].items():
            np.testing.assert_array_equal(cupy.asnumpy(opt.state[i][key]) if key != "step"
                                          else opt.state[i][key], value)


@pytest.mark.gpu
def test_torch_cuda_tensors_in_place():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    p = torch.ones(1000, device="cuda")
    ptr = p.data_ptr()
    fastopt.SGD([p], lr=0.5).step([torch.ones(1000, device="cuda")])
    assert p.data_ptr() == ptr
    assert torch.all(p == 0.5)


@pytest.mark.gpu
def test_cupy_many_tensors_one_launch_large():
    import cupy
    sizes = [70000 * k + 3 for k in range(1, 6)]  # several chunks per tensor
    rng = np.random.default_rng(1)
    host = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    dev = [cupy.asarray(h) for h in host]
    fastopt.Adam(dev, lr=0.1).step([cupy.asarray(g) for g in grads])
    fastopt.Adam(host, lr=0.1, backend="numpy").step(grads)
    for d, h in zip(dev, host):
        np.testing.assert_array_equal(cupy.asnumpy(d), h)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_norm_is_identical(kind, dtype):
    import cupy

    from fastopt.optim import _clip
    rng = np.random.default_rng(3)
    host = [rng.standard_normal(n).astype(dtype) for n in (0, 1, 7, 1023, 100003, 40000)]
    want = _clip.total_norm({np.dtype(dtype): host}, kind, "numpy", "cpu", 1)
    dev = [cupy.asarray(h) for h in host]
    assert _clip.total_norm({np.dtype(dtype): dev}, kind, "cupy", "cuda", 1) == want


@pytest.mark.gpu
def test_cupy_fused_clipping_and_guard():
    import cupy
    rng = np.random.default_rng(4)
    host = [rng.standard_normal(n).astype(np.float32) for n in (10, 70000)]
    dev = [cupy.asarray(h) for h in host]
    ref = fastopt.Adam(host, lr=0.1, max_grad_norm=0.5, skip_nonfinite=True, backend="numpy")
    opt = fastopt.Adam(dev, lr=0.1, max_grad_norm=0.5, skip_nonfinite=True)
    for step in range(5):
        g = [rng.standard_normal(h.shape).astype(np.float32) for h in host]
        if step == 2:
            g[1][5] = np.nan
        ref.step(g)
        opt.step([cupy.asarray(x) for x in g])
        assert opt.last_step_skipped == ref.last_step_skipped == (step == 2)
    for d, h in zip(dev, host):
        np.testing.assert_array_equal(cupy.asnumpy(d), h)


# -- pruning, quantization, distillation: bit for bit the NumPy reference's --------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_magnitude_masks_identical(dtype):
    import cupy
    rng = np.random.default_rng(5)
    # rounded values: thousands of ties at the threshold, split across chunks and tensors
    ws = [np.round(rng.standard_normal(n) * 4).astype(dtype) for n in (1, 16384 * 3 + 5, 70001)]
    ws.append(rng.standard_normal((300, 257)).astype(dtype))
    dev = [cupy.asarray(w) for w in ws]
    for amount in (0, 1, 0.3, 0.5, 0.999, 1.0, 12345):
        for mask_dtype in ("bool", "uint8"):
            want = fastopt.prune.global_magnitude_masks(ws, amount, dtype=mask_dtype,
                                                        backend="numpy")
            got = fastopt.prune.global_magnitude_masks(dev, amount, dtype=mask_dtype)
            for g, w in zip(got, want):
                assert isinstance(g, cupy.ndarray) and g.dtype == w.dtype
                np.testing.assert_array_equal(cupy.asnumpy(g), w)
    dev[2][7] = np.nan
    with pytest.raises(ValueError, match=r"ws\[2\]: holds NaN"):
        fastopt.prune.global_magnitude_masks(dev, 0.5)


def _quant_grid():
    """Full: every dtype x code type x axis. Fast: every code type on every axis, the
    dtypes spread pairwise over them."""
    rows = [dict(q=q, axis=axis) for q in [("int8", -128, 127), ("uint8", 0, 255),
                                           ("int4", -8, 7)] for axis in (None, 0, 1)]
    full = [dict(row, dtype=dtype) for dtype in DTYPES for row in rows]
    fast = spread(rows, "dtype", DTYPES, against=["q", "axis"])

    def flat(r):
        qdtype, qmin, qmax = r["q"]
        return dict(dtype=r["dtype"], qdtype=qdtype, qmin=qmin, qmax=qmax, axis=r["axis"])
    return tiered([flat(r) for r in full], [flat(r) for r in fast],
                  ["dtype", "qdtype", "qmin", "qmax", "axis"],
                  lambda r: f"{np.dtype(r['dtype']).name}-{r['qdtype']}-axis{r['axis']}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, qdtype, qmin, qmax, axis", _quant_grid())
def test_cupy_quant_identical(dtype, qdtype, qmin, qmax, axis):
    import cupy

    from fastopt import quant
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((37, 1030)) * 3).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    n = 1 if axis is None else x.shape[axis]
    scale = 0.05 if axis is None else rng.uniform(0.01, 0.1, n)
    zp = 2 if axis is None else rng.integers(0, 4, n)
    dx, dgy = cupy.asarray(x), cupy.asarray(gy)
    pairs = [(quant.quantize(x, scale, zp, qdtype, axis, backend="numpy"),
              quant.quantize(dx, scale, zp, qdtype, axis))]
    pairs.append((quant.dequantize(pairs[0][0], scale, zp, axis, dtype=dtype, backend="numpy"),
                  quant.dequantize(pairs[0][1], scale, zp, axis, dtype=dtype)))
    pairs.append((quant.fake_quantize(x, scale, zp, qmin, qmax, axis, backend="numpy"),
                  quant.fake_quantize(dx, scale, zp, qmin, qmax, axis)))
    pairs.append((quant.fake_quantize_backward(gy, x, scale, zp, qmin, qmax, axis,
                                               backend="numpy"),
                  quant.fake_quantize_backward(dgy, dx, scale, zp, qmin, qmax, axis)))
    for want, got in pairs:
        assert isinstance(got, cupy.ndarray) and got.dtype == want.dtype
        np.testing.assert_array_equal(cupy.asnumpy(got), want)
    dx[3, 5] = np.nan
    with pytest.raises(ValueError, match="x: holds 1 NaN"):
        quant.quantize(dx, scale, zp, qdtype, axis)


def _kd_grid():
    """Full: every dtype x T x labels. Fast: every T with and without labels, the dtypes
    spread pairwise over them."""
    # the cross entropy's exponentials: computed (3, 0.5), shared (1), squared (2, 4, 8)
    rows = [dict(T=T, with_labels=wl) for T in (3.0, 0.5, 1.0, 2.0, 4.0, 8.0)
            for wl in (True, False)]
    full = [dict(row, dtype=dtype) for dtype in DTYPES for row in rows]
    fast = spread(rows, "dtype", DTYPES, against=["T", "with_labels"])
    return tiered(full, fast, ["dtype", "T", "with_labels"],
                  lambda r: f"{np.dtype(r['dtype']).name}-{r['T']}-{r['with_labels']}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, T, with_labels", _kd_grid())
def test_cupy_kd_loss_identical(dtype, T, with_labels):
    import cupy

    from fastopt import distill
    s, t, labels = kd_case(dtype, 33, with_labels, seed=7)
    ds, dt = cupy.asarray(s), cupy.asarray(t)
    dlabels = None if labels is None else cupy.asarray(labels)
    loss, grad = distill.kd_loss(ds, dt, dlabels, T)
    want_loss, want_grad = distill.kd_loss(s, t, labels, T, backend="numpy")
    assert isinstance(grad, cupy.ndarray) and loss == want_loss
    np.testing.assert_array_equal(cupy.asnumpy(grad), want_grad)
    rows, _ = distill.kd_loss(ds, dt, dlabels, T, reduction="none")
    np.testing.assert_array_equal(
        cupy.asnumpy(rows), distill.kd_loss(s, t, labels, T, reduction="none",
                                            backend="numpy")[0])
    ds[4, 9] = np.nan
    with pytest.raises(ValueError, match="student_logits: holds NaN"):
        distill.kd_loss(ds, dt, dlabels, T)
